"""The forwarding queues in a SQLite file of the node's data directory: ``<data>/forward.sqlite3``.

Not in the index file (a cache that ``bastion index rebuild`` replaces). A rollback journal (not WAL: a few
commits a second need no WAL, and without one SQLite's WAL-reset bug, docs/architecture.md, cannot reach it),
``synchronous = FULL``: an entry or a cursor move that was committed survives a power cut, so no stored instance
is skipped. Several processes may open it (the server's forwarder and HTTP API, ``bastion queue``): every method
is a ``BEGIN IMMEDIATE`` transaction. Times are the node's clock.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bastion.errors import IndexFailure
from bastion.forward.queue import (
    DEAD,
    IN_FLIGHT,
    PENDING,
    Backoff,
    Cursor,
    Entry,
    ForwardQueue,
    NewEntry,
    QueueStats,
)
from bastion.index.base import LogPosition
from bastion.jobs.sql import Run
from bastion.jobs.sqlite import immediate_transaction

#: The schema's version, in ``PRAGMA user_version``; a file of a newer one is refused.
VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS cursor (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  position TEXT,
  floor TEXT NOT NULL DEFAULT '',
  seen TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS entries (
  id INTEGER PRIMARY KEY,
  destination TEXT NOT NULL,
  sop_uid TEXT NOT NULL,
  study_uid TEXT NOT NULL,
  seq INTEGER NOT NULL,
  study_rank INTEGER NOT NULL,
  state TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  due REAL NOT NULL,
  lease_until REAL,
  last_error TEXT NOT NULL DEFAULT '',
  created_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS entries_pending_once ON entries (destination, sop_uid) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS entries_order ON entries (destination, state, study_rank, seq);
CREATE INDEX IF NOT EXISTS entries_study ON entries (destination, study_uid);
CREATE TABLE IF NOT EXISTS destinations (
  name TEXT PRIMARY KEY,
  delivered INTEGER NOT NULL DEFAULT 0,
  last_delivered_at REAL,
  last_error TEXT NOT NULL DEFAULT '',
  last_error_at REAL
);
"""
#: How long a statement waits for another process's transaction.
BUSY_TIMEOUT_S = 10.0
_CHUNK = 500  # ids per statement (SQLite's variable limit is far above)


def _chunks(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i: i + _CHUNK]


def _marks(ids: Sequence[int]) -> str:
    return ",".join("?" * len(ids))


class SqliteFile:
    """A small SQLite file of the node's own (the forwarding queue, the edge's state): a rollback journal,
    ``synchronous = FULL``, every method one ``BEGIN IMMEDIATE`` transaction (:meth:`_transaction`), one
    connection shared by threads; ``schema`` made at open, a file of a newer ``version`` refused."""

    def __init__(self, path: str | Path, schema: str, version: int, what: str, clock: Any = time.time) -> None:
        self.path = str(path)
        self.what = what
        self._clock = clock
        self._lock = threading.Lock()
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode = TRUNCATE")
            self._conn.execute("PRAGMA synchronous = FULL")
            with self._transaction() as run:
                found = int(run("PRAGMA user_version", ())[0][0])
                if found > version:
                    raise IndexFailure(f"{what} {self.path} has schema version {found}, newer than "
                                       f"this Bastion's ({version}): run the newer version")
                for statement in schema.split(";"):
                    if statement.strip():
                        run(statement, ())
                self._created(run)
                run(f"PRAGMA user_version = {version}", ())
        except sqlite3.Error as exc:
            raise IndexFailure(f"{what} {self.path}: {exc}") from exc

    def _created(self, run: Run) -> None:
        """Rows the schema starts with (in the opening transaction)."""

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Run]:
        with self._lock, immediate_transaction(self._conn, f"{self.what} {self.path}") as run:
            yield run

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class SqliteForwardQueue(SqliteFile, ForwardQueue):
    """:class:`~bastion.forward.queue.ForwardQueue` in a SQLite file (one connection, shared by threads)."""

    def __init__(self, path: str | Path, clock: Any = time.time) -> None:
        super().__init__(path, SCHEMA, VERSION, "forward queue", clock)

    def _created(self, run: Run) -> None:
        run("INSERT OR IGNORE INTO cursor (id, position) VALUES (1, NULL)", ())

    def cursor(self) -> Cursor:
        with self._transaction() as run:
            position, floor, seen = run("SELECT position, floor, seen FROM cursor WHERE id = 1", ())[0]
        return Cursor(LogPosition.parse(position) if position else None, floor, seen)

    def enqueue(self, entries: Sequence[NewEntry], cursor: Cursor) -> int:
        with self._transaction() as run:
            added = self._insert(entries)
            run("UPDATE cursor SET position = ?, floor = ?, seen = ? WHERE id = 1",
                (None if cursor.position is None else str(cursor.position), cursor.floor, cursor.seen))
        return added

    def requeue(self, entries: Sequence[NewEntry]) -> int:
        with self._transaction():
            return self._insert(entries)

    def _insert(self, entries: Sequence[NewEntry]) -> int:
        now = self._clock()
        added = 0
        for e in entries:
            rank = self._conn.execute("SELECT MIN(study_rank) FROM entries WHERE destination = ? AND study_uid = ? "
                                      "AND state != ?", (e.destination, e.study_uid, DEAD)).fetchone()[0]
            added += self._conn.execute(
                "INSERT OR IGNORE INTO entries (destination, sop_uid, study_uid, seq, study_rank, state, due, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (e.destination, e.sop_uid, e.study_uid, e.seq, e.seq if rank is None else rank, PENDING, now,
                 now)).rowcount
        return added

    def due_now(self, destination: str) -> int:
        now = self._clock()
        with self._transaction() as run:
            return len(run("UPDATE entries SET due = ? WHERE destination = ? AND state = ? AND due > ? RETURNING id",
                           (now, destination, PENDING, now)))

    def recover(self) -> int:
        with self._transaction() as run:
            n = len(run("UPDATE OR IGNORE entries SET state = ?, lease_until = NULL WHERE state = ? RETURNING id",
                        (PENDING, IN_FLIGHT)))
            run("DELETE FROM entries WHERE state = ?", (IN_FLIGHT,))  # the same instance is pending anew
            return n

    def take(self, destination: str, limit: int, lease_s: float) -> list[Entry]:
        now = self._clock()
        with self._transaction() as run:
            # An entry whose sender's lease ran out is pending again (or dropped: a newer one is pending).
            run("UPDATE OR IGNORE entries SET state = ?, lease_until = NULL "
                "WHERE destination = ? AND state = ? AND lease_until < ?", (PENDING, destination, IN_FLIGHT, now))
            run("DELETE FROM entries WHERE destination = ? AND state = ? AND lease_until < ?",
                (destination, IN_FLIGHT, now))
            rows = run("SELECT id, sop_uid, study_uid, attempts, last_error FROM entries "
                       "WHERE destination = ? AND state = ? AND due <= ? ORDER BY study_rank, seq LIMIT ?",
                       (destination, PENDING, now, limit))
            ids = [r[0] for r in rows]
            if ids:
                run(f"UPDATE entries SET state = ?, lease_until = ? WHERE id IN ({_marks(ids)})",
                    (IN_FLIGHT, now + lease_s, *ids))
        return [Entry(int(i), destination, sop, study, int(attempts), err) for i, sop, study, attempts, err in rows]

    def delivered(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        now = self._clock()
        with self._transaction() as run:
            for chunk in _chunks(ids):
                gone = run(f"DELETE FROM entries WHERE id IN ({_marks(chunk)}) RETURNING destination", tuple(chunk))
                counts: dict[str, int] = {}
                for (destination,) in gone:
                    counts[destination] = counts.get(destination, 0) + 1
                for destination, n in counts.items():
                    run("INSERT INTO destinations (name, delivered, last_delivered_at) VALUES (?, ?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET delivered = delivered + excluded.delivered, "
                        "last_delivered_at = excluded.last_delivered_at", (destination, n, now))

    def failed(self, ids: Sequence[int], error: str, backoff: Backoff) -> int:
        if not ids:
            return 0
        now = self._clock()
        died = 0
        with self._transaction() as run:
            for chunk in _chunks(ids):
                rows = run(f"SELECT id, destination, attempts FROM entries WHERE id IN ({_marks(chunk)})", tuple(chunk))
                for entry_id, destination, attempts in rows:
                    tries = int(attempts) + 1
                    state = DEAD if tries >= backoff.attempts else PENDING
                    died += state == DEAD
                    run("UPDATE OR IGNORE entries SET state = ?, attempts = ?, due = ?, lease_until = NULL, "
                        "last_error = ? WHERE id = ?", (state, tries, now + backoff.delay(tries), error, entry_id))
                    # Still in flight: the instance is pending anew (stored again meanwhile), which replaces it.
                    run("DELETE FROM entries WHERE id = ? AND state = ?", (entry_id, IN_FLIGHT))
                    run("INSERT INTO destinations (name, last_error, last_error_at) VALUES (?, ?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET last_error = excluded.last_error, "
                        "last_error_at = excluded.last_error_at", (destination, error, now))
        return died

    def release(self, ids: Sequence[int]) -> None:
        with self._transaction() as run:
            for chunk in _chunks(ids):
                run(f"UPDATE OR IGNORE entries SET state = ?, lease_until = NULL WHERE state = ? "
                    f"AND id IN ({_marks(chunk)})", (PENDING, IN_FLIGHT, *chunk))
                run(f"DELETE FROM entries WHERE state = ? AND id IN ({_marks(chunk)})", (IN_FLIGHT, *chunk))

    def next_due(self, destination: str) -> float | None:
        with self._transaction() as run:
            due = run("SELECT MIN(due) FROM entries WHERE destination = ? AND state = ?", (destination, PENDING))[0][0]
        return None if due is None else max(0.0, float(due) - self._clock())

    def stats(self, destinations: Sequence[str] = ()) -> list[QueueStats]:
        now = self._clock()
        counts: dict[str, dict[str, Any]] = {name: {} for name in destinations}
        with self._transaction() as run:
            for destination, state, n, oldest in run(
                    "SELECT destination, state, COUNT(*), MIN(created_at) FROM entries GROUP BY destination, state",
                    ()):
                c = counts.setdefault(destination, {})
                c[state] = int(n)
                if state in (PENDING, IN_FLIGHT):
                    c["oldest"] = min(c.get("oldest", oldest), oldest)
            for name, delivered, delivered_at, error, error_at in run(
                    "SELECT name, delivered, last_delivered_at, last_error, last_error_at FROM destinations", ()):
                counts.setdefault(name, {}).update(delivered=int(delivered), delivered_at=delivered_at,
                                                   error=error, error_at=error_at)
        return [QueueStats(name, c.get(PENDING, 0), c.get(IN_FLIGHT, 0), c.get("delivered", 0), c.get(DEAD, 0),
                           None if "oldest" not in c else round(max(0.0, now - c["oldest"]), 3),
                           c.get("error", ""), c.get("error_at"), c.get("delivered_at"))
                for name, c in counts.items()]

    def dead(self, destination: str | None = None, limit: int = 100) -> list[Entry]:
        with self._transaction() as run:
            rows = run("SELECT id, destination, sop_uid, study_uid, attempts, last_error FROM entries "
                       "WHERE state = ? AND (? IS NULL OR destination = ?) ORDER BY id LIMIT ?",
                       (DEAD, destination, destination, limit))
        return [Entry(int(i), d, sop, study, int(a), err) for i, d, sop, study, a, err in rows]

    def retry(self, destination: str | None = None) -> int:
        now = self._clock()
        with self._transaction() as run:
            where = "state = ? AND (? IS NULL OR destination = ?)"
            n = int(run(f"SELECT COUNT(*) FROM entries WHERE {where}", (DEAD, destination, destination))[0][0])
            run(f"UPDATE OR IGNORE entries SET state = ?, attempts = 0, due = ? WHERE {where}",
                (PENDING, now, DEAD, destination, destination))
            run(f"DELETE FROM entries WHERE {where}", (DEAD, destination, destination))  # already pending anew
        return n

    def purge(self, destination: str | None = None, *, everything: bool = False) -> int:
        with self._transaction() as run:
            return len(run("DELETE FROM entries WHERE (? OR state = ?) AND (? IS NULL OR destination = ?) "
                           "RETURNING id", (everything, DEAD, destination, destination)))
