"""The filesystem blob store's plain file helpers: a durable write with ``O_DIRECT``, a reader over a buffered
object, the comparison the journal replay makes, the error a failed write becomes, and a small file written once
(:func:`keep_first`: a node id, a secret, a key)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import mmap
import os
import threading
import uuid
from pathlib import Path

from bastion.errors import StorageError, StorageFull

_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere flushed files go through the page cache
#: macOS: ``fsync`` hands the data to the drive, whose cache may still lose it; ``F_FULLFSYNC`` flushes that too.
_F_FULLFSYNC: int | None = getattr(fcntl, "F_FULLFSYNC", None)


def sync_data(fd: int) -> None:
    """Make the data of file ``fd`` (and its size) durable: ``fdatasync`` where there is one, ``F_FULLFSYNC`` on
    macOS, ``fsync`` elsewhere."""
    if _F_FULLFSYNC is not None:
        fcntl.fcntl(fd, _F_FULLFSYNC)
    elif hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:
        os.fsync(fd)


def sync_all(fd: int) -> None:
    """Make file (or directory) ``fd`` durable, data and metadata: ``fsync``, or ``F_FULLFSYNC`` on macOS."""
    if _F_FULLFSYNC is not None:
        fcntl.fcntl(fd, _F_FULLFSYNC)
    else:
        os.fsync(fd)

_direct = threading.local()  # each commit thread's page-aligned buffer for O_DIRECT writes


def write_direct(fd: int, buf: bytearray) -> bool:
    """Write ``buf`` to the empty file ``fd`` with ``O_DIRECT``; False (nothing written) where that is refused.

    Direct I/O takes the bytes to the disk from a buffer this thread reuses, instead of copying them into page
    cache pages that must then be written back (see BENCHMARKS.md, "O_DIRECT for objects from 128 KB"). The data
    is written padded to whole pages, then the file is cut to its length; the caller's ``fdatasync`` makes that
    length durable.
    """
    if not _O_DIRECT:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | _O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # the filesystem does not do direct I/O (e.g. some FUSE mounts)
            return False
        raise
    size = len(buf)
    padded = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
    area: mmap.mmap | None = getattr(_direct, "area", None)
    if area is None or len(area) < padded:
        if area is not None:
            with contextlib.suppress(BufferError):  # a view left by a failed write: the collector frees it
                area.close()
        area = _direct.area = mmap.mmap(-1, max(padded, 1 << 20))
    area[:size] = buf
    area[size:padded] = bytes(padded - size)  # no stale bytes of an earlier object in the last block
    with memoryview(area) as whole:
        view = whole[:padded]
        try:
            while view:
                view = view[os.write(fd, view):]
        finally:
            view.release()
    os.ftruncate(fd, size)
    return True


def os_error(exc: OSError, what: str) -> StorageError | StorageFull:
    """The storage error an OSError becomes: :class:`StorageFull` for a full disk or quota."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"{what}: no space left on the blob store")
    return StorageError(f"{what}: {exc.strerror or exc}")


class BufferReader(io.RawIOBase):
    """Reads a buffer in place, without a copy (``io.BytesIO`` would copy a bytearray)."""

    def __init__(self, buf: bytearray) -> None:
        super().__init__()
        self._view = memoryview(buf)  # the buffer cannot grow while this exists: close() releases it
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(self._pos + size, len(self._view))
        data = bytes(self._view[self._pos: end])
        self._pos = max(self._pos, end)
        return data

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            self._view.release()
        super().close()


def holds(path: str, data: bytes) -> bool:
    """True if the file at ``path`` holds exactly ``data``."""
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size != len(data):
                return False
            return fh.read() == data
    except FileNotFoundError:
        return False


def keep_first(path: Path, content: bytes, mode: int = 0o600) -> bytes:
    """Keep ``content`` in ``path`` durably unless the file exists already; what the file holds either way.

    The content is written and flushed under a temporary name, then linked to ``path``: ``link`` never replaces an
    existing file, so of processes making the file at once the first one linked wins, and no reader ever sees a
    file written in part. The directory is flushed too (the file survives a power failure once this returns).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            try:
                os.write(fd, content)
                sync_all(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            sync_all(directory)
        finally:
            os.close(directory)
    return path.read_bytes()
