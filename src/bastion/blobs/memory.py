"""In-memory blob store: the test twin of the real backends."""

from __future__ import annotations

import io
import os
import tempfile
import threading
from collections.abc import Iterator
from typing import BinaryIO

from bastion.blobs.base import BlobStore, BlobWriter
from bastion.errors import NotFound


class MemoryWriter(BlobWriter):
    """Collects bytes in a temporary file until commit."""

    def __init__(self, store: MemoryBlobStore) -> None:
        super().__init__()
        self._store = store
        fd, self._path = tempfile.mkstemp(prefix="bastion-mem-")
        self._fh: BinaryIO | None = os.fdopen(fd, "wb")

    def _write(self, data: bytes | memoryview) -> None:
        assert self._fh is not None
        self._fh.write(data)

    def reader(self) -> BinaryIO:
        assert self._fh is not None
        self._fh.flush()
        return open(self._path, "rb")  # noqa: SIM115

    def commit(self, key: str) -> None:
        assert self._fh is not None
        self._fh.close()
        self._fh = None
        with open(self._path, "rb") as fh:
            data = fh.read()
        os.unlink(self._path)
        with self._store.lock:
            self._store.objects[key] = data

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if os.path.exists(self._path):
            os.unlink(self._path)


class MemoryBlobStore(BlobStore):
    """Objects in a dict; nothing survives the process."""

    def __init__(self) -> None:
        self.location = "memory:"
        self.objects: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def writer(self) -> MemoryWriter:
        return MemoryWriter(self)

    def put_once(self, key: str, data: bytes) -> bool:
        with self.lock:
            return self.objects.setdefault(key, bytes(data)) == data

    def open(self, key: str) -> BinaryIO:
        try:
            return io.BytesIO(self.objects[key])
        except KeyError as exc:
            raise NotFound(f"object {key} is missing from the blob store") from exc

    def size(self, key: str) -> int:
        try:
            return len(self.objects[key])
        except KeyError as exc:
            raise NotFound(f"object {key} is missing from the blob store") from exc

    def delete(self, key: str) -> None:
        with self.lock:
            self.objects.pop(key, None)

    def keys(self, prefix: str = "") -> Iterator[str]:
        with self.lock:
            return iter([k for k in self.objects if k.startswith(prefix)])

    def usage(self) -> tuple[int | None, int | None]:
        return (sum(len(v) for v in self.objects.values()), None)
