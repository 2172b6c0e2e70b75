"""The S3 blob store's file objects: a range of a local file read with ``pread`` (the writer's spool, and the
parts uploaded from it) and an S3 object read by ranged GETs (:meth:`bastion.blobs.s3.S3BlobStore.open`)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable


class _Seekable(io.RawIOBase):
    """A readable, seekable raw file of :meth:`_size` bytes, whose position is ``_pos``."""

    _pos = 0

    def _size(self) -> int:
        raise NotImplementedError

    def _read_at(self, pos: int, view: memoryview) -> int:
        """Fill ``view`` (not empty, not past the end) with the bytes from ``pos``; return how many it holds."""
        raise NotImplementedError

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._size() - self._pos)
        if n <= 0:
            return 0
        with memoryview(b) as whole, whole.cast("B") as view:
            n = self._read_at(self._pos, view[:n])
        self._pos += n
        return n

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size()}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


class FileRange(_Seekable):
    """Bytes ``[start, start + length)`` of the open file ``fd`` (to its current end if ``length`` is None).

    Reads with ``os.pread``, so it keeps its own position and never moves the file's: several may read one
    file at once, beside a writer appending to it. ``owns``: :meth:`close` closes ``fd``.
    """

    def __init__(self, fd: int, start: int = 0, length: int | None = None, *, owns: bool = False) -> None:
        super().__init__()
        self._fd = fd
        self._start = start
        self._length = length
        self._owns = owns

    @property
    def name(self) -> str:
        """A path that opens the file anew (``/dev/fd/N``): pydicom reads a deferred value of an
        ``io.BufferedReader`` by opening its name again. A range that starts further in has none (AttributeError:
        opened anew, the file would not start where the range does)."""
        if self._start:
            raise AttributeError("name")
        return f"/dev/fd/{self._fd}"

    def _size(self) -> int:
        if self._length is not None:
            return self._length
        return max(0, os.fstat(self._fd).st_size - self._start)

    def _read_at(self, pos: int, view: memoryview) -> int:
        data = os.pread(self._fd, len(view), self._start + pos)
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed and self._owns:
            os.close(self._fd)
        super().close()


class RangedObject(_Seekable):
    """A stored object of ``size`` bytes whose first bytes, ``head``, are already here; the rest is fetched when
    read, each read one ranged GET of what it asks for.

    ``fetch_into(start, view)`` fills ``view`` with the object's bytes from ``start`` and returns how many it
    wrote; ``fetch(start, end)`` returns bytes ``[start, end)``. Wrapped in an ``io.BufferedReader``, small reads
    are served from its buffer and a read past it fetches a buffer's worth, so reading a header or one frame of a
    large object fetches that and at most one buffer more.
    """

    def __init__(self, size: int, head: bytes, fetch_into: Callable[[int, memoryview], int],
                 fetch: Callable[[int, int], bytes], name: str = "") -> None:
        super().__init__()
        #: What the object is called (its ``s3://`` location): file readers such as pydicom's ask for a name.
        self.name = name
        self._length = size
        self._head = head
        self._fetch_into = fetch_into
        self._fetch = fetch

    def _size(self) -> int:
        return self._length

    def _read_at(self, pos: int, view: memoryview) -> int:
        if pos >= len(self._head):
            return self._fetch_into(pos, view)
        n = min(len(view), len(self._head) - pos)
        view[:n] = self._head[pos: pos + n]
        return n

    def readall(self) -> bytes:
        """The rest of the object: what ``head`` holds of it, and one GET for the remainder."""
        parts = []
        if self._pos < len(self._head):
            parts.append(self._head[self._pos:])
            self._pos = len(self._head)
        if self._pos < self._length:
            parts.append(self._fetch(self._pos, self._length))
            self._pos = self._length
        return b"".join(parts)
