"""The "stored in the last minute" statistic finds its first change by binary search over seq (no index on at)."""

from __future__ import annotations

import sqlite3

import pytest

from bastion.index.schema import DDL
from bastion.index.sqlite_log import stored_since as _stored_since


@pytest.mark.parametrize("gaps", [False, True])
def test_counts_stored_changes_at_or_after_the_cutoff(gaps: bool) -> None:
    conn = sqlite3.connect(":memory:")
    conn.executescript(DDL)
    assert _stored_since(conn, "2026-01-01T00:00:00.000+00:00") == 0
    for minute in range(60):
        for n in range(7):
            kind = "superseded" if n == 3 else "stored"
            conn.execute("INSERT INTO changes (kind, sop_uid, series_uid, study_uid, blob_key, at) "
                         "VALUES (?, '1', '2', '3', 'k', ?)", (kind, f"2026-01-01T10:{minute:02d}:0{n}.000+00:00"))
    if gaps:  # rolled-back inserts leave holes in seq
        conn.execute("DELETE FROM changes WHERE seq % 5 = 0")
    rows = conn.execute("SELECT kind, at FROM changes").fetchall()
    for cutoff in ("2026-01-01T09:00:00.000+00:00", "2026-01-01T10:30:00.000+00:00",
                   "2026-01-01T10:30:03.500+00:00", "2026-01-01T10:59:06.000+00:00", "2026-01-01T11:00:00.000+00:00"):
        expected = sum(1 for kind, at in rows if kind == "stored" and at >= cutoff)
        assert _stored_since(conn, cutoff) == expected, cutoff
