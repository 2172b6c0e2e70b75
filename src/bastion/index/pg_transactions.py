"""The PostgreSQL index's connections and transactions (:class:`PgTransactions`, which
:class:`~bastion.index.postgresql.PostgresIndex` extends): the pool of connections to the migrated schema, a read
(:meth:`PgTransactions._read`), a write transaction run again after a deadlock, a conflict or a connection found
gone (:meth:`PgTransactions._write`), and the one-statement record of the common case with the settling of its
outcome when its connection is lost (:meth:`PgTransactions._record_new`).

A commit whose connection is lost may or may not have happened: a write raises
:class:`~bastion.errors.CommitOutcomeUnknown` then (the ingest keeps the object, which the index may name), never
a plain IndexFailure (for which the object would be removed).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg
from psycopg import Connection, Cursor, errors
from psycopg_pool import ConnectionPool

from bastion.errors import CommitOutcomeUnknown, IndexFailure
from bastion.index import pg_record
from bastion.index.pg_schema import Location, migrated_pool, one_line, parse_location
from bastion.index.rows import IndexRow, now_iso
from bastion.model.records import StoreStatus

T = TypeVar("T")

#: How many times a write transaction is run before its deadlock or conflict is an IndexFailure.
ATTEMPTS = 8
#: The connections one index keeps to the server.
POOL_MAX = 8
#: A read-only transaction whose statements all see one snapshot (:meth:`PgTransactions._read`).
SNAPSHOT = "REPEATABLE READ, READ ONLY"
_RETRIED = (errors.SerializationFailure, errors.DeadlockDetected, errors.UniqueViolation)

log = logging.getLogger("bastion.index")


class PgTransactions:
    """Connections and transactions of the PostgreSQL index at ``location`` (its schema created or migrated first)."""

    def __init__(self, location: str) -> None:
        self.location = location
        self._where: Location = parse_location(location)
        try:
            self._pool: ConnectionPool[Connection[Any]] = migrated_pool(self._where, "bastion-index", POOL_MAX,
                                                                        num_workers=2)
        except psycopg.Error as exc:
            raise IndexFailure(f"PostgreSQL index at {self._where.where}: schema migration failed: "
                               f"{one_line(exc)}") from exc
        #: The threads that :meth:`~bastion.index.postgresql.PostgresIndex.record_async` records in.
        self._threads = ThreadPoolExecutor(POOL_MAX, thread_name_prefix="bastion-index-record")
        self._record_new_failed = False  # logged once

    def _failure(self, exc: psycopg.Error, what: str = "") -> IndexFailure:
        return IndexFailure(f"PostgreSQL index at {self._where.where}{what}: {one_line(exc)}")

    def _lost(self, conn: Connection[Any] | None, exc: psycopg.Error) -> bool:
        """True if ``exc`` came from a connection that is gone (the server restarted or failed over): the pool's
        other idle connections are checked, and replaced where they are gone too."""
        if conn is None or not conn.broken or not isinstance(exc, psycopg.OperationalError):
            return False
        self._pool.check()
        return True

    def _read(self, fn: Callable[[Cursor[Any]], T], isolation: str | None = None) -> T:
        """``fn`` run with a cursor of a pooled connection: each statement on its own, or in one transaction of
        ``isolation`` (:data:`SNAPSHOT`: all statements see one snapshot). On a connection found gone it runs once
        more on another; a database error is an IndexFailure."""
        for attempt in range(2):
            conn = None
            try:
                with self._pool.connection() as conn, conn.cursor() as cur:
                    if isolation is None:
                        return fn(cur)
                    with conn.transaction():
                        cur.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
                        return fn(cur)
            except psycopg.Error as exc:
                if attempt or not self._lost(conn, exc):
                    raise self._failure(exc) from exc
        raise AssertionError("unreachable")

    def _write(self, fn: Callable[[pg_record.Tx], T]) -> tuple[T, pg_record.Tx]:
        """Run ``fn`` in one transaction, its change-log entries inserted last: its value, and the transaction
        (committed) with their ``seq``. The statements go in a pipeline: the server is waited for only where a
        result is read (a record's lookup), and at the commit.

        The transaction is rolled back whole and run again after a deadlock, a conflict with another writer, a
        study lock out of order (then taken first) or a connection found gone before the commit (one lost during
        the commit is an IndexFailure: the commit may have happened)."""
        first: frozenset[str] = frozenset()
        for attempt in range(ATTEMPTS):
            last = attempt == ATTEMPTS - 1
            conn, committing = None, False
            try:
                with self._pool.connection() as conn:
                    with conn.pipeline(), conn.transaction(), conn.cursor() as cur:
                        tx = pg_record.Tx(cur, self._where.schema, first)
                        value = fn(tx)
                        tx.flush()
                        committing = True
                    tx.collect()
                    return value, tx
            except pg_record.LockOrder as exc:
                first = first.union(exc.studies)
                if last:
                    raise IndexFailure(f"index write failed after {ATTEMPTS} attempts: {exc}") from exc
            except _RETRIED as exc:
                if last:
                    raise self._failure(exc, f": write failed after {ATTEMPTS} attempts") from exc
                time.sleep(random.uniform(0, 0.002 * 2 ** attempt))  # let the other writer finish
            except psycopg.Error as exc:
                if committing and conn is not None and conn.broken:
                    raise CommitOutcomeUnknown(f"PostgreSQL index at {self._where.where}: the connection was lost "
                                               f"during a commit, which may have happened: {one_line(exc)}") from exc
                if last or committing or not self._lost(conn, exc):
                    raise self._failure(exc, ": write failed") from exc
        raise AssertionError("unreachable")

    def _record_new(self, row: IndexRow) -> tuple[StoreStatus, int | None] | None:
        """Record ``row`` by :data:`~bastion.index.pg_record.RECORD_NEW` if it is the common case: STORED and its
        entry's ``seq``; None if it is not, or if the call failed (nothing was written: :meth:`record`'s transaction
        then records it, retrying or reporting the error as it does). One statement is one round trip and no
        client-side transaction. A connection lost during it leaves its outcome unknown: it is then read under the
        study's lock on another connection, and if that cannot be done either, CommitOutcomeUnknown (the object must
        stay: the index may name it)."""
        conn = None
        try:
            with self._pool.connection() as conn:
                at = now_iso()
                found = conn.execute(pg_record.RECORD_NEW, pg_record.record_new_params(row, self._where.schema, at))
                value = found.fetchone()
            return None if value is None or value[0] is None else (StoreStatus.STORED, int(value[0]))
        except psycopg.Error as exc:
            if conn is None:  # no connection to be had: the transaction would wait as long again
                raise self._failure(exc) from exc
            if not conn.broken:
                if not isinstance(exc, _RETRIED) and not self._record_new_failed:
                    self._record_new_failed = True
                    log.warning("PostgreSQL index at %s: the one-statement record failed (%s); such records go "
                                "through the longer transaction", self._where.where, one_line(exc))
                return None
            self._lost(conn, exc)
            lost = exc
        try:
            (committed, seq), _ = self._write(lambda tx: pg_record.recorded_new(tx, row, at))
        except IndexFailure as exc:
            raise CommitOutcomeUnknown(f"PostgreSQL index at {self._where.where}: the connection was lost during a "
                                       f"record, which may have happened, and the index cannot say: {one_line(lost)}; "
                                       f"{exc.message}") from exc
        return (StoreStatus.STORED, seq) if committed else None

    def close(self) -> None:
        self.closed = True
        self._threads.shutdown()
        self._pool.close()
