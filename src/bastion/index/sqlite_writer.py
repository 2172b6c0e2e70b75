"""The connections of a SQLite index and the writes on them: the writer thread and its group commit, the lock
that the writers of every process share, and the checkpoints (:class:`SqliteWriter`, which
:class:`bastion.index.sqlite.SqliteIndex` is).

All writes go through one writer thread that commits waiting writes together (group
commit). WAL mode with ``synchronous=NORMAL``: a commit survives a crash of the process
(``kill -9``) at once, and the WAL is fsync'd at checkpoints, which a thread of their own runs four times a second
while there are commits (never a commit that a C-STORE waits for). A power failure can lose the
last commits of the index, never of the blobs (durable before the commit): after an
unclean shutdown :func:`bastion.ingest.rebuild.recover` re-indexes the objects stored since
the newest indexed stamp, so the index stays a rebuildable cache. Reads use one connection
per thread.

Every write transaction of every process, and every checkpoint, holds one lock: an ``flock`` of the file
``<index>-writer.lock``. So no checkpoint ever runs beside a commit, which rules out SQLite's WAL-reset bug
(https://sqlite.org/wal.html#walresetbug, every version from 3.7.0 to 3.51.2: a checkpoint that starts while
another connection's commit starts the WAL over can later skip frames, losing committed transactions and
corrupting the database). It is the likeliest cause of the corruption Bastion's drills met about once in four
runs of 20,000 instances: checkpoint threads in every process beside commits that never pause make the race
likely, where ordinary use meets it less often than a failing disk. A checkpoint holding the lock also
copies every frame, so the next commit starts the WAL over: it never grows past the commits of one checkpoint
period.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from bastion.errors import IndexFailure
from bastion.index import sqlite_record
from bastion.index.schema import create_or_migrate
from bastion.index.sqlite_damage import is_damage, note_damage, noted_damage
from bastion.index.sqlite_files import WRITER_LOCK_SUFFIX

log = logging.getLogger("bastion.index")

T = TypeVar("T")
#: The most waiting writes the writer thread commits together, in one transaction.
_BATCH = 256
#: Readers map the database file: a new reader thread (the HTTP thread pool has many) then reads pages
#: from the OS page cache without copying them into a cold per-connection cache first.
_MMAP_BYTES = 1 << 34
#: What the WAL keeps of its file when a writer starts it over from the beginning (SQLite truncates the rest). A
#: frame (24-byte header, then the page) never fills whole file pages, so the kernel reads any file page it
#: writes that is no longer cached before writing into it, and a commit into a large old WAL waits for such
#: reads. Past this size the WAL grows into new file pages instead, which are not read (see BENCHMARKS.md,
#: "The SQLite index").
_WAL_KEEP_BYTES = 32 * 1024 * 1024
#: How often the checkpoint thread copies the WAL into the database while there are commits.
_CHECKPOINT_S = 0.25

#: The settings of every connection (after ``journal_mode=WAL``, which the file keeps).
#: No connection checkpoints on its own (``wal_autocheckpoint=0``): only the checkpoint thread does, holding the
#: writers' lock (see the module docstring).
_PRAGMAS = ("synchronous=NORMAL", "busy_timeout=60000", "cache_size=-65536", f"mmap_size={_MMAP_BYTES}",
            f"journal_size_limit={_WAL_KEEP_BYTES}", "wal_autocheckpoint=0")
#: The C Recorder's connection (:mod:`bastion.index.sqlite_record`): the same.
_RECORDER_PRAGMAS = "; ".join(f"PRAGMA {p}" for p in _PRAGMAS)


def _write_error(error: BaseException) -> BaseException:
    """What a failed write raises: an SQLite error as an IndexFailure, anything else as it came."""
    return IndexFailure(f"index write failed: {error}") if isinstance(error, sqlite3.Error) else error


class SqliteWriter:
    """The connections of one SQLite index (a file, or a database in memory) and the writes on them."""

    def __init__(self, path: str) -> None:
        self.location = path
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        else:
            # A name of its own: shared cache lets this index's connections (one per thread) meet,
            # but two in-memory indexes in one process must not see each other's data.
            path = f"file:bastion-index-{uuid.uuid4().hex}?mode=memory&cache=shared"
        self._path = path
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._queue: queue.Queue[tuple[Callable[[sqlite3.Connection], Any], Future[Any]] | None] = queue.Queue()
        # Writers of other processes (the server's workers, a CLI import beside it) queue on this lock in the
        # kernel, woken as soon as it is free; SQLite's own busy handler sleeps 1 ms, then longer, each time it
        # finds the database locked (see BENCHMARKS.md, "The SQLite index").
        self._lock_fd = -1
        if path == self.location:
            self._lock_fd = self._open_writer_lock()
        self._writer_conn = self._connect()
        with self._writers_excluded(self._lock_fd):
            create_or_migrate(self._writer_conn)
        # the common record in C, on a connection of its own (a file only: it shares the writer lock)
        self._recorder = (sqlite_record.open_recorder(path, self._lock_fd, _RECORDER_PRAGMAS)
                          if self._lock_fd >= 0 else None)
        self._thread = threading.Thread(target=self._run_writer, name="bastion-index-writer", daemon=True)
        self._thread.start()
        self._commits = 0
        self._stop_checkpoints = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if path == self.location:  # a file: WAL checkpoints off the commit path, in a thread of ours
            self._checkpointer = threading.Thread(target=self._run_checkpointer, name="bastion-index-checkpoint",
                                                  daemon=True)
            self._checkpointer.start()

    # -- damage --------------------------------------------------------------------------
    def _noticed(self, error: BaseException) -> None:
        """Note an error that says the file is damaged, for every process (:mod:`bastion.index.sqlite_damage`)."""
        if self._path != self.location or not is_damage(error):
            return
        if note_damage(self.location, str(error)):
            log.critical("the index %s is damaged (%s): queries may miss instances and stores may be refused. "
                         "Run `bastion index rebuild` (the server rebuilds it beside the live one and switches it in), "
                         "or restart `bastion serve` (it moves the file aside and rebuilds the index while it "
                         "serves). Nothing stored is lost: the stored files are the archive.", self.location, error)

    def damage(self) -> str | None:
        """What a process of this node noted of the damage of this index file, or None."""
        return noted_damage(self.location) if self._path == self.location else None

    # -- connections -------------------------------------------------------------------
    def _open_writer_lock(self) -> int:
        """A new file description of the lock file that the index's writers ``flock`` (a file index only)."""
        return os.open(os.path.abspath(self._path) + WRITER_LOCK_SUFFIX, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, timeout=60, isolation_level=None, check_same_thread=False,
                               uri=self._path.startswith("file:"))
        conn.execute("PRAGMA journal_mode=WAL")
        for pragma in _PRAGMAS:
            conn.execute(f"PRAGMA {pragma}")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def _run_checkpointer(self) -> None:
        """Copy the WAL into the database every :data:`_CHECKPOINT_S` while this process commits
        (:meth:`checkpoint`)."""
        conn = self._connect()
        lock_fd = self._open_writer_lock()  # a file description of its own: this process's writers wait too
        done = self._commits  # this process's commits at the last checkpoint
        try:
            while not self._stop_checkpoints.wait(_CHECKPOINT_S):
                commits = self._commits
                if commits == done:
                    continue
                try:
                    self._checkpoint(conn, lock_fd)
                except sqlite3.Error as exc:
                    log.warning("index checkpoint failed (the next one retries): %s", exc)
                done = commits
        finally:
            os.close(lock_fd)
            conn.close()

    def checkpoint(self) -> None:
        """Copy the WAL into the database now, holding the writers' lock (a file index only)."""
        if self._path != self.location:
            return
        conn = self._connect()
        lock_fd = self._open_writer_lock()
        try:
            self._checkpoint(conn, lock_fd)
        finally:
            os.close(lock_fd)
            conn.close()

    @classmethod
    def _checkpoint(cls, conn: sqlite3.Connection, lock_fd: int) -> None:
        """A passive checkpoint on ``conn`` with no write transaction of any process at work (see the module
        docstring): the writers wait for its copy of the frames and its two ``fsync`` calls."""
        with cls._writers_excluded(lock_fd):
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    @staticmethod
    @contextlib.contextmanager
    def _writers_excluded(lock_fd: int) -> Iterator[None]:
        """Hold the lock that every writer of the index takes (``lock_fd`` < 0: an in-memory index, no lock)."""
        if lock_fd < 0:
            yield
            return
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)

    # -- the writer thread ----------------------------------------------------------------
    def _run_writer(self) -> None:
        conn = self._writer_conn
        while True:
            item = self._queue.get()
            if item is None:
                return
            with self._write_lock:
                batch = [item]
                while len(batch) < _BATCH:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        self._queue.put(None)
                        break
                    batch.append(nxt)
                # A write whose waiter cancelled it (record_async) is not run; the others can no longer be.
                batch = [(fn, fut) for fn, fut in batch if fut.set_running_or_notify_cancel()]
                if batch:
                    self._commit_batch(conn, batch)

    def _commit_batch(self, conn: sqlite3.Connection,
                      batch: Sequence[tuple[Callable[[sqlite3.Connection], Any], Future[Any]]],
                      durable: Callable[[], None] | None = None) -> None:
        """Run ``batch`` in one transaction; a failing write (in its savepoint) fails only itself.

        ``durable`` (a batch of one only) is called before the commit; if it raises, the write is rolled back.
        """
        for fut, value, error in self._locked_transaction(conn, batch, durable):  # wake them once the lock is free
            if error is None:
                fut.set_result(value)
            else:
                self._noticed(error)
                fut.set_exception(_write_error(error))

    def _locked_transaction(self, conn: sqlite3.Connection, batch: Sequence[tuple[Callable[[sqlite3.Connection], Any],
                            Future[Any] | None]], durable: Callable[[], None] | None = None,
                            ) -> list[tuple[Any, Any, BaseException | None]]:
        """:meth:`_transaction` holding the writer lock that the index's processes share."""
        with self._writers_excluded(self._lock_fd):
            return self._transaction(conn, batch, durable)

    def _transaction(self, conn: sqlite3.Connection, batch: Sequence[tuple[Callable[[sqlite3.Connection], Any],
                     Future[Any] | None]], durable: Callable[[], None] | None = None,
                     ) -> list[tuple[Any, Any, BaseException | None]]:
        """The outcome of each write of ``batch`` (with the future it came with), run in one transaction."""
        results: list[tuple[Any, Any, BaseException | None]] = []
        single = len(batch) == 1
        assert durable is None or single
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, fut in batch:
                if not single:
                    conn.execute("SAVEPOINT one")
                try:
                    results.append((fut, fn(conn), None))
                    if durable is not None:
                        durable()
                    if not single:
                        conn.execute("RELEASE one")
                except Exception as exc:  # one bad write must not fail the others
                    conn.execute("ROLLBACK" if single else "ROLLBACK TO one")
                    if single:
                        return [(fut, None, exc)]
                    conn.execute("RELEASE one")
                    results.append((fut, None, exc))
            conn.execute("COMMIT")
            self._commits += 1
        except sqlite3.Error as exc:
            self._noticed(exc)
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            failure = IndexFailure(f"index commit failed: {exc}")
            return [(fut, None, failure) for _, fut in batch]
        return results

    def _write(self, fn: Callable[[sqlite3.Connection], T], durable: Callable[[], None] | None = None) -> T:
        # Uncontended: commit on the calling thread (a hand-off to the writer thread costs more than
        # the transaction), waiting for ``durable`` inside it. Contended: wait for ``durable`` first, then
        # queue, and the writer thread commits the waiting ones together.
        done, value = self._write_here(fn, durable)
        if done:
            return value  # type: ignore[return-value]
        if durable is not None:
            durable()
        fut: Future[T] = Future()
        self._queue.put((fn, fut))
        return fut.result()

    def _write_here(self, fn: Callable[[sqlite3.Connection], T],
                    durable: Callable[[], None] | None) -> tuple[bool, T | None]:
        """Run ``fn`` in a transaction on the calling thread if no other write is running or queued in this
        process: ``(True, its value)``; ``(False, None)`` otherwise (nothing done)."""
        if not self._write_lock.acquire(blocking=False):
            return False, None
        try:
            if not self._queue.empty():
                return False, None
            [(_, value, error)] = self._locked_transaction(self._writer_conn, [(fn, None)], durable)
            if error is not None:
                self._noticed(error)
                raise _write_error(error)
            return True, value
        finally:
            self._write_lock.release()

    def close(self) -> None:
        self.closed = True
        if self._recorder is not None:
            self._recorder.close()
        self._stop_checkpoints.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=10)
        self._queue.put(None)
        self._thread.join(timeout=10)
        self._writer_conn.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
