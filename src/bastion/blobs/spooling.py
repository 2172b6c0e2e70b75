"""A writer that buffers an object in memory up to :data:`MEMORY_LIMIT`, then streams it into a spool file: small
objects (the common case) never touch a file before their commit, and a 2 GB multi-frame object is never in
memory. The stores' writers (filesystem, S3) differ only in where their spool file is and what commit does."""

from __future__ import annotations

import abc
from typing import IO, Any

from bastion.blobs.base import BlobWriter
from bastion.blobs.fileio import os_error
from bastion.errors import StorageError

#: Objects up to this size are buffered in memory until commit.
MEMORY_LIMIT = 8 * 1024 * 1024


class SpoolingWriter(BlobWriter):
    """``_buf`` holds the object until it passes :data:`MEMORY_LIMIT`; from then on ``_spool`` (opened by
    :meth:`_open_spool`) does, and ``_buf`` is None. Both None: committed or aborted."""

    def __init__(self, buf: bytearray | Any) -> None:
        super().__init__()
        self._buf: bytearray | Any | None = buf
        self._spool: IO[bytes] | None = None

    @abc.abstractmethod
    def _open_spool(self) -> IO[bytes]:
        """A new spool file, open for writing."""

    def _spill(self) -> None:
        assert self._buf is not None
        try:
            self._spool = self._open_spool()
            self._spool.write(self._buf)
        except OSError as exc:
            self.abort()
            raise os_error(exc, "cannot create spool file") from exc
        self._buf = None

    def _write(self, data: bytes | memoryview) -> None:
        if self._buf is not None:
            self._buf += data
            if len(self._buf) > MEMORY_LIMIT:
                self._spill()
            return
        if self._spool is None:
            raise StorageError("write after commit/abort")
        try:
            self._spool.write(data)
        except OSError as exc:
            self.abort()
            raise os_error(exc, "cannot write object") from exc
