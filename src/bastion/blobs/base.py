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
import io
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import BinaryIO

from bastion.errors import BastionError, CorruptObject, NotFound
from bastion.model import digest as content_digest
from bastion.model.records import parse_object_key

#: A reader gets an object up to this size only after its bytes were hashed and found to match the digest its key
#: names, every time (:meth:`BlobStore.open_verified`). A larger one is checked so the first time this process
#: opens it, and not again: frame and bulkdata reads of a large multi-frame object would otherwise hash it whole
#: for every frame. The scrub (:mod:`bastion.blobs.repair`) re-hashes every copy within its cycle.
VERIFY_EVERY_READ_BYTES = 8 * 1024 * 1024


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
    def put_once(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` durably unless the key holds an object already, atomically: of writers racing
        for one key exactly one stores its bytes, and nothing is ever replaced. True if the key holds ``data`` now
        (stored by this call, or the same bytes were there); False if it holds other bytes, left as they were.
        For objects whose key does not name their content (a report's version, :mod:`bastion.blobs.reportlog`)."""

    @abc.abstractmethod
    def open(self, key: str) -> BinaryIO:
        """Open a committed object for reading; raises NotFound."""

    def get(self, key: str) -> bytes:
        """The whole object."""
        with self.open(key) as fh:
            return fh.read()

    def open_verified(self, key: str) -> BinaryIO:
        """:meth:`open` for a reader that serves the object: its bytes are checked first against the digest its
        key names (:data:`VERIFY_EVERY_READ_BYTES`), so nothing is served that does not match. Raises NotFound,
        or CorruptObject for a copy that does not match. A key that names no digest is opened unchecked."""
        fh = self.open(key)
        try:
            parts = parse_object_key(key)
            if parts is not None and fh.seek(0, 2) <= VERIFY_EVERY_READ_BYTES:
                fh.seek(0)
                data = fh.read()  # read once: hashed here, then served from memory
                if content_digest.of_bytes_like(data, parts["digest"]) != parts["digest"]:
                    raise CorruptObject(f"object {key}: its bytes do not match its digest")
                fh.close()
                return io.BytesIO(data)
            check_copy(fh, key, self._verified_large())
        except BaseException:
            fh.close()
            raise
        return fh

    def problem_with(self, key: str) -> str | None:
        """What is wrong with the copy of ``key``: ``"missing"``, ``"corrupt"`` (its bytes do not match the digest
        its key names) or ``"unreadable"``; None if nothing."""
        try:
            with self.open(key) as fh:
                check_copy(fh, key)
        except NotFound:
            return "missing"
        except CorruptObject:
            return "corrupt"
        except (BastionError, OSError):
            return "unreadable"
        return None

    def heal(self, key: str, source: Callable[[], BinaryIO]) -> list[str]:
        """Make the copy of ``key`` good if it is missing, unreadable or corrupt, from the bytes ``source`` opens
        (which must hash to the digest the key names: a re-sent original, another copy). Returns the locations of
        the stores repaired (this one, or none)."""
        if self.problem_with(key) is None:
            return []
        rewrite(self, key, source)
        return [self.location]

    def _verified_large(self) -> set[str]:
        marks: set[str] | None = getattr(self, "_verified_marks", None)
        if marks is None or len(marks) > 100_000:
            marks = set()
            self._verified_marks = marks
        return marks

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes of a committed object; raises NotFound."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object (missing is fine)."""

    def destroy(self, key: str) -> None:
        """Remove an object's bytes for good (a purge, :mod:`bastion.ingest.deletion`): as :meth:`delete`, and, where
        the backend keeps earlier versions of an object (a versioned S3 bucket), those too, as far as the store's
        retention allows. Missing is fine."""
        self.delete(key)

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

    def revive(self) -> bool:
        """Before a store that failed is tried again: put right what the store can itself (a lost directory made
        again). Returns False if it is known still not to work. This default does nothing."""
        return True

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """Set up, in the calling process, what its first write would otherwise wait for."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


def rewrite(store: BlobStore, key: str, source: Callable[[], BinaryIO]) -> None:
    """Put the bytes ``source`` opens under ``key`` in ``store``, replacing a wanting copy; they must hash to the
    digest the key names (CorruptObject otherwise, and nothing is written)."""
    w = store.writer()
    try:
        with source() as fh:
            check_copy(fh, key)
            while chunk := fh.read(1024 * 1024):
                w.write(chunk)
        store.delete(key)  # a corrupt copy goes first: keys are written once, and only a repair replaces one
        w.commit(key)
    except BaseException:
        w.abort()
        raise


def check_copy(fh: BinaryIO, key: str, verified_large: set[str] | None = None) -> None:
    """Raise CorruptObject unless what ``fh`` holds hashes to the digest ``key`` names; ``fh`` is left at its
    start. A key in ``verified_large`` larger than :data:`VERIFY_EVERY_READ_BYTES` is taken as checked already;
    one that passes is added to it."""
    parts = parse_object_key(key)
    if parts is None:
        return
    size = fh.seek(0, 2)
    fh.seek(0)
    large = verified_large is not None and size > VERIFY_EVERY_READ_BYTES
    if large and key in verified_large:  # type: ignore[operator]
        return
    digest = content_digest.of_file(fh, parts["digest"])
    fh.seek(0)
    if digest != parts["digest"]:
        raise CorruptObject(f"object {key}: its bytes do not match its digest (found {digest})")
    if large:
        verified_large.add(key)  # type: ignore[union-attr]


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
