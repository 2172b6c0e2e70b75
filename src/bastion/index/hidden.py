"""Deleted studies in the index: tombstones, and the instances moved out of the query tables (both backends).

A deleted study (:mod:`bastion.ingest.deletion`) is *hidden*: its instances' rows leave ``instances`` and
``versions`` (and its series, study and patient rows once they hold nothing), exactly as
:meth:`bastion.index.base.Index.delete_instance` removes them, so that the query tables, and with them QIDO-RS,
C-FIND, WADO, C-MOVE/C-GET and the viewer, hold no trace of it and the search path is untouched. What undelete
and purge need is kept in ``deleted_instances``: each version's blob key, SOP Instance, Series and Study UIDs and
ingest stamp (undelete reads those objects again and records them, oldest first, without listing the blob store).
``tombstones`` holds each deleted study's tombstone: its state-log entry (:mod:`bastion.blobs.statelog`) as JSON.

Both tables are derived: the state log in the blob store is the truth, and a rebuild makes them again.

The statements are written once, with ``?`` placeholders (SQLite's); :func:`postgresql` turns them into
psycopg's. Each function runs in the write transaction its caller opened, through ``ex(statement, params)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class _Cursor(Protocol):
    def fetchall(self) -> list[Any]: ...

    def fetchone(self) -> Any: ...


Execute = Callable[[str, Sequence[Any]], _Cursor]

STUDY_INSTANCES = "SELECT sop_uid, series_uid FROM instances WHERE study_uid = ?"
#: A version of an instance kept for undelete and purge (its current version from ``instances``, its superseded
#: ones from ``versions``).
KEEP = ("INSERT INTO deleted_instances (blob_key, study_uid, sop_uid, series_uid, stamp) "
        "SELECT blob_key, ?, sop_uid, ?, stamp FROM {table} WHERE sop_uid = ? ON CONFLICT (blob_key) DO NOTHING")
HIDDEN_VERSIONS = "SELECT stamp, blob_key FROM deleted_instances WHERE study_uid = ? ORDER BY stamp, blob_key"
#: One row per hidden instance: its series and its newest version's key (for the ``deleted`` change of a purge).
HIDDEN_INSTANCES = ("SELECT sop_uid, max(series_uid), max(blob_key) FROM deleted_instances WHERE study_uid = ? "
                    "GROUP BY sop_uid ORDER BY sop_uid")
FORGET = "DELETE FROM deleted_instances WHERE study_uid = ?"
#: One kept version dropped (a refused store's, whose blob is removed).
TOMBSTONE = "SELECT entry FROM tombstones WHERE study_uid = ?"
TOMBSTONES = "SELECT entry FROM tombstones ORDER BY study_uid"
SET_TOMBSTONE = ("INSERT INTO tombstones (study_uid, entry) VALUES (?, ?) "
                 "ON CONFLICT (study_uid) DO UPDATE SET entry = excluded.entry")
DROP_TOMBSTONE = "DELETE FROM tombstones WHERE study_uid = ?"


def postgresql(statement: str) -> str:
    """``statement`` with psycopg's placeholders."""
    return statement.replace("?", "%s")


def hide(ex: Execute, remove: Callable[[str], T | None], study_uid: str) -> list[T]:
    """Keep every version of the study's instances in ``deleted_instances``, then ``remove`` each instance (the
    backend's :meth:`~bastion.index.base.Index.delete_instance` statements, which record its ``deleted`` change);
    what ``remove`` returned for each."""
    removed: list[T] = []
    for sop_uid, series_uid in ex(STUDY_INSTANCES, (study_uid,)).fetchall():
        for table in ("instances", "versions"):
            ex(KEEP.format(table=table), (study_uid, series_uid, sop_uid))
        done = remove(sop_uid)
        if done is not None:
            removed.append(done)
    return removed


def tombstone_statement(study_uid: str, entry: str | None) -> tuple[str, tuple[str, ...]]:
    """The statement and parameters that keep ``entry`` as the study's tombstone, or drop it (None)."""
    return (DROP_TOMBSTONE, (study_uid,)) if entry is None else (SET_TOMBSTONE, (study_uid, entry))


def hidden_versions(ex: Execute, study_uid: str) -> list[tuple[str, str]]:
    """The kept versions of the study's hidden instances as ``(stamp, blob key)``, oldest first."""
    return [(str(stamp), str(key)) for stamp, key in ex(HIDDEN_VERSIONS, (study_uid,)).fetchall()]


def forget(ex: Execute, change: Callable[[str, str, str], T] | None, study_uid: str) -> list[T]:
    """Drop the study's kept versions; with ``change`` (a purge), call it for each hidden
    instance with its SOP Instance UID, Series Instance UID and newest blob key first (to record its ``deleted``
    change), and return what it returned."""
    made: list[T] = []
    if change is not None:
        for sop_uid, series_uid, key in ex(HIDDEN_INSTANCES, (study_uid,)).fetchall():
            made.append(change(sop_uid, series_uid, key))
    ex(FORGET, (study_uid,))
    return made


def held(ex: Execute, blob_keys: Sequence[str]) -> set[str]:
    """Those of ``blob_keys`` kept for a hidden study (at most a few hundred at a time)."""
    if not blob_keys:
        return set()
    marks = ",".join("?" * len(blob_keys))
    return {row[0] for row in ex(f"SELECT blob_key FROM deleted_instances WHERE blob_key IN ({marks})",
                                 list(blob_keys)).fetchall()}
