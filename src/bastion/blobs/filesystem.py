"""Filesystem blob store: one file per object, durable before commit returns.

An object buffered in memory and smaller than :data:`JOURNAL_MAX_BYTES` is made durable by the store's
write-ahead journal (:mod:`bastion.blobs.journal`): its file is written without a flush and the object is
appended to the journal with one ``fdatasync``. A larger buffered object (up to :data:`MEMORY_LIMIT`) is
written in place (with ``O_DIRECT`` where possible) and made durable by ``fdatasync`` of its file and ``fsync`` of
its directory; one past that is streamed through a spool file, fsync'd and renamed into place. The flush of a
buffered object overlaps the ingest pipeline's index transaction (:meth:`FileWriter.start_commit`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

from bastion.blobs.base import BlobStore, BlobWriter, Commit, CommitInThread, Committed
from bastion.blobs.cjobs import CreatedHere, JobsCommit, on_event_loop
from bastion.blobs.fileio import BufferReader, holds, os_error, sync_all, sync_data, write_direct
from bastion.blobs.journal import (
    OBJECT,
    TOMBSTONE,
    Journal,
    fsync_dir,
    orphaned_segments,
    read_segment,
    record_size,
    sync_filesystem,
)
from bastion.errors import NotFound, StorageError, StorageFull
from bastion.model.compiled import load_extension
from bastion.model.records import is_node_id

log = logging.getLogger("bastion.blobs")

#: Objects up to this size are buffered in memory until commit.
MEMORY_LIMIT = 8 * 1024 * 1024
#: Buffered objects smaller than this are made durable by the journal; larger ones by fsync of their file and
#: directory: from here on the data write is most of the cost, and the journal would write the object twice
#: (see BENCHMARKS.md, "Why 128 KB").
JOURNAL_MAX_BYTES = 128 * 1024
#: Threads per process that write buffered objects and wait for their flush while the index transaction runs,
#: where ``_cwrite`` is not built (its own threads do it otherwise: ``DURABLE_THREADS`` in ``_cwrite.c``).
COMMIT_THREADS = 4


#: The file write in C without the GIL (``_cwrite.c``), or None where the Python one runs.
CWRITE = load_extension("bastion.blobs._cwrite")


class _WaitingCommit(Commit):
    """A commit completed by calling ``wait`` (the journal's flush without ``_cwrite``)."""

    def __init__(self, wait: Callable[[], None]) -> None:
        self._wait = wait

    def __call__(self) -> None:
        self._wait()


class FileWriter(BlobWriter):
    """Buffers in memory up to :data:`MEMORY_LIMIT`, then streams into a spool file.

    Small objects (the common case) thus cost one file creation, in :meth:`commit`; a 2 GB
    multi-frame object never sits in memory.
    """

    def __init__(self, store: FileBlobStore) -> None:
        super().__init__()
        self._store = store
        # In memory that _cwrite's threads write without a copy, as large as the last such object and a little
        # more (instances of one series come in one size): growing a bytearray by the PDVs of a 512 KB CT
        # instance copied it again and again, and submit() copied it once more.
        self._buf: bytearray | Any | None = (CWRITE.Buffer(store.buffer_hint) if CWRITE is not None
                                             else bytearray())
        self._fh: BinaryIO | None = None
        self._path: str | None = None  # the spool file, named when one is needed

    def _spool_path(self) -> str:
        if self._path is None:
            self._path = self._store.spool_path()
        return self._path

    def _spill(self) -> None:
        try:
            self._fh = open(self._spool_path(), "wb", buffering=0)  # noqa: SIM115
            assert self._buf is not None
            self._fh.write(self._buf)
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
        if self._fh is None:
            raise StorageError("write after commit/abort")
        try:
            self._fh.write(data)
        except OSError as exc:
            self.abort()
            raise os_error(exc, "cannot write object") from exc

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
            if CWRITE is not None:
                return self._start_journaled_in_c(journal, key, final, buf, self._hash.digest())
            return self._start_journaled(journal, key, final, buf, self._hash.digest())
        if CWRITE is not None:
            return self._start_in_place(key, final, buf)
        return CommitInThread(self._store.committer().submit(self._commit_in_place, key, final, buf))

    def _commit_spooled(self, key: str, final: str) -> None:
        try:
            assert self._fh is not None, "commit after commit/abort"
            sync_all(self._fh.fileno())
            self._fh.close()
            self._fh = None
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
        assert CWRITE is not None
        notify = on_event_loop()
        self._store.make_dirs(os.path.dirname(final))
        if CWRITE.ordered_idle():
            file_job: Any = CWRITE.submit(final, buf, notify=notify)
        else:
            file_job = CreatedHere(CWRITE, final, buf)
        try:
            ticket = journal.write(key, digest, [buf], len(buf), writeback=False)
            prepared = journal.pending_sync(ticket)
            sync_job = (CWRITE.submit_sync(prepared[0], parallel=True, notify=notify)
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
                          CWRITE if notify else None)

    def _start_in_place(self, key: str, final: str, buf: bytearray) -> Commit:
        """:meth:`_commit_in_place` by ``_cwrite``'s writer threads for durable files (no Python thread)."""
        assert CWRITE is not None
        notify = on_event_loop()
        self._store.make_dirs(os.path.dirname(final))
        job = CWRITE.submit(final, buf, sync=True, sync_dir=True, direct=True, notify=notify)

        def settle() -> None:
            try:
                job.wait()
            except FileExistsError:  # the same key in the same nanosecond: the rare way, on this thread
                self._commit_in_place(key, final, buf)
            except OSError as exc:
                raise os_error(exc, f"cannot commit {key}") from exc

        return JobsCommit([job], settle, CWRITE if notify else None)

    def _commit_in_place(self, key: str, final: str, buf: bytearray) -> None:
        """Write the file in place and make it durable itself: ``fdatasync`` of the file, ``fsync`` of its directory.

        For objects of :data:`JOURNAL_MAX_BYTES` or more, whose data write is most of the cost: the journal would
        write them twice. A crash before this returns may leave the file short, as in :meth:`_commit_journaled`.
        """
        created = False
        try:
            if CWRITE is not None:  # the whole write, flush and directory sync in C, without the GIL
                self._store.make_dirs(os.path.dirname(final))
                with contextlib.suppress(FileExistsError):  # the same key in the same nanosecond: below
                    CWRITE.create_file(final, buf, True, True, True)
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
        if CWRITE is not None and not sync:
            with contextlib.suppress(FileExistsError):  # handled below
                CWRITE.create_file(final, buf, False, False, False)
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
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)


class FileBlobStore(BlobStore):
    """Objects as files under ``root``; the key is the relative path.

    ``node_id`` names the node this store belongs to when several share ``root``: its spool files and journal
    segments carry it, and opening the store clears or replays only its own (and those named in the single-node
    form, without a node id, which come from an archive that had one node). ``""``: that single-node form.
    """

    def __init__(self, root: str, *, journal: bool = True, node_id: str = "") -> None:
        if node_id and not is_node_id(node_id):
            raise ValueError(f"invalid node id {node_id!r}")
        self.node_id = node_id
        self.location = self.root = os.path.abspath(root)
        #: The capacity a new writer's buffer starts with: about the size of the last object committed from one.
        self.buffer_hint = 64 * 1024
        self.spool_dir = os.path.join(self.root, ".spool")
        self.journal_dir = os.path.join(self.root, ".journal")
        os.makedirs(self.spool_dir, exist_ok=True)
        self._known_dirs: set[str] = {self.root}
        # The journal needs fdatasync and pwritev (Linux; not macOS): elsewhere objects are fsync'd one by one.
        self._use_journal = journal and hasattr(os, "fdatasync") and hasattr(os, "pwritev")
        self._journal: Journal | None = None
        self._journal_failed_pid = 0
        self._pools: dict[str, ThreadPoolExecutor] = {}  # committer(), made on first use
        self._pools_pid = 0
        self._lazy_lock = threading.Lock()  # the journal is made on first use (or prepare), once
        # Journals of this node's processes that are gone hold objects whose files may not have reached the disk.
        self.replayed = self.replay_journal()
        # Spool files left by this node's processes that are gone are never visible objects; clear them. (They
        # are named after their node and process, so a command opening the store beside a live server spares its
        # files, and a node never takes another's: whether that one's process lives is not known on this host.)
        # A day-old file goes whatever its name says (a process id can be reused, e.g. 1 in a container).
        for name in os.listdir(self.spool_dir):
            path = os.path.join(self.spool_dir, name)
            node, pid = _spool_owner(name)
            with contextlib.suppress(OSError):
                if ((node in ("", node_id) and not _process_alive(pid))
                        or time.time() - os.stat(path).st_mtime > 86400):
                    os.unlink(path)

    def spool_path(self) -> str:
        """A new spool file's path, named after this node and process: ``<node>-<pid>-<uuid>``
        (``<pid>-<uuid>`` without a node id)."""
        name = f"{os.getpid()}-{uuid.uuid4().hex}"
        return os.path.join(self.spool_dir, f"{self.node_id}-{name}" if self.node_id else name)

    def journal_for(self, key: str, size: int) -> Journal | None:
        """This process's journal if an object of ``size`` bytes goes through it, else None."""
        if not self._use_journal:
            return None
        journal = self._journal
        pid = os.getpid()
        if journal is None or journal.pid != pid:  # none yet, or inherited across fork: not ours
            with self._lazy_lock:
                journal = self._journal
                if journal is None or journal.pid != pid:
                    if self._journal_failed_pid == pid:
                        return None
                    try:
                        journal = self._journal = Journal(self.journal_dir, self._checkpoint, node_id=self.node_id)
                    except OSError as exc:
                        self._journal_failed_pid = pid
                        log.warning("blob journal unavailable (%s): objects are fsync'd one by one", exc)
                        return None
        return journal if record_size(key, size) <= journal.capacity() else None

    def _checkpoint(self) -> None:
        """Make every file of the journal's records durable: the files still being written first."""
        if CWRITE is not None:
            CWRITE.barrier()
        sync_filesystem(self.root)

    def committer(self) -> ThreadPoolExecutor:
        """This process's commit threads: they write buffered objects and wait for the disk while the
        committing thread goes on (with the index transaction, in the ingest pipeline)."""
        return self._pool("bastion-blob-commit", COMMIT_THREADS)

    def _pool(self, name: str, threads: int) -> ThreadPoolExecutor:
        if self._pools_pid != os.getpid():  # threads do not survive a fork
            with self._lazy_lock:
                if self._pools_pid != os.getpid():
                    self._pools, self._pools_pid = {}, os.getpid()
        pool = self._pools.get(name)
        if pool is None:
            with self._lazy_lock:
                pool = self._pools.get(name)
                if pool is None:
                    pool = self._pools[name] = ThreadPoolExecutor(threads, thread_name_prefix=name)
        return pool

    def forget(self, key: str) -> None:
        """Record in the journal that ``key`` must not be replayed (deleted, or its commit failed after its record)."""
        journal = self._journal
        if journal is not None and journal.pid == os.getpid():
            try:
                journal.append(key, bytes(32), [], 0, kind=TOMBSTONE)
            except (OSError, ValueError) as exc:
                log.warning("blob journal: cannot record that %s is gone: %s", key, exc)

    def prepare(self) -> None:
        """Create this process's journal segments now, so that its first store does not wait for their zero-filling."""
        self.journal_for("", 0)

    def replay_journal(self) -> int:
        """Rewrite, from the journals of this node's processes that are gone, objects whose files are missing or
        incomplete.

        Returns how many files were rewritten. Runs when the store is opened; safe beside live processes, and
        beside other nodes sharing the store: their segments are theirs to replay
        (:func:`bastion.blobs.journal.orphaned_segments`).
        Keys are written once (a new version gets a new key), so a tombstone in any segment replayed together
        is final: an object deleted after its record stays deleted even when the tombstone went to another
        segment than the record, whichever segment is read first. The segments are removed only once all of
        them are applied and the files are durable: if one cannot be, all stay for the next open.
        """
        segments = list(orphaned_segments(self.journal_dir, self.node_id))
        restored = 0
        try:
            deleted: set[str] = set()
            failed = False
            for path, _fd in segments:
                try:
                    deleted.update(r.key for r in read_segment(path) if r.kind == TOMBSTONE)
                except OSError as exc:
                    log.error("cannot read blob journal %s: %s", path, exc)
                    failed = True
            replayed = []
            for path, _fd in segments:
                try:
                    rewritten, count = self._replay_segment(path, deleted)
                except OSError as exc:
                    log.error("cannot replay blob journal %s: %s", path, exc)
                    failed = True
                    continue
                replayed.append(path)
                restored += rewritten
                (log.warning if rewritten else log.info)(
                    "blob journal %s replayed: %d key(s), %d file(s) rewritten", os.path.basename(path),
                    count, rewritten)
            if replayed:
                sync_filesystem(self.root)
            if failed:  # a tombstone of a segment removed now would no longer cover the records of one kept
                log.error("blob journal: every segment kept until all can be replayed (at the next open)")
            else:
                for path in replayed:
                    os.unlink(path)
        except OSError as exc:
            log.error("cannot finish the blob journal replay: %s", exc)
        finally:
            for _path, fd in segments:
                os.close(fd)
        return restored

    def _replay_segment(self, path: str, deleted: set[str]) -> tuple[int, int]:
        """Apply one segment: keys in ``deleted`` are removed, other objects rewritten where their file does not
        hold them. Returns (files rewritten, keys seen)."""
        # Within a segment the last record of a key decides (an object whose commit failed after its record
        # stays gone), so a first pass finds it and the second applies only that one.
        last = {record.key: n for n, record in enumerate(read_segment(path))}
        rewritten = 0
        for n, record in enumerate(read_segment(path)):
            if last.get(record.key) != n:
                continue
            try:
                final = self.path_of(record.key)
            except StorageError:
                continue
            if record.kind == TOMBSTONE or record.key in deleted:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(final)
            elif record.kind == OBJECT and not holds(final, record.data):
                self._write_durably(final, record.data)
                rewritten += 1
        return rewritten, len(last)

    def _write_durably(self, final: str, data: bytes) -> None:
        tmp = self.spool_path()
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            sync_all(fh.fileno())
        self.make_dirs(os.path.dirname(final))
        os.rename(tmp, final)
        fsync_dir(os.path.dirname(final))

    def path_of(self, key: str) -> str:
        """The file path of ``key``; refuses keys that would leave the store."""
        # No empty part (a leading, trailing or doubled "/") and no part starting with "." (so no "." or "..").
        if not key or key[0] in "/." or key[-1] == "/" or "//" in key or "/." in key:
            raise StorageError(f"invalid blob key {key!r}")
        return os.path.join(self.root, key)

    def make_dirs(self, path: str) -> None:
        """Create ``path`` and its parents, fsync'ing each parent that gained an entry."""
        if path in self._known_dirs:
            return
        parent = os.path.dirname(path)
        if parent != path and parent not in self._known_dirs:
            self.make_dirs(parent)
        try:
            os.mkdir(path)
            fsync_dir(parent)
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
            raise os_error(exc, f"cannot read {key}") from exc

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
        self.forget(key)  # a replay after a crash must not bring the object back

    def set_aside(self, key: str) -> str | None:
        """Move the object to ``<root>/.quarantine/<key>`` (never served, listed or indexed from there)."""
        source = self.path_of(key)
        target = os.path.join(self.quarantine_dir, *key.split("/"))
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(source, target)
        except OSError as exc:
            raise os_error(exc, f"cannot set {key} aside") from exc
        return target

    @property
    def quarantine_dir(self) -> str:
        """Where :meth:`set_aside` keeps objects: ``<root>/.quarantine``."""
        return os.path.join(self.root, ".quarantine")

    def set_aside_count(self) -> int:
        return sum(len(files) for _, _, files in os.walk(self.quarantine_dir))

    def close(self) -> None:
        pools, self._pools = self._pools, {}
        if self._pools_pid == os.getpid():
            for pool in pools.values():
                pool.shutdown(wait=True)
        journal, self._journal = self._journal, None
        if journal is not None and journal.pid == os.getpid():
            if CWRITE is not None:  # no flush of _cwrite's may still name a segment the journal closes
                CWRITE.drain()
            try:
                journal.close()
            except OSError as exc:  # its segments stay and are replayed on the next open
                log.error("blob journal: final checkpoint failed: %s", exc)

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


_UUID_HEX = re.compile(r"[0-9a-f]{32}")


def _spool_owner(name: str) -> tuple[str, str]:
    """``(node id, process id)`` that a spool file's name gives: ``<node>-<pid>-<uuid>``; for the single-node
    form ``<pid>-<uuid>``, or a name of neither form, ``("", <the text before the first "-">)``."""
    parts = name.rsplit("-", 2)  # a uuid's hex holds no "-"; a node id may
    if len(parts) == 3 and is_node_id(parts[0]) and parts[1].isdigit() and _UUID_HEX.fullmatch(parts[2]):
        return parts[0], parts[1]
    return "", name.split("-", 1)[0]


def _process_alive(pid: str) -> bool:
    """True if ``pid`` (a spool file's process id) names a running process on this host, this one included."""
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
