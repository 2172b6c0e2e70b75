"""The filesystem blob store's writer: how one object becomes a durable file (the durability chain's first link).

Invariants (the store's module docstring, :mod:`bastion.blobs.filesystem`, says how the pieces fit):

* An object is buffered in memory up to :data:`MEMORY_LIMIT`, then streamed into a spool file: a 2 GB object is
  never in memory.
* Nothing is visible under its key before :meth:`FileWriter.start_commit`; a commit that fails leaves no file of
  its own behind.
* A buffered object below :data:`JOURNAL_MAX_BYTES` is durable once its journal record is flushed; a larger one
  once its file and directory are flushed; a spooled one once its file is flushed, renamed and its directory
  flushed. The :class:`~bastion.blobs.base.Commit` completes only then.
* The buffer is handed over at ``start_commit`` (the writer forgets it): nothing writes into memory that the
  store's writer threads may still be reading.
* The store's ``cwrite`` (the compiled writer, or None for the Python one) is chosen when the store is made.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from bastion.blobs.base import Commit, CommitInThread, Committed
from bastion.blobs.cjobs import CreatedHere, JobsCommit, on_event_loop
from bastion.blobs.fileio import BufferReader, os_error, sync_all, sync_data, write_direct
from bastion.blobs.journal import Journal, fsync_dir
from bastion.blobs.spooling import SpoolingWriter
from bastion.errors import StorageError, StorageFull

if TYPE_CHECKING:
    from bastion.blobs.filesystem import FileBlobStore

#: Buffered objects smaller than this are made durable by the journal; larger ones by fsync of their file and
#: directory: from here on the data write is most of the cost, and the journal would write the object twice
#: (see BENCHMARKS.md, "Why 128 KB").
JOURNAL_MAX_BYTES = 128 * 1024


class _WaitingCommit(Commit):
    """A commit completed by calling ``wait`` (the journal's flush without ``_cwrite``)."""

    def __init__(self, wait: Callable[[], None]) -> None:
        self._wait = wait

    def __call__(self) -> None:
        self._wait()


class FileWriter(SpoolingWriter):
    """Buffers in memory up to :data:`MEMORY_LIMIT`, then streams into a spool file in the store's ``.spool``
    (:class:`~bastion.blobs.spooling.SpoolingWriter`): small objects (the common case) cost one file creation, in
    :meth:`commit`."""

    def __init__(self, store: FileBlobStore) -> None:
        # In memory that _cwrite's threads write without a copy, as large as the last such object and a little
        # more (instances of one series come in one size): growing a bytearray by the PDVs of a 512 KB CT
        # instance copied it again and again, and submit() copied it once more.
        super().__init__(store.cwrite.Buffer(store.buffer_hint) if store.cwrite is not None else bytearray())
        self._store = store
        self._path: str | None = None  # the spool file, named when one is needed

    def _spool_path(self) -> str:
        if self._path is None:
            self._path = self._store.spool_path()
        return self._path

    def _open_spool(self) -> IO[bytes]:
        return open(self._spool_path(), "wb", buffering=0)  # noqa: SIM115

    def reader(self) -> BinaryIO:
        if self._buf is not None:
            return BufferReader(self._buf)  # type: ignore[return-value]
        return open(self._spool_path(), "rb")  # noqa: SIM115

    def commit(self, key: str) -> None:
        self.start_commit(key)()

    def start_commit(self, key: str) -> Commit:
        """Write a buffered object now and let the disk catch up while the caller goes on.

        A journaled object's record is written on this thread; ``_cwrite``'s threads create its file and run the
        journal's ``fdatasync`` meanwhile (:meth:`_start_journaled_in_c`), and the commit completes once both
        are done. A larger buffered object is written and flushed by ``_cwrite``'s threads for durable files.
        Without ``_cwrite`` the store's Python commit threads write and flush a larger one. A spooled object's
        file is flushed and renamed into place on this thread, or in a commit thread when this thread runs an
        event loop (which must not wait for the disk).
        """
        final = self._store.path_of(key)
        buf = self._buf
        if buf is None:
            if on_event_loop():
                return CommitInThread(self._store.committer().submit(self._commit_spooled, key, final))
            self._commit_spooled(key, final)
            return Committed()
        self._buf = None
        self._store.buffer_hint = len(buf) + len(buf) // 16 + 4096
        journal = self._store.journal_for(key, len(buf)) if len(buf) < JOURNAL_MAX_BYTES else None
        if journal is not None:
            if self._store.cwrite is not None:
                return self._start_journaled_in_c(journal, key, final, buf, self._hash.digest())
            return self._start_journaled(journal, key, final, buf, self._hash.digest())
        if self._store.cwrite is not None:
            return self._start_in_place(key, final, buf)
        return CommitInThread(self._store.committer().submit(self._commit_in_place, key, final, buf))

    def _commit_spooled(self, key: str, final: str) -> None:
        try:
            assert self._spool is not None, "commit after commit/abort"
            sync_all(self._spool.fileno())
            self._spool.close()
            self._spool = None
            self._store.make_dirs(os.path.dirname(final))
            os.rename(self._spool_path(), final)
            fsync_dir(os.path.dirname(final))
        except OSError as exc:
            self.abort()
            raise os_error(exc, f"cannot commit {key}") from exc

    def _start_journaled(self, journal: Journal, key: str, final: str, buf: bytearray,
                         digest: bytes) -> Commit:
        """Write the file in place (no flush), then its journal record; the waiter makes the record durable.

        Where ``_cwrite`` is not built (:meth:`_start_journaled_in_c` otherwise). The file comes first: once
        the journal holds the record, a checkpoint may void it, and it does so only after a ``syncfs`` that
        must cover the file. Until the wait returns the object is not acknowledged, so a crash meanwhile may
        leave its file empty or short: crash recovery finds it does not match the digest in its key and sets
        it aside.
        """
        created = False

        def undo(exc: OSError) -> StorageError | StorageFull:
            if created:
                with contextlib.suppress(OSError):
                    os.unlink(final)
            return os_error(exc, f"cannot commit {key}")

        try:
            created = self._write_file(final, buf)
            ticket = journal.write(key, digest, [buf], len(buf))
        except OSError as exc:
            raise undo(exc) from exc

        def wait() -> None:
            try:
                journal.wait(ticket)
            except OSError as exc:
                raise undo(exc) from exc

        return _WaitingCommit(wait)

    def _start_journaled_in_c(self, journal: Journal, key: str, final: str, buf: bytearray,
                              digest: bytes) -> Commit:
        """:meth:`_start_journaled` with the work that waits for the disk done by ``_cwrite``'s threads: the
        ``fdatasync`` of the record's segment is started as soon as the record is written, so that the disk's
        flush overlaps the index statements instead of following them. The waiter waits for it and for the
        object's file.

        The ordered ``_cwrite`` thread creates the file: it is submitted before the record is written, and the
        journal's checkpoint first waits for every file submitted before it (``_cwrite.barrier``), then runs the
        ``syncfs`` that must cover them. The flush runs in another thread, so that it overlaps the file's
        creation. Where the ordered thread is still busy with another store's file (concurrent stores), this
        thread creates its own before writing the record rather than queue behind it. On an event loop the jobs
        tell the loop when they are done (``notify``), so that awaiting the commit wakes no other thread.
        """
        cwrite = self._store.cwrite
        assert cwrite is not None
        notify = on_event_loop()
        self._store.make_dirs(os.path.dirname(final))
        if cwrite.ordered_idle():
            file_job: Any = cwrite.submit(final, buf, notify=notify)
        else:
            file_job = CreatedHere(cwrite, final, buf)
        try:
            ticket = journal.write(key, digest, [buf], len(buf), writeback=False)
            prepared = journal.pending_sync(ticket)
            sync_job = (cwrite.submit_sync(prepared[0], parallel=True, notify=notify)
                        if prepared is not None else None)
        except OSError as exc:
            with contextlib.suppress(OSError):
                file_job.wait()
                os.unlink(final)
            raise os_error(exc, f"cannot commit {key}") from exc

        def settle() -> None:
            """Both jobs are done: raise what kept the object from being durable, having removed its file."""
            created = False
            try:
                try:
                    try:
                        file_job.wait()
                        created = True
                    except FileExistsError:  # the same object from another process, in the same nanosecond
                        self._write_file(final, buf, sync=True)
                        fsync_dir(os.path.dirname(final))
                finally:  # whatever the file met: a failed flush also fails the other records it covered
                    if sync_job is not None and prepared is not None:
                        error: OSError | None = None
                        try:
                            sync_job.wait()
                        except OSError as exc:
                            error = exc
                        journal.synced(ticket, prepared[1], error)
            except OSError as exc:
                if created:
                    with contextlib.suppress(OSError):
                        os.unlink(final)
                raise os_error(exc, f"cannot commit {key}") from exc

        return JobsCommit([file_job, sync_job] if sync_job is not None else [file_job], settle,
                          cwrite if notify else None)

    def _start_in_place(self, key: str, final: str, buf: bytearray) -> Commit:
        """:meth:`_commit_in_place` by ``_cwrite``'s writer threads for durable files (no Python thread)."""
        cwrite = self._store.cwrite
        assert cwrite is not None
        notify = on_event_loop()
        self._store.make_dirs(os.path.dirname(final))
        job = cwrite.submit(final, buf, sync=True, sync_dir=True, direct=True, notify=notify)

        def settle() -> None:
            try:
                job.wait()
            except FileExistsError:  # the same key in the same nanosecond: the rare way, on this thread
                self._commit_in_place(key, final, buf)
            except OSError as exc:
                raise os_error(exc, f"cannot commit {key}") from exc

        return JobsCommit([job], settle, cwrite if notify else None)

    def _commit_in_place(self, key: str, final: str, buf: bytearray) -> None:
        """Write the file in place and make it durable itself: ``fdatasync`` of the file, ``fsync`` of its directory.

        For objects of :data:`JOURNAL_MAX_BYTES` or more, whose data write is most of the cost: the journal would
        write them twice. A crash before this returns may leave the file short, as in :meth:`_commit_journaled`.
        """
        created = False
        try:
            if self._store.cwrite is not None:  # the whole write, flush and directory sync in C, without the GIL
                self._store.make_dirs(os.path.dirname(final))
                with contextlib.suppress(FileExistsError):  # the same key in the same nanosecond: below
                    self._store.cwrite.create_file(final, buf, True, True, True)
                    return
            created = self._write_file(final, buf, sync=True)
            fsync_dir(os.path.dirname(final))
        except OSError as exc:
            if created:
                with contextlib.suppress(OSError):
                    os.unlink(final)
            raise os_error(exc, f"cannot commit {key}") from exc

    def _write_file(self, final: str, buf: bytearray, *, sync: bool = False) -> bool:
        """Create the file ``final`` holding ``buf`` (flushed with ``fdatasync`` if ``sync``); True if this call
        created it. On failure nothing this call made is left behind.

        A flushed file is written with ``O_DIRECT`` where the filesystem allows it (:func:`bastion.blobs.fileio.write_direct`).
        """
        self._store.make_dirs(os.path.dirname(final))
        if self._store.cwrite is not None and not sync:
            with contextlib.suppress(FileExistsError):  # handled below
                self._store.cwrite.create_file(final, buf, False, False, False)
                return True
        try:
            fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            path = final
        except FileExistsError:  # the same key from another process in the same nanosecond: replace it whole
            path = self._spool_path()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                if not (sync and write_direct(fd, buf)):
                    view = memoryview(buf)
                    while view:
                        view = view[os.write(fd, view):]
                if sync:
                    sync_data(fd)
            finally:
                os.close(fd)
            if path != final:
                os.rename(path, final)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return path == final

    def abort(self) -> None:
        self._buf = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
