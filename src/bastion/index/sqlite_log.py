"""The SQLite index's change log (see :mod:`bastion.index.base` for what the log guarantees).

``changes.seq`` is the rowid, so SQLite hands out the largest plus one; a new log (new index, ``clear``,
``start_log_after``) and the continuation after a crash insert a row of kind
:data:`~bastion.index.schema.FLOOR_KIND` at the ``seq`` to go on after, which no read returns. The log's identity
(``log_epoch``, ``log_start``) lives in ``meta``.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import uuid

from bastion.index.base import Change, LogPosition
from bastion.index.rows import now_iso
from bastion.index.schema import FLOOR_KIND
from bastion.index.seqmark import SeqMark

log = logging.getLogger("bastion.index")


def stored_since(conn: sqlite3.Connection, cutoff: str) -> int:
    """How many objects were stored at or after ``cutoff`` (an ISO time as in ``changes.at``).

    ``at`` has no index (every store would have to update one): the first change at or after ``cutoff`` is
    found by a binary search over ``seq``, in whose order changes are made, and only the rows after it are read.
    """
    lo, hi = 1, int(conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]) + 1
    while lo < hi:  # the smallest seq whose change is at or after cutoff (hi: none)
        mid = (lo + hi) // 2
        row = conn.execute("SELECT seq, at FROM changes WHERE seq >= ? ORDER BY seq LIMIT 1", (mid,)).fetchone()
        if row is None or row[1] >= cutoff:
            hi = mid
        else:
            lo = row[0] + 1
    return int(conn.execute("SELECT count(*) FROM changes WHERE seq >= ? AND kind = 'stored'", (lo,)).fetchone()[0])


CHANGE_COLS = "seq, kind, sop_uid, series_uid, study_uid, blob_key, at"


def changes(conn: sqlite3.Connection, since: int, limit: int) -> list[Change]:
    """Entries of the log with ``seq > since`` (the floor rows left out), oldest first."""
    rows = conn.execute(f"SELECT {CHANGE_COLS} FROM changes WHERE seq > ? AND kind <> ? ORDER BY seq LIMIT ?",
                        (since, FLOOR_KIND, limit)).fetchall()
    return [Change(*r) for r in rows]


def log_meta(conn: sqlite3.Connection) -> tuple[str, int]:
    """The current change log's epoch and the ``seq`` it starts after."""
    found = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('log_epoch', 'log_start')").fetchall())
    return found["log_epoch"], int(found["log_start"])


def log_end(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0])


def insert_floor(conn: sqlite3.Connection, seq: int) -> None:
    """A row that makes SQLite hand out ``seq + 1`` next (never returned as a change)."""
    conn.execute("INSERT INTO changes VALUES (?, ?, '', '', '', '', ?)", (seq, FLOOR_KIND, now_iso()))


def start_log(conn: sqlite3.Connection, after: int, *, new_epoch: bool = True) -> LogPosition:
    """Drop the change log and start one whose entries' ``seq`` are greater than ``after`` and than every
    ``seq`` it held (in the transaction open on ``conn``)."""
    floor = max(after, log_end(conn), log_meta(conn)[1])
    conn.execute("DELETE FROM changes")
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchone():
        conn.execute("DELETE FROM sqlite_sequence")  # an index made before schema 5 (AUTOINCREMENT)
    insert_floor(conn, floor)
    epoch = uuid.uuid4().hex if new_epoch else log_meta(conn)[0]
    conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", (("log_epoch", epoch), ("log_start", str(floor))))
    return LogPosition(epoch, floor)


def move_log_after(conn: sqlite3.Connection, floor: int) -> None:
    """Move the whole change log up, in order, so that it starts after ``floor`` if it starts below (in the
    transaction open on ``conn``): a log built beside a live index that went on handing out ``seq`` meanwhile
    (:func:`bastion.index.sqlite_files.swap_in`). The epoch stays: nobody has read this log yet."""
    start = log_meta(conn)[1]
    if floor <= start:
        return
    conn.execute("UPDATE changes SET seq = -seq")  # two steps: no row meets another's seq on the way up
    conn.execute("UPDATE changes SET seq = ? - seq", (floor - start,))
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('log_start', ?)", (str(floor),))


def log_floor(path: str) -> int:
    """:func:`bastion.index.base.log_floor` for the SQLite index file ``path`` (opened read-only)."""
    floor = SeqMark(path).read()
    if not os.path.exists(path):
        return floor
    try:
        conn = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True, timeout=60)
        try:
            floor = max(floor, log_end(conn))
            start = conn.execute("SELECT value FROM meta WHERE key = 'log_start'").fetchone()
            return max(floor, int(start[0])) if start else floor
        finally:
            conn.close()
    except (sqlite3.Error, ValueError) as exc:
        log.warning("the index %s cannot be read (%s): its change log is taken to end at its mark, %d",
                    path, exc, floor)
        return floor
