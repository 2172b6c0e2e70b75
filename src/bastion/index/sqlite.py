"""SQLite index: the embedded default.

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

The change log (see :mod:`bastion.index.base`): ``changes.seq`` is the rowid, so SQLite hands out the largest
plus one; a new log (new index, :meth:`SqliteIndex.clear`, :meth:`SqliteIndex.start_log_after`) and the
continuation after a crash insert a row of kind :data:`~bastion.index.schema.FLOOR_KIND` at the ``seq`` to go on
after, which no read returns. Its durable high-water mark is the file ``<index>-seqmark``
(:mod:`bastion.index.seqmark`), covered after every commit that hands out a ``seq``.
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
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from bastion.errors import IndexFailure
from bastion.index import hidden, reports, sqlite_log, sqlite_record
from bastion.index.base import Change, Index, LogPosition, LogRead, Statistics, Version, outcome_of_write
from bastion.index.levels_sql import ALIAS, FIND_COLUMNS, FROM, INSTANCE_COLS, ORDER, dataset_of
from bastion.index.reports import ReportQuery, ReportRow
from bastion.index.rows import IndexRow, now_iso
from bastion.index.schema import TABLES, create_or_migrate
from bastion.index.seqmark import SeqMark
from bastion.index.sqlcompile import compile_conditions
from bastion.index.sqlite_damage import is_damage, note_damage, noted_damage
from bastion.index.sqlite_files import WRITER_LOCK_SUFFIX
from bastion.index.sqlite_log import log_floor as log_floor  # bastion.index.base opens it from here
from bastion.model.attributes import tag_hex
from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition, matches
from bastion.model.records import InstanceRecord, JsonDataset, StoredObject, StoreStatus, parse_object_key

log = logging.getLogger("bastion.index")

T = TypeVar("T")
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



def _rows(cursor: sqlite3.Cursor, noticed: Callable[[BaseException], None]) -> Iterator[tuple[Any, ...]]:
    """The rows of ``cursor`` one at a time; an SQLite error is an IndexFailure (shown to ``noticed`` first), and
    the cursor is closed."""
    try:
        yield from cursor
    except sqlite3.Error as exc:
        noticed(exc)
        raise IndexFailure(f"index query failed: {exc}") from exc
    finally:
        cursor.close()


def _write_error(error: BaseException) -> BaseException:
    """What a failed write raises: an SQLite error as an IndexFailure, anything else as it came."""
    return IndexFailure(f"index write failed: {error}") if isinstance(error, sqlite3.Error) else error


class SqliteIndex(Index):
    """The index in one SQLite database file (WAL mode)."""

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
        self._mark = SeqMark(path if path == self.location else None)
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
        self._open_log()

    def _open_log(self) -> None:
        """Keep the durable mark ahead of the log; a new, empty log starts after the mark (an index file made
        again beside the mark of the one it replaces)."""
        conn = self._reader()
        if not conn.execute("SELECT 1 FROM changes LIMIT 1").fetchone():
            mark = self._mark.read()
            if mark > sqlite_log.log_end(conn):
                def _start(conn: sqlite3.Connection) -> None:
                    if not conn.execute("SELECT 1 FROM changes LIMIT 1").fetchone():  # again, under the lock
                        sqlite_log.start_log(conn, mark, new_epoch=False)
                self._write(_start)
        self._mark.cover(sqlite_log.log_end(conn))

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

    # -- recording ---------------------------------------------------------------------------
    def _record_in_c(self, row: IndexRow, durable: Callable[[], None] | None) -> tuple[StoreStatus, int] | None:
        """``row`` recorded by the C recorder on the calling thread if no other write of this process runs or
        waits and it is the common case; None otherwise (nothing written)."""
        if self._recorder is None or not self._write_lock.acquire(blocking=False):
            return None
        try:
            recorded = sqlite_record.record_in_c(self._recorder, row, durable) if self._queue.empty() else None
            if recorded is not None:
                self._commits += 1
        except IndexFailure as exc:
            self._noticed(exc)
            raise
        finally:
            self._write_lock.release()
        if recorded is not None:
            self._mark.cover(recorded[1])
        return recorded

    def record(self, obj: StoredObject, durable: Callable[[], None] | None = None,
               same_content: Callable[[str], bool] | None = None, *,
               keep_outdated: bool = True) -> tuple[StoreStatus, int | None]:
        row = IndexRow.of(obj)
        recorded = self._record_in_c(row, durable)
        if recorded is not None:
            return recorded
        status, seq = self._write(lambda conn: sqlite_record.record(conn, row, same_content, keep_outdated), durable)
        if seq is not None:
            self._mark.cover(seq)
        return status, seq

    async def record_async(self, obj: StoredObject, same_content: Callable[[str], bool] | None = None, *,
                           keep_outdated: bool = True) -> tuple[StoreStatus, int | None]:
        """:meth:`record` for an event loop, for an object already durable: uncontended, the transaction runs
        here (statements and a commit that does not wait for the disk, in WAL mode); beside other writes of this
        process, it is queued to the writer thread, which commits the waiting ones together, and awaited.

        Cancelled while its write is queued, nothing is recorded and CancelledError is raised; once the writer
        thread has started the write, its outcome is awaited and returned (or raised) whatever the cancellation:
        CancelledError always means that nothing was recorded (the caller then removes the blob)."""
        row = IndexRow.of(obj)
        recorded = self._record_in_c(row, None)
        if recorded is not None:
            return recorded

        def write(conn: sqlite3.Connection) -> tuple[StoreStatus, int | None]:
            return sqlite_record.record(conn, row, same_content, keep_outdated)

        done, value = self._write_here(write, None)
        if not done:
            fut: Future[tuple[StoreStatus, int | None]] = Future()
            self._queue.put((write, fut))
            value = await outcome_of_write(fut)
        assert value is not None
        status, seq = value
        if seq is not None:
            self._mark.cover(seq)
        return status, seq

    def record_many(self, objs: Sequence[StoredObject]) -> list[tuple[StoreStatus, int | None]]:
        rows = [IndexRow.of(obj) for obj in objs]
        recorded = self._write(lambda conn: [sqlite_record.record(conn, row) for row in rows])
        self._mark.cover(max((seq for _, seq in recorded if seq is not None), default=0))
        return recorded

    def record_finding(self, kind: str, blob_key: str) -> Change:
        def _record(conn: sqlite3.Connection) -> Change:
            seq = sqlite_record.finding(conn, kind, blob_key)
            return Change(*conn.execute(f"SELECT {sqlite_log.CHANGE_COLS} FROM changes WHERE seq = ?", (seq,)).fetchone())
        change = self._write(_record)
        self._mark.cover(change.seq)
        return change

    def delete_instance(self, sop_uid: str) -> Change | None:
        def _delete(conn: sqlite3.Connection) -> Change | None:
            seq = sqlite_record.delete(conn, sop_uid)
            if seq is None:
                return None
            return Change(*conn.execute(f"SELECT {sqlite_log.CHANGE_COLS} FROM changes WHERE seq = ?", (seq,)).fetchone())
        change = self._write(_delete)
        if change is not None:
            self._mark.cover(change.seq)
        return change

    # -- deleted studies (bastion.index.hidden) ---------------------------------------------------------------
    def _changes_of(self, conn: sqlite3.Connection, seqs: list[int]) -> list[Change]:
        return [Change(*conn.execute(f"SELECT {sqlite_log.CHANGE_COLS} FROM changes WHERE seq = ?", (seq,)).fetchone())
                for seq in seqs]

    def _covered(self, changes: list[Change]) -> list[Change]:
        if changes:
            self._mark.cover(max(c.seq for c in changes))
        return changes

    def hide_study(self, study_uid: str) -> list[Change]:
        def _hide(conn: sqlite3.Connection) -> list[Change]:
            seqs = hidden.hide(conn.execute, lambda sop: sqlite_record.delete(conn, sop), study_uid)
            return self._changes_of(conn, seqs)
        return self._covered(self._write(_hide))

    def hidden_versions(self, study_uid: str) -> list[tuple[str, str]]:
        return hidden.hidden_versions(self._reader().execute, study_uid)

    def forget_hidden(self, study_uid: str, *, purged: bool) -> list[Change]:
        def _forget(conn: sqlite3.Connection) -> list[Change]:
            def change(sop: str, series: str, key: str) -> int:
                cur = conn.execute(sqlite_record.INSERT_CHANGE, ("deleted", sop, series, study_uid, key, now_iso()))
                return int(cur.lastrowid or 0)
            return self._changes_of(conn, hidden.forget(conn.execute, change if purged else None, study_uid))
        return self._covered(self._write(_forget))

    def hidden_blobs(self, blob_keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(blob_keys), _BATCH):
            found |= hidden.held(self._reader().execute, blob_keys[start:start + _BATCH])
        return found

    def set_tombstone(self, study_uid: str, entry: str | None) -> None:
        self._write(lambda conn: conn.execute(*hidden.tombstone_statement(study_uid, entry)))

    def tombstone(self, study_uid: str) -> str | None:
        row = self._reader().execute(hidden.TOMBSTONE, (study_uid,)).fetchone()
        return str(row[0]) if row else None

    def tombstones(self) -> list[str]:
        return [str(entry) for (entry,) in self._reader().execute(hidden.TOMBSTONES)]

    def put_report(self, row: ReportRow) -> None:
        self._write(lambda conn: reports.put(conn.execute, row))

    def report(self, report_id: str) -> ReportRow | None:
        return reports.one(self._reader().execute, report_id)

    def open_report(self, study_uid: str) -> ReportRow | None:
        return reports.open_of_study(self._reader().execute, study_uid)

    def reports(self, query: ReportQuery) -> list[ReportRow]:
        return reports.search(self._reader().execute, query)

    def studies_in_report_state(self, state: str, limit: int, offset: int = 0) -> list[str]:
        return reports.studies_in_state(self._reader().execute, state, limit, offset)

    def clear(self) -> None:
        def _clear(conn: sqlite3.Connection) -> LogPosition:
            for table in TABLES:
                if table != "changes":
                    conn.execute(f"DELETE FROM {table}")
            return sqlite_log.start_log(conn, 0)
        self._mark.cover(self._write(_clear).seq)

    def start_log_after(self, seq: int) -> LogPosition:
        start = self._write(lambda conn: sqlite_log.start_log(conn, seq))
        self._mark.cover(start.seq)
        return start

    def resume_log_after_crash(self) -> None:
        mark = self._mark.read()

        def _resume(conn: sqlite3.Connection) -> None:
            if mark > sqlite_log.log_end(conn):
                sqlite_log.insert_floor(conn, mark)
        self._write(_resume)
        self._mark.cover(mark)

    # -- reading -------------------------------------------------------------------------------
    def current(self, sop_uid: str) -> InstanceRecord | None:
        row = self._reader().execute(f"SELECT {INSTANCE_COLS} FROM instances i WHERE i.sop_uid = ?",
                                     (sop_uid,)).fetchone()
        return InstanceRecord(*row) if row else None

    def _select(self, level: QueryLevel, conditions: Sequence[Condition], columns: str,
                limit: int | None, offset: int) -> tuple[Iterator[tuple[Any, ...]], list[Condition]]:
        """Rows of ``columns`` for the SQL part of ``conditions``, and the conditions left for Python.

        Without residual conditions the SQL pages (``limit``/``offset``) and the rows are read at
        once; with them the rows come lazily, so a caller can stop after ``offset + limit`` matches.
        """
        compiled = compile_conditions(level, conditions)
        where = " AND ".join(compiled.where) or "1"
        params = list(compiled.params)
        if limit is not None and not compiled.residual:
            # Late materialisation: page through the (covering) indexes first, then read the
            # wide rows (attrs JSON) of that page only.
            alias = ALIAS[level]
            page = (f"SELECT {alias}.rowid FROM {FROM[level]} WHERE {where} "
                    f"ORDER BY {ORDER[level]} LIMIT ? OFFSET ?")
            sql = f"SELECT {columns} FROM {FROM[level]} WHERE {alias}.rowid IN ({page}) ORDER BY {ORDER[level]}"
            params += [limit, offset]
        else:
            sql = f"SELECT {columns} FROM {FROM[level]} WHERE {where} ORDER BY {ORDER[level]}"
        try:
            cursor = self._reader().execute(sql, params)
            if not compiled.residual:
                return iter(cursor.fetchall()), []
        except sqlite3.Error as exc:
            self._noticed(exc)
            raise IndexFailure(f"index query failed: {exc}") from exc
        return _rows(cursor, self._noticed), compiled.residual

    def find(self, level: QueryLevel, conditions: Sequence[Condition], *, limit: int | None = None,
             offset: int = 0) -> list[JsonDataset]:
        cols = FIND_COLUMNS[level]
        rows, residual = self._select(level, conditions, cols, limit, offset)
        if not residual:
            return [dataset_of(level, row) for row in rows]
        out: list[JsonDataset] = []
        wanted = None if limit is None else offset + limit  # rows come in order: stop once a page is full
        for row in rows:
            ds = dataset_of(level, row)
            if all(matches(c, ds.get(tag_hex(c.tag))) for c in residual):
                out.append(ds)
                if wanted is not None and len(out) >= wanted:
                    break
        return out if wanted is None else out[offset:wanted]

    def instances(self, level: QueryLevel, conditions: Sequence[Condition]) -> list[InstanceRecord]:
        rows, residual = self._select(QueryLevel.IMAGE, conditions,
                                      INSTANCE_COLS + ", p.attrs, s.attrs, se.attrs, i.attrs", None, 0)
        out = []
        for row in rows:
            if residual:
                ds = dataset_of(QueryLevel.IMAGE, (*row[8:12], row[4], row[2]))
                if not all(matches(c, ds.get(tag_hex(c.tag))) for c in residual):
                    continue
            out.append(InstanceRecord(*row[:8]))
        return out

    def last_stamp(self) -> str | None:
        # The newest "stored" change: its stamp is the newest, give or take the milliseconds between taking
        # a stamp and committing in another process (recovery starts an hour before it anyway).
        conn = self._reader()
        for (key,) in conn.execute("SELECT blob_key FROM changes WHERE kind = 'stored' ORDER BY seq DESC LIMIT 1"):
            parts = parse_object_key(key)
            if parts is not None:
                return parts["stamp"]
        row = conn.execute("SELECT max(s) FROM (SELECT max(stamp) AS s FROM instances "
                           "UNION ALL SELECT max(stamp) FROM versions)").fetchone()  # no change log: scan
        return row[0] if row and row[0] else None

    def has_blob(self, blob_key: str) -> bool:
        conn = self._reader()
        parts = parse_object_key(blob_key)
        if parts is not None:  # the key names its SOP Instance UID: a primary-key lookup
            current = conn.execute("SELECT 1 FROM instances WHERE sop_uid = ? AND blob_key = ?",
                                   (parts["sop"], blob_key)).fetchone()
        else:
            current = conn.execute("SELECT 1 FROM instances WHERE blob_key = ?", (blob_key,)).fetchone()
        return bool(current or conn.execute("SELECT 1 FROM versions WHERE blob_key = ?", (blob_key,)).fetchone())

    def held_blobs(self, blob_keys: Sequence[str]) -> set[str]:
        conn = self._reader()
        held: set[str] = set()
        for start in range(0, len(blob_keys), _BATCH):
            chunk = list(blob_keys[start:start + _BATCH])
            marks = ",".join("?" * len(chunk))
            sops = [(parse_object_key(key) or {}).get("sop", "") for key in chunk]  # the primary key: no scan
            current = {key for (key,) in conn.execute(
                f"SELECT blob_key FROM instances WHERE sop_uid IN ({marks})", sops)}
            held.update(key for key in chunk if key in current)
            held.update(key for (key,) in conn.execute(f"SELECT blob_key FROM versions WHERE blob_key IN ({marks})",
                                                       chunk))
        return held

    def versions(self) -> Iterator[Version]:
        conn = self._connect()
        try:
            for key, digest, size in conn.execute("SELECT blob_key, digest, size FROM instances"):
                yield Version(key, digest, size, True)
            for key, digest, size in conn.execute("SELECT blob_key, digest, size FROM versions"):
                yield Version(key, digest, size, False)
        finally:
            conn.close()

    def changes(self, since: int = 0, limit: int = 100) -> list[Change]:
        return sqlite_log.changes(self._reader(), since, limit)

    def changes_after(self, position: LogPosition, limit: int = 100) -> LogRead:
        conn = self._reader()
        conn.execute("BEGIN")  # one snapshot: the epoch and the entries of the same log
        try:
            epoch, start = sqlite_log.log_meta(conn)
            if position.epoch != epoch or position.seq > sqlite_log.log_end(conn):
                return LogRead((), LogPosition(epoch, start), reset=True)
            found = tuple(sqlite_log.changes(conn, position.seq, limit))
        finally:
            conn.execute("COMMIT")
        return LogRead(found, LogPosition(epoch, found[-1].seq) if found else position)

    def log_start(self) -> LogPosition:
        return LogPosition(*sqlite_log.log_meta(self._reader()))

    def log_end(self) -> LogPosition:
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            return LogPosition(sqlite_log.log_meta(conn)[0], sqlite_log.log_end(conn))
        finally:
            conn.execute("COMMIT")

    def last_change_seq(self) -> int:
        return sqlite_log.log_end(self._reader())

    def statistics(self) -> Statistics:
        conn = self._reader()

        def one(sql: str) -> int:
            try:
                return int(conn.execute(sql).fetchone()[0] or 0)
            except sqlite3.Error as exc:
                self._noticed(exc)
                raise IndexFailure(f"index query failed: {exc}") from exc

        return Statistics(
            patients=one("SELECT count(*) FROM patients"), studies=one("SELECT count(*) FROM studies"),
            series=one("SELECT count(*) FROM series"), instances=one("SELECT count(*) FROM instances"),
            versions=one("SELECT count(*) FROM versions"),
            stored_bytes=one("SELECT (SELECT coalesce(sum(size),0) FROM instances) + "
                             "(SELECT coalesce(sum(size),0) FROM versions)"),
            last_change=one("SELECT coalesce(max(seq), 0) FROM changes"),
            stored_last_minute=sqlite_log.stored_since(
                conn, (datetime.now(UTC) - timedelta(minutes=1)).isoformat(timespec="milliseconds")))

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
