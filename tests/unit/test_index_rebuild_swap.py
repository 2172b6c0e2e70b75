"""``bastion index rebuild``'s swap (``bastion.index.sqlite_files.rebuild_into``, and its two steps apart for the
online rebuild): a new SQLite index built beside the live one replaces it whole, never meets its write-ahead log,
keeps the change-log mark from going down and hands out no ``seq`` twice, and a failed build or catch-up leaves the
live index as it was. Real files, real SQLite."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from contract.test_index import obj

from bastion.index import Index, log_floor
from bastion.index.seqmark import SUFFIX as SEQMARK_SUFFIX
from bastion.index.seqmark import SeqMark
from bastion.index.sqlite import SqliteIndex
from bastion.index.sqlite_files import (
    INDEX_FILE_SUFFIXES,
    REBUILD_SUFFIX,
    WAL_SUFFIXES,
    build_beside,
    built_beside,
    rebuild_into,
    swap_in,
)

pytestmark = pytest.mark.timeout(60)

_LEFT_WITH_ITS_WAL = """
import os, sys
sys.path.insert(0, sys.argv[2])
from contract.test_index import obj
from bastion.index.sqlite import SqliteIndex
index = SqliteIndex(sys.argv[1])
for n in range(20):
    index.record(obj(f"1.8.{n}", number=n))
os._exit(0)  # no close: the write-ahead log stays behind, as after a crash
"""


def _sop_uids(path: Path) -> list[str]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return [row[0] for row in db.execute("SELECT sop_uid FROM instances ORDER BY sop_uid")]
    finally:
        db.close()


def _beside(path: Path) -> set[str]:
    return {p.name for p in path.parent.iterdir()}


def _fill(index: Index) -> int:
    for n in (1, 2, 3):
        index.record(obj(f"1.9.{n}", number=n))
    return 3


def test_the_new_index_replaces_the_live_one_and_never_meets_its_write_ahead_log(tmp_path: Path) -> None:
    live = tmp_path / "index.sqlite3"
    tests = str(Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", _LEFT_WITH_ITS_WAL, str(live), tests], check=True, timeout=60)
    assert os.path.getsize(str(live) + "-wal") > 0  # the old index's last commits are in its log
    floor = log_floor(str(live))
    assert floor >= 20

    assert rebuild_into(str(live), _fill) == 3

    assert not any(os.path.exists(str(live) + suffix) for suffix in WAL_SUFFIXES)  # (before anything opens it)
    assert not any(name.startswith(live.name + REBUILD_SUFFIX) for name in _beside(live))
    assert _sop_uids(live) == ["1.9.1", "1.9.2", "1.9.3"]
    assert log_floor(str(live)) >= floor  # the mark never goes down, though this build's log starts at 1
    index = SqliteIndex(str(live))
    try:
        assert [c.sop_uid for c in index.changes()] == ["1.9.1", "1.9.2", "1.9.3"]
    finally:
        index.close()


def test_a_failed_build_leaves_the_live_index_as_it_was(tmp_path: Path) -> None:
    live = tmp_path / "index.sqlite3"
    index = SqliteIndex(str(live))
    _fill(index)
    index.close()
    before = live.read_bytes()

    def failing(index: Index) -> None:
        index.record(obj("1.7.1"))
        raise RuntimeError("the blob store went away")

    with pytest.raises(RuntimeError, match="went away"):
        rebuild_into(str(live), failing)
    assert live.read_bytes() == before and _sop_uids(live) == ["1.9.1", "1.9.2", "1.9.3"]
    assert not any(name.startswith(live.name + REBUILD_SUFFIX) for name in _beside(live))


def test_what_an_interrupted_rebuild_left_is_removed_first(tmp_path: Path) -> None:
    live = tmp_path / "index.sqlite3"
    for suffix in INDEX_FILE_SUFFIXES:  # a rebuild killed half-way, its files torn
        Path(str(live) + REBUILD_SUFFIX + suffix).write_bytes(b"torn")
    Path(str(live) + REBUILD_SUFFIX + SEQMARK_SUFFIX).write_bytes(b"00000000000000000005\n")
    assert rebuild_into(str(live), _fill) == 3  # no live index before: one is made
    assert _sop_uids(live) == ["1.9.1", "1.9.2", "1.9.3"]
    assert not any(name.startswith(live.name + REBUILD_SUFFIX) for name in _beside(live))


def test_an_in_memory_index_is_not_rebuilt_into_a_file() -> None:
    with pytest.raises(ValueError):
        rebuild_into(":memory:", _fill)


def test_a_log_built_beside_a_live_index_that_went_on_is_moved_past_it(tmp_path: Path) -> None:
    live = tmp_path / "index.sqlite3"
    index = SqliteIndex(str(live))
    _fill(index)
    index.close()
    after = log_floor(str(live))

    def build(new: Index) -> None:
        new.start_log_after(after)
        _fill(new)

    build_beside(str(live), build)
    went_on = SeqMark(str(live)).raise_to(after + 1000)  # the live index handed out more while the new one was built
    swap_in(str(live), lambda new: new.record(obj("1.9.4", number=4)))  # the catch-up before the swap

    index = SqliteIndex(str(live))
    try:
        changes = index.changes()
        assert [c.sop_uid for c in changes] == ["1.9.1", "1.9.2", "1.9.3", "1.9.4"]  # in order, none lost
        assert min(c.seq for c in changes) > went_on and index.log_start().seq >= went_on  # no seq handed out twice
        assert index.log_end().seq == max(c.seq for c in changes)
    finally:
        index.close()
    assert log_floor(str(live)) >= went_on
    assert not built_beside(str(live))


def test_a_failed_catch_up_swaps_nothing(tmp_path: Path) -> None:
    live = tmp_path / "index.sqlite3"
    index = SqliteIndex(str(live))
    index.record(obj("1.7.1"))
    index.close()
    build_beside(str(live), _fill)

    def failing(new: Index) -> None:
        raise RuntimeError("the blob store went away")

    with pytest.raises(RuntimeError, match="went away"):
        swap_in(str(live), failing)
    assert _sop_uids(live) == ["1.7.1"] and built_beside(str(live))
