"""No SQLite checkpoint runs beside a commit of another process: SQLite's WAL-reset bug
(https://sqlite.org/wal.html#walresetbug, 3.7.0 to 3.51.2) loses committed transactions and corrupts the database
when a checkpoint starts while another connection's commit starts the WAL over. Bastion's index and jobs file
take one ``flock`` around every write transaction and every checkpoint, so the race cannot happen whatever the
SQLite version. These tests hold that lock as another process's writer would, and check that a checkpoint waits.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bastion.index.sqlite import SqliteIndex
from bastion.index.sqlite_files import WRITER_LOCK_SUFFIX
from bastion.jobs.sqlite import SqliteJobs


@contextmanager
def writers_lock(path: Path) -> Iterator[None]:
    """The lock every writer of the database ``path`` takes, held as another process's writer holds it."""
    fd = os.open(f"{path}{WRITER_LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # an flock: closing the last description of it releases it


def waits_for_the_lock(path: Path, action: Callable[[], object]) -> None:
    """Hold the writers' lock of ``path``, start ``action`` in a thread: it must not finish before the lock is
    released, and must finish after."""
    done = threading.Event()

    def run() -> None:
        action()
        done.set()

    with writers_lock(path):
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert not done.wait(0.5), "it ran while another process held the writers' lock"
    thread.join(30)
    assert done.is_set()


def test_an_index_checkpoint_waits_for_the_writers_and_then_copies_the_wal(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    index = SqliteIndex(str(path))
    other = sqlite3.connect(path, isolation_level=None)  # another writer's commit, left in the WAL
    try:
        other.execute("PRAGMA wal_autocheckpoint=0")
        other.execute("CREATE TABLE filler (b BLOB)")
        other.execute("INSERT INTO filler VALUES (zeroblob(1 << 20))")
        size = path.stat().st_size
        waits_for_the_lock(path, index.checkpoint)
        assert path.stat().st_size >= size + (1 << 20)  # the megabyte was copied into the database file
    finally:
        other.close()
        index.close()


def test_a_jobs_transaction_and_the_checkpoint_at_its_commit_wait_for_the_other_processes(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    jobs = SqliteJobs(path)
    try:
        waits_for_the_lock(path, lambda: jobs.begin("c-move", "k1", {"destination": "DEST"}, "owner-a"))
        job = jobs.get("k1")
        assert job is not None and job.owner == "owner-a"
    finally:
        jobs.close()
