"""Jobs in a SQLite file of the node's data directory (``<data>/jobs.sqlite3``), for the embedded archive.

Not in the index file: the index is a cache that ``bastion index rebuild`` replaces, and jobs are not in the
blob store to be rebuilt from. One node, several processes (its workers): each opens the file, and every method
is a ``BEGIN IMMEDIATE`` transaction, so writers take turns and two claimers never get the same job, as
PostgreSQL's ``SKIP LOCKED`` guarantees. Leases are times of the node's clock, the only clock there is.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bastion.errors import IndexFailure
from bastion.index.sqlite_files import WRITER_LOCK_SUFFIX
from bastion.jobs.base import LEASE_SECONDS
from bastion.jobs.sql import Dialect, Run, SqlJobs

#: The schema's version, in ``PRAGMA user_version``; a file of a newer one is refused.
VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id INTEGER PRIMARY KEY,
  kind TEXT NOT NULL,
  key TEXT NOT NULL,
  payload TEXT NOT NULL,
  owner TEXT NOT NULL,
  lease_until REAL NOT NULL,
  outcome TEXT,
  finished_at REAL,
  closed INTEGER NOT NULL DEFAULT 0,
  created_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_open_key ON jobs (key) WHERE NOT closed;
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (lease_until) WHERE outcome IS NULL;
CREATE TABLE IF NOT EXISTS job_progress (
  job_id INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
  sop_uid TEXT NOT NULL,
  status INTEGER NOT NULL,
  PRIMARY KEY (job_id, sop_uid)
) WITHOUT ROWID;
"""
#: How long a statement waits for another process's transaction.
BUSY_TIMEOUT_MS = 10_000


def _from_epoch(value: Any) -> datetime:
    return datetime.fromtimestamp(float(value), UTC)


SQLITE = Dialect(now="((julianday('now') - 2440587.5) * 86400.0)", seconds="?", json="?", lock="",
                 skip_locked="", to_datetime=_from_epoch)


@contextlib.contextmanager
def immediate_transaction(conn: sqlite3.Connection, where: str) -> Iterator[Run]:
    """One ``BEGIN IMMEDIATE`` transaction on ``conn`` (opened with ``isolation_level=None``): committed when the
    block ends, rolled back if it raises; a SQLite error is an :class:`~bastion.errors.IndexFailure` naming
    ``where``. Also the transaction of the node's other small SQLite files (:mod:`bastion.forward.sqlite`)."""
    def run(statement: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return conn.execute(statement, params).fetchall()

    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise IndexFailure(f"{where}: {exc}") from exc
    try:
        yield run
        conn.execute("COMMIT")
    except BaseException as exc:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise IndexFailure(f"{where}: {exc}") from exc
        raise


class SqliteJobs(SqlJobs):
    """:class:`~bastion.jobs.base.Jobs` in a SQLite file (WAL; one connection per process, shared by threads)."""

    def __init__(self, path: str | Path, lease_seconds: float = LEASE_SECONDS) -> None:
        super().__init__(SQLITE, lease_seconds)
        self.path = str(path)
        self._lock = threading.Lock()
        # Every transaction of every process, and so the checkpoint that SQLite runs at the end of a commit, holds
        # this lock: no checkpoint runs beside another process's commit (SQLite's WAL-reset bug, see
        # bastion.index.sqlite_writer).
        self._lock_fd = os.open(self.path + WRITER_LOCK_SUFFIX, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")  # a power cut may lose progress: redone
            self._conn.execute("PRAGMA foreign_keys = ON")
            with self._transaction() as run:
                version = int(run("PRAGMA user_version", ())[0][0])
                if version > VERSION:
                    raise IndexFailure(f"jobs file {self.path} has schema version {version}, newer than this "
                                       f"Bastion's ({VERSION}): run the newer version")
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        run(statement, ())
                run(f"PRAGMA user_version = {VERSION}", ())
        except BaseException as exc:
            os.close(self._lock_fd)
            if isinstance(exc, sqlite3.Error):
                raise IndexFailure(f"jobs file {self.path}: {exc}") from exc
            raise

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Run]:
        with self._lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                with immediate_transaction(self._conn, f"jobs file {self.path}") as run:
                    yield run
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1
