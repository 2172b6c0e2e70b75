"""SQLite index: the embedded default.

Its connections and writes are :class:`bastion.index.sqlite_writer.SqliteWriter`'s: one writer thread that
commits waiting writes together (group commit), in WAL mode, every write transaction and every checkpoint of
every process holding one lock (see :mod:`bastion.index.sqlite_writer`). After an unclean shutdown
:func:`bastion.ingest.rebuild.recover` re-indexes the objects stored since the newest indexed stamp, so the index
stays a rebuildable cache. Reads use one connection per thread.

The change log (see :mod:`bastion.index.base`): ``changes.seq`` is the rowid, so SQLite hands out the largest
plus one; a new log (new index, :meth:`SqliteIndex.clear`, :meth:`SqliteIndex.start_log_after`) and the
continuation after a crash insert a row of kind :data:`~bastion.index.schema.FLOOR_KIND` at the ``seq`` to go on
after, which no read returns. Its durable high-water mark is the file ``<index>-seqmark``
(:mod:`bastion.index.seqmark`), covered after every commit that hands out a ``seq``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from typing import Any

from bastion.errors import IndexFailure
from bastion.index import hidden, reports, sqlite_log, sqlite_record
from bastion.index.base import Change, Index, LogPosition, LogRead, Statistics, Version, outcome_of_write
from bastion.index.levels_sql import ALIAS, FIND_COLUMNS, FROM, INSTANCE_COLS, ORDER, dataset_of
from bastion.index.reports import ReportQuery, ReportRow
from bastion.index.rows import IndexRow, now_iso
from bastion.index.schema import TABLES
from bastion.index.seqmark import SeqMark
from bastion.index.sqlcompile import compile_conditions
from bastion.index.sqlite_log import log_floor as log_floor  # bastion.index.base opens it from here
from bastion.index.sqlite_writer import SqliteWriter
from bastion.model.attributes import tag_hex
from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition, matches
from bastion.model.records import InstanceRecord, JsonDataset, StoredObject, StoreStatus, parse_object_key

#: The blob keys one query looks up (``IN (...)``).
_BATCH = 256


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


class SqliteIndex(SqliteWriter, Index):
    """The index in one SQLite database file (WAL mode)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._mark = SeqMark(self._path if self._path == self.location else None)
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
