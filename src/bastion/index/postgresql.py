"""PostgreSQL index: one database that several nodes record into and query at once.

The location is a libpq URL (:mod:`bastion.index.pg_schema`: ``postgresql://USER@HOST:PORT/DB``, multi-host URLs
as libpq takes them, and ``bastion_schema=NAME`` to keep the index in a schema of its own). Opening connects
once (an unreachable or misconfigured server is an :class:`~bastion.errors.IndexFailure` on one line within
about ten seconds), creates or migrates the schema (yoyo-migrations, under an advisory lock) and then works
through a small pool of connections (psycopg 3).

Every method has the meaning of :class:`bastion.index.sqlite.SqliteIndex`'s; searches compile through the same
engine (:func:`bastion.index.sqlcompile.compile_conditions`, PostgreSQL dialect) and come in the same order.
What differs:

* **Several writers.** Each write is one short transaction; the object's bytes are made durable before it starts
  (``durable``), so a transaction never waits for storage. Writers of one study take turns; the rest run side by
  side (:mod:`bastion.index.pg_record`). A transaction that meets a deadlock, a serialization failure or another
  node's insert of the same row is run again, up to :data:`~bastion.index.pg_transactions.ATTEMPTS` times
  (:mod:`bastion.index.pg_transactions`, which also holds the pool and the one-statement record).
* **The change log.** ``seq`` comes from a sequence, so it is never reused; a new log (:meth:`clear`,
  :meth:`start_log_after`) moves the sequence past every ``seq`` handed out before. Transactions commit in
  another order than they took their ``seq``, so a reader returns entries only up to the first ``seq`` that is
  missing but may still commit: where the entries after a position are not consecutive it waits, once, for the
  transactions that hold a ``seq`` to end (:func:`bastion.index.pg_record.settle`), after which what is still
  missing never comes. A consumer thus sees every entry once, in order. PostgreSQL's commits are durable and
  its sequences never go back, so :meth:`resume_log_after_crash` has nothing to do (the epoch stays).
"""

from __future__ import annotations

import contextlib
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
from psycopg import Cursor

from bastion.errors import BastionError
from bastion.index import hidden, pg_record, reports
from bastion.index.base import Change, Index, LogPosition, LogRead, Statistics, Version, outcome_of_write
from bastion.index.levels_sql import FIND_COLUMNS, FROM, INSTANCE_COLS, dataset_of
from bastion.index.pg_schema import connect, other_connections, parse_location, read_log_floor
from bastion.index.pg_transactions import SNAPSHOT, PgTransactions
from bastion.index.reports import ReportQuery, ReportRow
from bastion.index.rows import IndexRow
from bastion.index.schema import TABLES
from bastion.index.sqlcompile import POSTGRESQL, compile_conditions
from bastion.index.sqlite_log import CHANGE_COLS
from bastion.model.attributes import tag_hex
from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition, matches
from bastion.model.records import InstanceRecord, JsonDataset, StoredObject, StoreStatus, parse_object_key

T = TypeVar("T")

#: Rows read at a time by a search whose conditions are partly matched in Python (it stops once a page is full).
_FETCH = 500
#: How many series an index remembers having recorded into (:class:`RecentKeys`; a UID each).
SERIES_REMEMBERED = 1024



class RecentKeys:
    """The last ``size`` keys added (the oldest go first); safe to use from several threads."""

    def __init__(self, size: int) -> None:
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def known(self, key: str) -> bool:
        return key in self._keys

    def add(self, key: str) -> None:
        with self._lock:
            self._keys[key] = None
            self._keys.move_to_end(key)
            while len(self._keys) > self._size:
                self._keys.popitem(last=False)

#: The order of each level's results: :data:`bastion.index.levels_sql.ORDER` (SQLite's ``NOCASE`` is ``lower()``
#: here, and SQLite sorts NULL first).
_ORDER = {
    QueryLevel.PATIENT: "lower(p.patient_name), p.patient_id",
    QueryLevel.STUDY: "s.study_date DESC, s.study_time DESC, s.study_uid",
    QueryLevel.SERIES: "se.study_uid, se.series_number NULLS FIRST, se.series_uid",
    QueryLevel.IMAGE: "i.series_uid, i.instance_number NULLS FIRST, i.sop_uid",
}


#: A term of a search's SQL on the patient's row (alias ``p``), and the patient's name on the study row.
_PATIENT_TERM = re.compile(r"\bp\.")
_NAME_KEY = "s.patient_name_key"


def log_floor(location: str) -> int:
    """:func:`bastion.index.base.log_floor` for a PostgreSQL index: the highest ``seq`` its log handed out (0 if
    the database holds no index yet), read without changing it."""
    return read_log_floor(parse_location(location))


def rebuild_in_place(location: str, build: Callable[[Index], T]) -> T:
    """``bastion index rebuild`` for a PostgreSQL index (what :func:`bastion.index.sqlite_files.rebuild_into` is
    for a SQLite file): the index at ``location`` is emptied (:meth:`PostgresIndex.clear`, a new log after every
    ``seq`` handed out) and given to ``build`` to fill; ``build``'s result.

    Not atomic: searches see the index empty, then filling, until ``build`` returns, and a failed build leaves
    it partly filled (run it again). So it refuses (BastionError) while any other process, on any node, has the
    index open (:func:`~bastion.index.pg_schema.other_connections`): every node must be stopped first."""
    where = parse_location(location)
    conn = connect(where)
    try:
        others = other_connections(conn, where)
    finally:
        conn.close()
    if others:
        raise BastionError(f"the index at {where.where} (schema {where.schema}) is in use by {others} other "
                           "connection(s), a running node: stop every node first")
    index = PostgresIndex(location)
    try:
        index.clear()
        return build(index)
    finally:
        index.close()


def _matching(level: QueryLevel, rows: Iterator[Sequence[Any]], residual: Sequence[Condition],
              wanted: int | None) -> Iterator[tuple[Sequence[Any], JsonDataset]]:
    """The rows whose dataset (the level's, from the first columns of each row) matches ``residual``, with it; at
    most ``wanted``."""
    found = 0
    for row in rows:
        ds = dataset_of(level, tuple(row))
        if all(matches(c, ds.get(tag_hex(c.tag))) for c in residual):
            yield row, ds
            found += 1
            if wanted is not None and found >= wanted:
                return


class PostgresIndex(PgTransactions, Index):
    """The index in a PostgreSQL database (one schema of it)."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        #: A ``seq`` up to which the log is known to be final (it only grows; a race that stores a smaller one
        #: loses nothing but a wait).
        self._settled = 0
        #: The series this process recorded into lately: only their instances can be the one-statement record's
        #: (the first of a series never is, and trying would cost a round trip).
        self._series = RecentKeys(SERIES_REMEMBERED)
        self._record_new_failed = False  # logged once
        try:
            self._settle()
        except BaseException:
            self.close()
            raise

    # -- recording ----------------------------------------------------------------------------------------------
    def record(self, obj: StoredObject, durable: Callable[[], None] | None = None,
               same_content: Callable[[str], bool] | None = None, *,
               keep_outdated: bool = True) -> tuple[StoreStatus, int | None]:
        """:meth:`Index.record`; ``durable`` returns before the transaction begins (it never waits for storage)."""
        row = IndexRow.of(obj)
        if durable is not None:
            durable()
        series = row.instance.series_uid
        if self._series.known(series):
            recorded = self._record_new(row)
            if recorded is not None:
                return recorded
        (status, slot), tx = self._write(lambda tx: pg_record.record(tx, row, same_content, keep_outdated))
        self._series.add(series)
        return status, None if slot is None else tx.seqs[slot]

    async def record_async(self, obj: StoredObject, same_content: Callable[[str], bool] | None = None, *,
                           keep_outdated: bool = True) -> tuple[StoreStatus, int | None]:
        """:meth:`record` in a thread of the index, for an event loop. Cancelled before the thread has started it,
        nothing is recorded and CancelledError is raised; once started, its outcome is awaited and returned (or
        raised) whatever the cancellation: CancelledError always means that nothing was recorded."""
        return await outcome_of_write(self._threads.submit(self.record, obj, None, same_content,
                                                                keep_outdated=keep_outdated))

    def record_many(self, objs: Sequence[StoredObject]) -> list[tuple[StoreStatus, int | None]]:
        """Record ``objs`` in order, in one transaction."""
        rows = [IndexRow.of(obj) for obj in objs]
        recorded, tx = self._write(lambda tx: [pg_record.record(tx, row) for row in rows])
        return [(status, None if slot is None else tx.seqs[slot]) for status, slot in recorded]

    def record_finding(self, kind: str, blob_key: str) -> Change:
        (sop_uid, series_uid, study_uid, slot), tx = self._write(lambda tx: pg_record.finding(tx, kind, blob_key))
        return Change(tx.seqs[slot], kind, sop_uid, series_uid, study_uid, blob_key, tx.at)

    def delete_instance(self, sop_uid: str) -> Change | None:
        deleted, tx = self._write(lambda tx: pg_record.delete(tx, sop_uid))
        if deleted is None:
            return None
        series_uid, study_uid, key, slot = deleted
        return Change(tx.seqs[slot], "deleted", sop_uid, series_uid, study_uid, key, tx.at)

    # -- deleted studies (bastion.index.hidden) ---------------------------------------------------------------
    @staticmethod
    def _ex(run: Callable[..., Cursor[Any]]) -> hidden.Execute:
        return lambda statement, params: run(hidden.postgresql(statement), params)

    def hide_study(self, study_uid: str) -> list[Change]:
        def remove(tx: pg_record.Tx, sop: str) -> tuple[str, str, str, str, int] | None:
            found = pg_record.delete(tx, sop)
            return None if found is None else (sop, *found)

        def hide(tx: pg_record.Tx) -> list[tuple[str, str, str, str, int]]:
            tx.lock_studies(study_uid)
            return hidden.hide(self._ex(tx.execute), lambda sop: remove(tx, sop), study_uid)
        removed, tx = self._write(hide)
        return [Change(tx.seqs[slot], "deleted", sop, series, study, key, tx.at)
                for sop, series, study, key, slot in removed]

    def hidden_versions(self, study_uid: str) -> list[tuple[str, str]]:
        return self._read(lambda cur: hidden.hidden_versions(self._ex(cur.execute), study_uid))

    def forget_hidden(self, study_uid: str, *, purged: bool) -> list[Change]:
        def forget(tx: pg_record.Tx) -> list[tuple[str, str, str, int]]:
            tx.lock_studies(study_uid)
            return hidden.forget(self._ex(tx.execute),
                                 (lambda sop, series, key: (sop, series, key, tx.change("deleted", sop, series,
                                                                                        study_uid, key)))
                                 if purged else None, study_uid)
        made, tx = self._write(forget)
        return [Change(tx.seqs[slot], "deleted", sop, series, study_uid, key, tx.at) for sop, series, key, slot in made]

    def hidden_blobs(self, blob_keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(blob_keys), 1000):
            chunk = list(blob_keys[start:start + 1000])
            found |= self._read(lambda cur, chunk=chunk: hidden.held(self._ex(cur.execute), chunk))  # type: ignore[misc]
        return found

    def set_tombstone(self, study_uid: str, entry: str | None) -> None:
        statement, params = hidden.tombstone_statement(study_uid, entry)
        self._write(lambda tx: tx.execute(hidden.postgresql(statement), params))

    def tombstone(self, study_uid: str) -> str | None:
        row = self._read(lambda cur: cur.execute(hidden.postgresql(hidden.TOMBSTONE), (study_uid,)).fetchone())
        return str(row[0]) if row else None

    def tombstones(self) -> list[str]:
        return [str(e) for (e,) in self._read(lambda cur: cur.execute(hidden.TOMBSTONES).fetchall())]

    def put_report(self, row: ReportRow) -> None:
        self._write(lambda tx: reports.put(self._ex(tx.execute), row))

    def report(self, report_id: str) -> ReportRow | None:
        return self._read(lambda cur: reports.one(self._ex(cur.execute), report_id))

    def open_report(self, study_uid: str) -> ReportRow | None:
        return self._read(lambda cur: reports.open_of_study(self._ex(cur.execute), study_uid))

    def reports(self, query: ReportQuery) -> list[ReportRow]:
        return self._read(lambda cur: reports.search(self._ex(cur.execute), query))

    def studies_in_report_state(self, state: str, limit: int, offset: int = 0) -> list[str]:
        return self._read(lambda cur: reports.studies_in_state(self._ex(cur.execute), state, limit, offset))

    def _start_log(self, after: int, tables: Sequence[str]) -> LogPosition:
        """Empty ``tables`` and the log, and start a new log after ``after`` and every ``seq`` handed out before.

        The level tables are emptied first, which waits for the writers at work (they hold their tables), then the
        log's lock is taken, which waits for those committing (they hold it), then the log is emptied: no writer
        holds one lock while waiting for the other."""
        def start(tx: pg_record.Tx) -> LogPosition:
            levels = [t for t in tables if t != "changes"]
            if levels:
                pg_record.clear_tables(tx, levels)
            floor = max(after, pg_record.settle(tx.cur, tx.schema), self._meta(tx.cur)[1])
            pg_record.clear_tables(tx, ["changes"])
            if floor > 0:
                tx.execute("SELECT setval('changes_seq', %s, true)", (floor,))
            epoch = uuid.uuid4().hex
            tx.execute("UPDATE meta SET value = CASE key WHEN 'log_epoch' THEN %s ELSE %s END "
                       "WHERE key IN ('log_epoch', 'log_start')", (epoch, str(floor)))
            return LogPosition(epoch, floor)
        position, _ = self._write(start)
        self._settled = max(self._settled, position.seq)
        return position

    def clear(self) -> None:
        self._start_log(0, TABLES)

    def start_log_after(self, seq: int) -> LogPosition:
        return self._start_log(seq, ())

    def resume_log_after_crash(self) -> None:
        """Nothing to do: a committed transaction survives a crash of PostgreSQL and its sequence never goes
        back, so no ``seq`` handed out before is handed out again (the log and its epoch go on)."""

    # -- the change log -----------------------------------------------------------------------------------------
    @staticmethod
    def _meta(cur: Cursor[Any]) -> tuple[str, int]:
        found = dict(cur.execute("SELECT key, value FROM meta WHERE key IN ('log_epoch', 'log_start')").fetchall())
        return found["log_epoch"], int(found["log_start"])

    def _settle(self) -> int:
        """Wait for the transactions holding a ``seq`` to end: every ``seq`` up to the value returned is final."""
        settled = self._read(lambda cur: pg_record.settle(cur, self._where.schema), "READ COMMITTED")
        self._settled = max(self._settled, settled)
        return settled

    def _final(self, changes: list[Change], since: int, settled: int) -> tuple[list[Change], bool]:
        """The first of ``changes`` (read after ``since``) up to the first ``seq`` that is missing but may still
        commit (above ``settled``), and whether they were all that."""
        prev = since
        for n, change in enumerate(changes):
            if change.seq > settled and change.seq != prev + 1:
                return changes[:n], False
            prev = change.seq
        return changes, True

    def _read_final(self, read: Callable[[Cursor[Any]], tuple[T, list[Change]]], since: int
                    ) -> tuple[T, list[Change]]:
        """``read``'s value and the final part of its changes (read after ``since``), waiting once for the
        writers if a ``seq`` may be missing."""
        value, changes = self._read(read, SNAPSHOT)
        final, whole = self._final(changes, since, self._settled)
        if whole:
            return value, final
        settled = self._settle()
        value, changes = self._read(read, SNAPSHOT)
        return value, self._final(changes, since, settled)[0]

    @staticmethod
    def _changes(cur: Cursor[Any], since: int, limit: int) -> list[Change]:
        rows = cur.execute(f"SELECT {CHANGE_COLS} FROM changes WHERE seq > %s ORDER BY seq LIMIT %s",
                           (since, limit)).fetchall()
        return [Change(*r) for r in rows]

    @staticmethod
    def _end(cur: Cursor[Any], start: int) -> int:
        row = cur.execute("SELECT max(seq) FROM changes").fetchone()
        return max(start, int(row[0]) if row and row[0] is not None else 0)

    def changes(self, since: int = 0, limit: int = 100) -> list[Change]:
        return self._read_final(lambda cur: (None, self._changes(cur, since, limit)), since)[1]

    def changes_after(self, position: LogPosition, limit: int = 100) -> LogRead:
        def read(cur: Cursor[Any]) -> tuple[tuple[str, int, bool], list[Change]]:
            epoch, start = self._meta(cur)
            if position.epoch != epoch or position.seq > self._end(cur, start):
                return (epoch, start, True), []
            return (epoch, start, False), self._changes(cur, position.seq, limit)

        (epoch, start, reset), found = self._read_final(read, position.seq)
        if reset:
            return LogRead((), LogPosition(epoch, start), reset=True)
        return LogRead(tuple(found), LogPosition(epoch, found[-1].seq) if found else position)

    def log_start(self) -> LogPosition:
        return LogPosition(*self._read(self._meta))

    @staticmethod
    def _final_end(cur: Cursor[Any], settled: int) -> tuple[LogPosition, bool]:
        """The log's epoch and its newest ``seq`` if every ``seq`` above ``settled`` is there (True: all
        committed), else its newest up to ``settled`` (False)."""
        epoch, start = PostgresIndex._meta(cur)
        row = cur.execute("SELECT (SELECT count(*) FROM changes WHERE seq > %s), "
                          "(SELECT max(seq) FROM changes WHERE seq <= %s), (SELECT max(seq) FROM changes)",
                          (settled, settled)).fetchone()
        above, below, newest = row if row else (0, None, None)
        if newest is None or newest <= settled or above == newest - settled:
            return LogPosition(epoch, max(start, newest or 0)), True
        return LogPosition(epoch, max(start, below or 0)), False

    def log_end(self) -> LogPosition:
        """The newest ``seq`` up to which no entry can still appear (a consumer starting there misses none)."""
        settled = self._settled
        end, whole = self._read(lambda cur: self._final_end(cur, settled), SNAPSHOT)
        if not whole:
            settled = self._settle()
            end, _ = self._read(lambda cur: self._final_end(cur, settled), SNAPSHOT)
        self._settled = max(self._settled, end.seq)
        return end

    # -- reading ------------------------------------------------------------------------------------------------
    def current(self, sop_uid: str) -> InstanceRecord | None:
        row = self._read(lambda cur: cur.execute(f"SELECT {INSTANCE_COLS} FROM instances i WHERE i.sop_uid = %s",
                                                 (sop_uid,)).fetchone())
        return InstanceRecord(*row) if row else None

    @contextlib.contextmanager
    def _select(self, level: QueryLevel, conditions: Sequence[Condition], columns: str, limit: int | None,
                offset: int) -> Iterator[tuple[Iterator[Sequence[Any]], list[Condition]]]:
        """Rows of ``columns`` for the SQL part of ``conditions``, in the level's order, and the conditions left
        for Python. Without those the SQL pages; with them the rows are read a batch at a time (a server-side
        cursor), so that a caller can stop after ``offset + limit`` matches."""
        compiled = compile_conditions(level, conditions, POSTGRESQL)
        where = " AND ".join(compiled.where) or POSTGRESQL.true
        params = list(compiled.params)
        query = f"SELECT {columns} FROM {FROM[level]} WHERE {where} ORDER BY {_ORDER[level]}"
        if not compiled.residual:
            if limit is not None and _NAME_KEY in where and not _PATIENT_TERM.search(where):
                # a study search by patient name: the page's study UIDs first, from the study order index alone (it
                # carries the name: migration 0004), then the wide rows (attrs) of that page only. (Other searches
                # read fewer pages as one query: the order index finds their rows as fast.)
                page = f"SELECT s.study_uid FROM studies s WHERE {where} ORDER BY {_ORDER[level]} LIMIT %s OFFSET %s"
                query = f"SELECT {columns} FROM {FROM[level]} WHERE s.study_uid IN ({page}) ORDER BY {_ORDER[level]}"
                params += [limit, offset]
            elif limit is not None:
                query += " LIMIT %s OFFSET %s"
                params += [limit, offset]
            yield iter(self._read(lambda cur: cur.execute(query, params).fetchall())), []
            return
        try:
            with self._pool.connection() as conn, conn.transaction(), \
                    conn.cursor(name=f"bastion_find_{threading.get_ident()}") as cur:
                cur.itersize = _FETCH
                cur.execute(query, params)
                yield iter(cur), compiled.residual
        except psycopg.Error as exc:
            raise self._failure(exc) from exc

    def find(self, level: QueryLevel, conditions: Sequence[Condition], *, limit: int | None = None,
             offset: int = 0) -> list[JsonDataset]:
        with self._select(level, conditions, FIND_COLUMNS[level], limit, offset) as (rows, residual):
            if not residual:
                return [dataset_of(level, tuple(row)) for row in rows]
            wanted = None if limit is None else offset + limit
            found = [ds for _, ds in _matching(level, rows, residual, wanted)]
        return found if wanted is None else found[offset:wanted]

    def instances(self, level: QueryLevel, conditions: Sequence[Condition]) -> list[InstanceRecord]:
        columns = "p.attrs, s.attrs, se.attrs, i.attrs, i.transfer_syntax, i.series_uid, " + INSTANCE_COLS
        with self._select(QueryLevel.IMAGE, conditions, columns, None, 0) as (rows, residual):
            if residual:
                rows = (row for row, _ in _matching(QueryLevel.IMAGE, rows, residual, None))
            return [InstanceRecord(*row[6:14]) for row in rows]

    def last_stamp(self) -> str | None:
        """The stamp of the newest ``stored`` change's key: the newest, give or take the milliseconds between
        taking a stamp and committing on another node (recovery starts an hour before it anyway); without a
        change log, the newest stamp indexed."""
        newest = self._read(lambda cur: cur.execute(
            "SELECT blob_key FROM changes WHERE kind = 'stored' ORDER BY seq DESC LIMIT 1").fetchone())
        parts = parse_object_key(newest[0]) if newest else None
        if parts is not None:
            return parts["stamp"]
        row = self._read(lambda cur: cur.execute(
            "SELECT greatest((SELECT max(stamp) FROM instances), (SELECT max(stamp) FROM versions))").fetchone())
        return row[0] if row and row[0] else None

    def has_blob(self, blob_key: str) -> bool:
        parts = parse_object_key(blob_key)
        params: tuple[str, ...] = (blob_key, blob_key)
        current = "blob_key = %s"
        if parts is not None:  # the key names its SOP Instance UID: a primary-key lookup
            current, params = "sop_uid = %s AND blob_key = %s", (parts["sop"], *params)
        row = self._read(lambda cur: cur.execute(
            f"SELECT EXISTS (SELECT 1 FROM instances WHERE {current}) "
            "OR EXISTS (SELECT 1 FROM versions WHERE blob_key = %s)", params).fetchone())
        return bool(row and row[0])

    def held_blobs(self, blob_keys: Sequence[str]) -> set[str]:
        held: set[str] = set()
        for start in range(0, len(blob_keys), 1000):
            keys = list(blob_keys[start:start + 1000])
            sops = [(parse_object_key(key) or {}).get("sop", "") for key in keys]  # the primary key: no scan

            def read(cur: Cursor[Any], keys: list[str] = keys, sops: list[str] = sops) -> set[str]:
                cur.execute("SELECT blob_key FROM instances WHERE sop_uid = ANY(%s) AND blob_key = ANY(%s) "
                            "UNION ALL SELECT blob_key FROM versions WHERE blob_key = ANY(%s)", (sops, keys, keys))
                return {row[0] for row in cur.fetchall()}

            held |= self._read(read)
        return held

    def versions(self) -> Iterator[Version]:
        """Every version, read a batch at a time on a connection held until the iteration ends."""
        try:
            with self._pool.connection() as conn, conn.transaction():
                for table, current in (("instances", True), ("versions", False)):
                    with conn.cursor(name=f"bastion_versions_{table}") as cur:
                        cur.itersize = _FETCH
                        cur.execute(f"SELECT blob_key, digest, size FROM {table}")
                        for key, digest, size in cur:
                            yield Version(key, digest, int(size), current)
        except psycopg.Error as exc:
            raise self._failure(exc) from exc

    def statistics(self) -> Statistics:
        cutoff = (datetime.now(UTC) - timedelta(minutes=1)).isoformat(timespec="milliseconds")
        def read(cur: Cursor[Any]) -> tuple[Any, ...]:
            row = cur.execute(
                "SELECT (SELECT count(*) FROM patients), (SELECT count(*) FROM studies), "
                "(SELECT count(*) FROM series), (SELECT count(*) FROM instances), (SELECT count(*) FROM versions), "
                "(SELECT coalesce(sum(size), 0) FROM instances) + (SELECT coalesce(sum(size), 0) FROM versions), "
                "(SELECT count(*) FROM changes WHERE at >= %s AND kind = 'stored')", (cutoff,)).fetchone()
            assert row is not None
            return (*row, self._end(cur, self._meta(cur)[1]))

        row = self._read(read, SNAPSHOT)
        last = row[7]
        return Statistics(patients=int(row[0]), studies=int(row[1]), series=int(row[2]), instances=int(row[3]),
                          versions=int(row[4]), stored_bytes=int(row[5]), last_change=last,
                          stored_last_minute=int(row[6]))

