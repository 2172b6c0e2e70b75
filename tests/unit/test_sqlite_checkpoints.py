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


def test_a_damaged_index_file_is_noticed_and_noted_for_every_process(tmp_path: Path) -> None:
    """A statement that meets a damaged page: the query fails (IndexFailure), and the note beside the file says
    so to every process (``/health``, the next start's check), until the file is replaced."""
    from bastion.errors import IndexFailure
    from bastion.index.sqlite_damage import note_damage
    from bastion.index.sqlite_files import set_aside_if_corrupt
    from bastion.model.levels import QueryLevel

    path = tmp_path / "index.sqlite3"
    index = SqliteIndex(str(path))
    index.close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")  # the file alone holds the database
        roots = [r for (r,) in conn.execute("SELECT rootpage FROM sqlite_master WHERE tbl_name IN "
                                            "('patients', 'studies', 'series', 'instances')")]
        page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with open(path, "r+b") as fh:  # the level tables' root pages (and their indexes'): no longer b-tree pages
        for root in roots:
            fh.seek((root - 1) * page)
            fh.write(b"\xff" * 64)
    index = SqliteIndex(str(path))
    try:
        assert index.damage() is None
        try:
            list(index.find(QueryLevel.IMAGE, []))
        except IndexFailure as exc:
            assert "malformed" in str(exc)
        else:
            raise AssertionError("a query over the damaged table succeeded")
        damage = index.damage()
        assert damage is not None and "malformed" in damage
        assert not note_damage(str(path), "again")  # noted once
    finally:
        index.close()
    assert set_aside_if_corrupt(str(path)) is not None
    assert not path.exists() and not Path(f"{path}-damaged").exists()


def test_a_note_about_a_file_since_replaced_is_ignored(tmp_path: Path) -> None:
    from bastion.index.sqlite_damage import note_damage, noted_damage

    path = tmp_path / "index.sqlite3"
    SqliteIndex(str(path)).close()
    assert note_damage(str(path), "database disk image is malformed")
    assert noted_damage(str(path)) is not None
    replacement = tmp_path / "new.sqlite3"
    SqliteIndex(str(replacement)).close()
    os.replace(replacement, path)  # bastion index rebuild swaps a new file in
    assert noted_damage(str(path)) is None
