"""The index keeps every commit through ``kill -9`` while its WAL keeps starting over (item 61 in BENCHMARKS.md)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from bastion.index import open_index

pytestmark = pytest.mark.timeout(120)

CONTRACT = Path(__file__).resolve().parents[1] / "contract"

# A writer that never pauses, its WAL started over every few commits (checkpoints every 2 ms), printing each
# instance once its record returned: what it printed is committed.
WRITER = f"""
import sys
sys.path[:0] = [{str(CONTRACT)!r}, {str(CONTRACT.parent)!r}]  # test_index imports the tests' conftest
from bastion.index import sqlite_writer
sqlite_writer._CHECKPOINT_S = 0.002
from bastion.index import open_index
from test_index import obj
idx = open_index(sys.argv[1])
i = idx.statistics().instances
while True:
    idx.record(obj(f"1.2.3.1.{{i}}", number=i))
    print(i, flush=True)
    i += 1
"""


def _wal_resets(wal: Path) -> int:
    """The WAL header's checkpoint sequence number: how many times the WAL has started over (0 for none yet)."""
    try:
        header = wal.read_bytes()[:32]
    except FileNotFoundError:
        return 0
    return int.from_bytes(header[12:16], "big") if len(header) == 32 else 0


def test_a_killed_writer_loses_no_commit_while_the_wal_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    wal = Path(f"{path}-wal")
    for round_ in range(4):
        resets = _wal_resets(wal)
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert writer.stdout is not None
        first = last = -1
        for line in writer.stdout:  # well past a hundred restarts of the WAL, then at a different point each time
            last = int(line)
            first = last if first < 0 else first
            if last - first >= 500 + 97 * round_:
                break
        writer.kill()
        writer.wait()
        assert last >= 0, "the writer recorded nothing"
        assert _wal_resets(wal) > resets  # it did start over meanwhile (its size says little on a loaded machine)
        with closing(sqlite3.connect(path)) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        idx = open_index(str(path))
        try:
            assert idx.statistics().instances >= last + 1
            assert all(idx.current(f"1.2.3.1.{i}") is not None for i in range(last + 1))
        finally:
            idx.close()
