"""The BlobStore interface.

A blob store holds immutable objects under string keys. Writes go through a
:class:`BlobWriter`: bytes are streamed in (and hashed with BLAKE3 on the way, :mod:`bastion.model.digest`), and only
:meth:`BlobWriter.commit` makes the object visible under its final key, durably (on disk when it returns)
and atomically. A writer that is aborted, or a process that dies mid-write, leaves nothing
visible. Keys are ``/``-separated; a name starting with ``.`` is never a committed object.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import BinaryIO

from bastion.model import digest as content_digest


class BlobWriter(abc.ABC):
    """A pending object: write bytes, then commit under a key or abort."""

    def __init__(self) -> None:
        self._hash = content_digest.hasher()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` (hashing it)."""
        self._hash.update(data)
        self.size += len(data)
        self._write(data)

    @property
    def digest(self) -> str:
        """The content digest (``b3-<hex>``) of everything written so far."""
        return content_digest.text(self._hash.digest())

    @abc.abstractmethod
    def _write(self, data: bytes | memoryview) -> None: ...

    @abc.abstractmethod
    def reader(self) -> BinaryIO:
        """What was written so far, readable from the start (for header parsing)."""

    @abc.abstractmethod
    def commit(self, key: str) -> None:
        """Make the object durable and visible under ``key``; raises StorageError/StorageFull."""

    def start_commit(self, key: str) -> Commit:
        """Begin :meth:`commit`: the :class:`Commit` returned completes once the object is durable.

        The caller may do other work meanwhile (the ingest pipeline checks the header and runs the index
        statements) and must wait for it, and see it succeed, before treating the object as stored; if it
        fails, the object is not stored and nothing of it is left. This default commits at once.
        """
        self.commit(key)
        return Committed()

    @abc.abstractmethod
    def abort(self) -> None:
        """Discard the pending object. Safe to call twice or after commit."""


class Commit:
    """A blob's commit in progress (:meth:`BlobWriter.start_commit`).

    Call it to wait until the object is durable, raising as :meth:`BlobWriter.commit` would; or, on an event
    loop, ``await commit.wait_async()``, which lets the loop serve others meanwhile. Either may be done more
    than once and gives the same outcome. This base class waits in a thread for ``wait_async``; a store that
    can be awaited more cheaply overrides it.
    """

    def __call__(self) -> None:
        raise NotImplementedError

    def done(self) -> bool:
        """Whether the outcome is known (waiting would not block)."""
        return False

    async def wait_async(self) -> None:
        """:meth:`__call__` for an event loop: the loop is not blocked while the disk works. Cancelling the
        wait does not cancel the commit."""
        await asyncio.shield(asyncio.ensure_future(asyncio.to_thread(self)))

    def then(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (in another thread, or at once) when the commit has completed or failed: for a caller
        that stopped waiting and must clean up after it. This default waits in a thread of its own."""

        def wait_then_call() -> None:
            with contextlib.suppress(Exception):
                self()
            callback()

        threading.Thread(target=wait_then_call, name="bastion-commit-then", daemon=True).start()


class Committed(Commit):
    """A commit that was complete when it was returned."""

    def __call__(self) -> None:
        return None

    def done(self) -> bool:
        return True

    async def wait_async(self) -> None:
        return None

    def then(self, callback: Callable[[], None]) -> None:
        callback()


class CommitInThread(Commit):
    """A commit that a thread of the store completes (``future``: a ``concurrent.futures.Future``)."""

    def __init__(self, future: Future[None]) -> None:
        self.future = future

    def __call__(self) -> None:
        self.future.result()

    def done(self) -> bool:
        return self.future.done()

    async def wait_async(self) -> None:
        await asyncio.shield(asyncio.wrap_future(self.future))  # a cancelled wait leaves the commit running

    def then(self, callback: Callable[[], None]) -> None:
        self.future.add_done_callback(lambda _: callback())


class BlobStore(abc.ABC):
    """Where stored objects live (filesystem, S3, memory)."""

    location: str

    @abc.abstractmethod
    def writer(self) -> BlobWriter:
        """Start a new pending object."""

    def put(self, key: str, data: bytes) -> str:
        """Store ``data`` under ``key`` durably; return its content digest."""
        w = self.writer()
        try:
            w.write(data)
            w.commit(key)
        except BaseException:
            w.abort()
            raise
        return w.digest

    @abc.abstractmethod
    def open(self, key: str) -> BinaryIO:
        """Open a committed object for reading; raises NotFound."""

    def get(self, key: str) -> bytes:
        """The whole object."""
        with self.open(key) as fh:
            return fh.read()

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes of a committed object; raises NotFound."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object (missing is fine)."""

    def set_aside(self, key: str) -> str | None:
        """Take ``key`` out of the store without destroying its bytes where the backend can; return where it went.

        For an object that must be neither served nor indexed but that an operator may want to look at (a write
        that a crash cut short). This default deletes it.
        """
        self.delete(key)
        return None

    @abc.abstractmethod
    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every committed key under ``prefix``, in no particular order."""

    def exists(self, key: str) -> bool:
        """True if ``key`` is committed."""
        try:
            self.size(key)
        except Exception:
            return False
        return True

    def set_aside_count(self) -> int:
        """How many objects :meth:`set_aside` has kept (0 where the backend deletes them)."""
        return 0

    def usage(self) -> tuple[int | None, int | None]:
        """``(used_bytes, free_bytes)``; None where the backend cannot tell."""
        return (None, None)

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """Set up, in the calling process, what its first write would otherwise wait for."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


def open_blob_store(location: str, *, node_id: str = "") -> BlobStore:
    """Open a blob store from a location: a directory path (default), ``memory:`` or
    ``s3://BUCKET/PREFIX?endpoint=URL&region=REGION`` (:mod:`bastion.blobs.s3`).

    ``node_id`` names the node opening it among those sharing it (see :class:`bastion.blobs.filesystem.FileBlobStore`).
    An S3 store is checked before it is returned (:meth:`bastion.blobs.s3.S3BlobStore.check`): StorageError, in
    one line, if its bucket is missing, the credentials are refused or the endpoint cannot be reached;
    ValueError for a malformed location.
    """
    if location.startswith("s3://"):
        from bastion.blobs.s3 import S3BlobStore

        store = S3BlobStore.from_location(location, node_id=node_id)
        try:
            store.check()
        except BaseException:
            store.close()
            raise
        return store
    if location.startswith("memory:"):
        from bastion.blobs.memory import MemoryBlobStore

        return MemoryBlobStore()
    from bastion.blobs.filesystem import FileBlobStore

    return FileBlobStore(location, node_id=node_id)
