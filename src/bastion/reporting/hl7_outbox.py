"""The HL7 outbox: one row per message (a signed report version for one receiver), leased to one sender at a time.

A row's life::

    add ──► pending ──claim──► leased ──ACK AA/CA──► delivered (kept KEEP_DAYS, then pruned)
              ▲   ▲               │ failed: attempts < max, due again after the backoff
              │   └───────────────┘
              │ retry             │ failed: attempts == max
              └──── dead ◄────────┘     (kept with its last error until retried)

Rows are keyed by (receiver, report id, version): adding a message twice keeps the first. A receiver gets its
messages in the order they were added: only the oldest pending row of a receiver may be claimed (head of line), so
an amendment never overtakes the report it amends. A claim leases the row for ``lease_s`` seconds (a sender that
died leaves it to be claimed again); a claim, a delivery and a failure are each one transaction, and a row's
outcome is recorded only by the lease's holder. Times are the database's clock.

Where: with a PostgreSQL index, the tables ``hl7_outbox`` and ``hl7_receivers`` of its schema (migration
``0006_hl7_outbox``), shared by the nodes; else ``<data>/hl7.sqlite3`` (one node). Never the index file, which is a
rebuildable cache.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import uuid
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.errors import IndexFailure
from bastion.index.base import is_postgresql

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
#: Delivered rows are kept this many days (the sender's look-back for signed versions is shorter).
KEEP_DAYS = 30.0
Run = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]
_COLUMNS = "id, receiver, report_id, version, control_id, message, state, attempts, last_error"

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS hl7_outbox (
  id INTEGER PRIMARY KEY,
  receiver TEXT NOT NULL,
  report_id TEXT NOT NULL,
  version INTEGER NOT NULL,
  control_id TEXT NOT NULL,
  message TEXT NOT NULL,
  state TEXT NOT NULL DEFAULT 'pending',
  attempts INTEGER NOT NULL DEFAULT 0,
  due_at REAL NOT NULL,
  lease_until REAL NOT NULL DEFAULT 0,
  owner TEXT NOT NULL DEFAULT '',
  last_error TEXT NOT NULL DEFAULT '',
  created_at REAL NOT NULL,
  done_at REAL,
  UNIQUE (receiver, report_id, version)
);
CREATE INDEX IF NOT EXISTS hl7_outbox_pending ON hl7_outbox (receiver, id) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS hl7_receivers (
  receiver TEXT PRIMARY KEY,
  since TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class Message:
    """A row of the outbox."""

    id: int
    receiver: str
    report_id: str
    version: int
    control_id: str
    message: str
    state: str
    attempts: int
    last_error: str
    #: The lease's holder (set on a claimed message).
    owner: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "receiver": self.receiver, "report": self.report_id, "version": self.version,
                "control_id": self.control_id, "state": self.state, "attempts": self.attempts,
                "last_error": self.last_error}


def _message(row: tuple[Any, ...], owner: str = "") -> Message:
    mid, receiver, report_id, version, control, text, state, attempts, error = row
    return Message(int(mid), str(receiver), str(report_id), int(version), str(control), str(text), str(state),
                   int(attempts), str(error), owner)


class Outbox:
    """The outbox in SQL, once for both databases; ``now``: the database's clock in Unix seconds."""

    def __init__(self, now: str) -> None:
        self._now = now

    @abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager[Run]:
        """One transaction, committed when the block ends, rolled back if it raises."""

    def since(self, receiver: str, now_iso: str) -> str:
        """When ``receiver`` was first configured (ISO 8601): reports signed before are not sent to it. The first
        call for a receiver records ``now_iso``."""
        with self._transaction() as run:
            run("INSERT INTO hl7_receivers (receiver, since) VALUES (?, ?) ON CONFLICT (receiver) DO NOTHING",
                (receiver, now_iso))
            return str(run("SELECT since FROM hl7_receivers WHERE receiver = ?", (receiver,))[0][0])

    def known(self, report_id: str) -> set[tuple[str, int]]:
        """The (receiver, version) pairs of ``report_id`` in the outbox, in any state."""
        with self._transaction() as run:
            return {(str(r), int(v)) for r, v in
                    run("SELECT receiver, version FROM hl7_outbox WHERE report_id = ?", (report_id,))}

    def every_known(self) -> set[tuple[str, str, int]]:
        """Every (receiver, report id, version) in the outbox, in any state."""
        with self._transaction() as run:
            return {(str(r), str(i), int(v)) for r, i, v in
                    run("SELECT receiver, report_id, version FROM hl7_outbox", ())}

    def add(self, receiver: str, report_id: str, version: int, control_id: str, message: str) -> bool:
        """Queue ``message`` for ``receiver``, due now, unless that version is queued for it already; whether it
        was added."""
        with self._transaction() as run:
            return bool(run(f"INSERT INTO hl7_outbox (receiver, report_id, version, control_id, message, due_at, "
                            f"created_at) VALUES (?, ?, ?, ?, ?, {self._now}, {self._now}) "
                            "ON CONFLICT (receiver, report_id, version) DO NOTHING RETURNING id",
                            (receiver, report_id, version, control_id, message)))

    def claim(self, receiver: str, lease_s: float) -> Message | None:
        """The oldest pending message of ``receiver``, leased for ``lease_s`` seconds, if it is due and no one
        holds it; else None."""
        owner = uuid.uuid4().hex
        with self._transaction() as run:
            rows = run(f"UPDATE hl7_outbox SET owner = ?, lease_until = {self._now} + ? WHERE id = ("
                       "SELECT min(id) FROM hl7_outbox WHERE receiver = ? AND state = 'pending') "
                       f"AND state = 'pending' AND due_at <= {self._now} AND lease_until < {self._now} "
                       f"RETURNING {_COLUMNS}", (owner, lease_s, receiver))
            return _message(rows[0], owner) if rows else None

    def delivered(self, message: Message) -> bool:
        """The receiver acknowledged ``message``; whether the lease was still its sender's."""
        with self._transaction() as run:
            return bool(run(f"UPDATE hl7_outbox SET state = 'delivered', attempts = attempts + 1, last_error = '', "
                            f"done_at = {self._now}, lease_until = 0 WHERE id = ? AND owner = ? "
                            "AND state = 'pending' RETURNING id", (message.id, message.owner)))

    def failed(self, message: Message, error: str, delay_s: float, max_attempts: int) -> str:
        """``message`` was not delivered: due again in ``delay_s`` seconds, or dead after ``max_attempts``
        attempts; its state now (``pending`` or ``dead``; empty: the lease was no longer its sender's)."""
        with self._transaction() as run:
            rows = run(f"UPDATE hl7_outbox SET attempts = attempts + 1, last_error = ?, lease_until = 0, "
                       f"due_at = {self._now} + ?, state = CASE WHEN attempts + 1 >= ? THEN 'dead' "
                       f"ELSE 'pending' END, done_at = CASE WHEN attempts + 1 >= ? THEN {self._now} END "
                       "WHERE id = ? AND owner = ? AND state = 'pending' RETURNING state",
                       (error[:1000], delay_s, max_attempts, max_attempts, message.id, message.owner))
            return str(rows[0][0]) if rows else ""

    def release(self, message: Message) -> None:
        """End the lease of ``message`` now, no attempt counted (its sender stopped)."""
        with self._transaction() as run:
            run("UPDATE hl7_outbox SET lease_until = 0 WHERE id = ? AND owner = ? AND state = 'pending'",
                (message.id, message.owner))

    def retry(self, receiver: str = "") -> int:
        """Make the dead messages (of ``receiver``, else all) pending again, due now, attempts reset; how many."""
        with self._transaction() as run:
            return len(run(f"UPDATE hl7_outbox SET state = 'pending', attempts = 0, due_at = {self._now}, "
                           "done_at = NULL WHERE state = 'dead' AND (? = '' OR receiver = ?) RETURNING id",
                           (receiver, receiver)))

    def stats(self) -> list[dict[str, Any]]:
        """Per receiver: its counts by state, and the last error of a message not delivered."""
        with self._transaction() as run:
            counts = run("SELECT receiver, state, count(*) FROM hl7_outbox GROUP BY receiver, state", ())
            errors = run("SELECT receiver, last_error FROM hl7_outbox WHERE id IN (SELECT max(id) FROM hl7_outbox "
                         "WHERE state <> 'delivered' AND last_error <> '' GROUP BY receiver)", ())
            since = run("SELECT receiver, since FROM hl7_receivers", ())
        out: dict[str, dict[str, Any]] = {}
        for receiver, first in since:
            out[str(receiver)] = {"receiver": str(receiver), "since": str(first), PENDING: 0, DELIVERED: 0,
                                  DEAD: 0, "last_error": ""}
        for receiver, state, count in counts:
            entry = out.setdefault(str(receiver), {"receiver": str(receiver), "since": "", PENDING: 0,
                                                   DELIVERED: 0, DEAD: 0, "last_error": ""})
            entry[str(state)] = int(count)
        for receiver, error in errors:
            out[str(receiver)]["last_error"] = str(error)
        return sorted(out.values(), key=lambda e: str(e["receiver"]))

    def messages(self, state: str = "", receiver: str = "", limit: int = 100) -> list[Message]:
        """The messages in ``state`` (else pending and dead) of ``receiver`` (else all), oldest first."""
        states = (state,) if state else (PENDING, DEAD)
        with self._transaction() as run:
            rows = run(f"SELECT {_COLUMNS} FROM hl7_outbox WHERE state IN ({', '.join('?' for _ in states)}) "
                       "AND (? = '' OR receiver = ?) ORDER BY id LIMIT ?", (*states, receiver, receiver, limit))
        return [_message(r) for r in rows]

    def prune(self) -> int:
        """Delete the messages delivered more than :data:`KEEP_DAYS` ago; how many."""
        with self._transaction() as run:
            return len(run(f"DELETE FROM hl7_outbox WHERE state = 'delivered' AND done_at < {self._now} - ? "
                           "RETURNING id", (KEEP_DAYS * 86400.0,)))

    @abstractmethod
    def close(self) -> None:
        """Release the database."""


class SqliteOutbox(Outbox):
    """The outbox in a SQLite file (WAL, ``BEGIN IMMEDIATE`` transactions: one writer at a time)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__("((julianday('now') - 2440587.5) * 86400.0)")
        self.path = str(path)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.executescript(SQLITE_SCHEMA)
        except sqlite3.Error as exc:
            raise IndexFailure(f"HL7 outbox {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Run]:
        def run(statement: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
            return self._conn.execute(statement, params).fetchall()

        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield run
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise IndexFailure(f"HL7 outbox {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresOutbox(Outbox):
    """The outbox in the PostgreSQL index's schema (READ COMMITTED: a claim re-checks its row once it holds its
    lock, so two nodes never lease one message)."""

    def __init__(self, location: str) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        from bastion.index.pg_schema import migrated_pool, one_line, parse_location

        super().__init__("extract(epoch from clock_timestamp())")
        self._where = parse_location(location)
        self._psycopg, self._one_line = psycopg, one_line
        try:
            self._pool = migrated_pool(self._where, "bastion-hl7", 2, check=ConnectionPool.check_connection)
        except psycopg.Error as exc:
            raise IndexFailure(f"HL7 outbox in PostgreSQL at {self._where.where}: {one_line(exc)}") from exc

    def _transaction(self) -> contextlib.AbstractContextManager[Run]:
        from bastion.index.pg_schema import transaction

        return transaction(self._pool, lambda exc: IndexFailure(
            f"HL7 outbox in PostgreSQL at {self._where.where}: {self._one_line(exc)}"))

    def close(self) -> None:
        self._pool.close()


def open_outbox(index_location: str, data: Path) -> Outbox:
    """The archive's outbox: in the PostgreSQL index's schema when the index is there, else ``<data>/hl7.sqlite3``."""
    if is_postgresql(index_location):
        return PostgresOutbox(index_location)
    return SqliteOutbox(data / "hl7.sqlite3")
