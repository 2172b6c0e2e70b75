"""Filesystem blob store: one file per object, fsync'd file and directory before commit returns."""

from __future__ import annotations

import errno
import io
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import BinaryIO

from bastion.blobs.base import BlobStore, BlobWriter
from bastion.errors import NotFound, StorageError, StorageFull

#: Objects up to this size are buffered in memory until commit.
MEMORY_LIMIT = 8 * 1024 * 1024


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(exc: OSError, what: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"{what}: no space left on the blob store")
    return StorageError(f"{what}: {exc.strerror or exc}")


class FileWriter(BlobWriter):
    """Buffers in memory up to :data:`MEMORY_LIMIT`, then streams into a spool file.

    Small objects (the common case) thus cost one file creation, in :meth:`commit`; a 2 GB
    multi-frame object never sits in memory.
    """

    def __init__(self, store: FileBlobStore) -> None:
        super().__init__()
        self._store = store
        self._buf: bytearray | None = bytearray()
        self._fh: BinaryIO | None = None
        self._path = os.path.join(store.spool_dir, uuid.uuid4().hex)

    def _spill(self) -> None:
        try:
            self._fh = open(self._path, "wb", buffering=0)  # noqa: SIM115
            assert self._buf is not None
            self._fh.write(self._buf)
        except OSError as exc:
            self.abort()
            raise _os_error(exc, "cannot create spool file") from exc
        self._buf = None

    def _write(self, data: bytes | memoryview) -> None:
        if self._buf is not None:
            self._buf += data
            if len(self._buf) > MEMORY_LIMIT:
                self._spill()
            return
        if self._fh is None:
            raise StorageError("write after commit/abort")
        try:
            self._fh.write(data)
        except OSError as exc:
            self.abort()
            raise _os_error(exc, "cannot write object") from exc

    def reader(self) -> BinaryIO:
        if self._buf is not None:
            return io.BytesIO(self._buf)
        return open(self._path, "rb")  # noqa: SIM115

    def commit(self, key: str) -> None:
        final = self._store.path_of(key)
        try:
            if self._buf is not None:
                self._spill()
            assert self._fh is not None, "commit after commit/abort"
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
            self._store.make_dirs(os.path.dirname(final))
            os.rename(self._path, final)
            _fsync_dir(os.path.dirname(final))
        except OSError as exc:
            self.abort()
            raise _os_error(exc, f"cannot commit {key}") from exc

    def abort(self) -> None:
        self._buf = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass


class FileBlobStore(BlobStore):
    """Objects as files under ``root``; the key is the relative path."""

    def __init__(self, root: str) -> None:
        self.location = self.root = os.path.abspath(root)
        self.spool_dir = os.path.join(self.root, ".spool")
        os.makedirs(self.spool_dir, exist_ok=True)
        self._known_dirs: set[str] = {self.root}
        # Spool files left by a crash are never visible objects; clear them.
        for name in os.listdir(self.spool_dir):
            try:
                os.unlink(os.path.join(self.spool_dir, name))
            except OSError:
                pass

    def path_of(self, key: str) -> str:
        """The file path of ``key``; refuses keys that would leave the store."""
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            raise StorageError(f"invalid blob key {key!r}")
        return os.path.join(self.root, *parts)

    def make_dirs(self, path: str) -> None:
        """Create ``path`` and its parents, fsync'ing each parent that gained an entry."""
        if path in self._known_dirs:
            return
        parent = os.path.dirname(path)
        if parent != path and parent not in self._known_dirs:
            self.make_dirs(parent)
        try:
            os.mkdir(path)
            _fsync_dir(parent)
        except FileExistsError:
            pass
        self._known_dirs.add(path)

    def writer(self) -> FileWriter:
        return FileWriter(self)

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self.path_of(key), "rb")  # noqa: SIM115
        except FileNotFoundError as exc:
            raise NotFound(f"object {key} is missing from the blob store") from exc
        except OSError as exc:
            raise _os_error(exc, f"cannot read {key}") from exc

    def size(self, key: str) -> int:
        try:
            return os.stat(self.path_of(key)).st_size
        except FileNotFoundError as exc:
            raise NotFound(f"object {key} is missing from the blob store") from exc

    def delete(self, key: str) -> None:
        try:
            os.unlink(self.path_of(key))
        except FileNotFoundError:
            pass

    def keys(self, prefix: str = "") -> Iterator[str]:
        start = self.root if not prefix else os.path.join(self.root, *prefix.strip("/").split("/"))
        if not os.path.isdir(start):
            return
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, self.root)
            for name in filenames:
                if not name.startswith("."):
                    yield name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"

    def usage(self) -> tuple[int | None, int | None]:
        du = shutil.disk_usage(self.root)
        return (du.used, du.free)
