"""Recording one stored object in the SQLite index: the statements of one transaction, in Python, and the common
case through the C ``Recorder`` (``_crecord.c``) on a connection of its own.

:func:`record` runs inside a transaction that :class:`bastion.index.sqlite.SqliteIndex` opened. A record writes as
few pages as it can: the instance's row and its indexes, its series' count and the change log; a level row only
when the instance's attributes for it differ from what the row holds (SQLite compares the texts in
:data:`LOOKUP`). :func:`record_in_c` records an instance that changes no level row in C, without the GIL, with the
same SQL; it writes nothing for any other, and :func:`record` records it.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from typing import Any

from bastion.errors import IndexFailure, StudyDeleted
from bastion.index import hidden
from bastion.index.columns import columns_for
from bastion.index.rows import (
    IndexRow,
    Levels,
    joined_summary,
    levels_of,
    now_iso,
    split_summary,
    status_against,
)
from bastion.index.schema import refresh_study_summaries
from bastion.model.compiled import load_extension
from bastion.model.levels import QueryLevel
from bastion.model.records import StoreStatus, parse_object_key

log = logging.getLogger("bastion.index")

#: The index's common record in C (``_crecord.c``), or None where the Python one runs.
CRECORD = load_extension("bastion.index._crecord")

#: What recording one instance needs to know, in one statement: the instance's current row (if any), then
#: its series, study and patient rows (all NULL where there is none), each with whether its ``attrs`` equal the
#: text given for it (compared by SQLite: the texts are not read back). SQLite looks each up by its key.
LOOKUP = ("SELECT i.blob_key, i.digest, i.size, i.stamp, i.series_uid, i.study_uid, "
          "se.modality, se.attrs = ?, se.study_uid, st.modalities, st.sop_classes, st.attrs = ?, st.patient_id, "
          "p.attrs = ? FROM (SELECT 1) LEFT JOIN instances i ON i.sop_uid = ? "
          "LEFT JOIN series se ON se.series_uid = ? LEFT JOIN studies st ON st.study_uid = ? "
          "LEFT JOIN patients p ON p.patient_id = ?")

#: The statements that record an instance whose level rows stay as they are (also run by :data:`CRECORD`).
INSERT_INSTANCE = "INSERT INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?)"
COUNT_INSTANCE = "UPDATE series SET num_instances = num_instances + 1 WHERE series_uid = ?"
INSERT_CHANGE = "INSERT INTO changes (kind, sop_uid, series_uid, study_uid, blob_key, at) VALUES (?,?,?,?,?,?)"



def open_recorder(path: str, lock_fd: int, pragmas: str) -> Any | None:
    """A C ``Recorder`` for the index file ``path`` (sharing its writers' lock ``lock_fd``), or None where
    :data:`CRECORD` is not built or cannot open it (the Python record does everything then: the C one is only
    faster, never needed)."""
    if CRECORD is None:
        return None
    try:
        return CRECORD.Recorder(path, lock_fd, LOOKUP, INSERT_INSTANCE, COUNT_INSTANCE, INSERT_CHANGE, pragmas)
    except (CRECORD.RecordError, OSError) as exc:
        log.warning("the compiled index record cannot open %s (%s): the index records in Python", path, exc)
        return None


def record_in_c(recorder: Any, row: IndexRow, durable: Callable[[], None] | None) -> tuple[StoreStatus, int] | None:
    """``row`` recorded by ``recorder`` (waiting for ``durable`` before the commit, as the Python path does), or
    None if it is not the common case (nothing written). The caller holds the index's own writer lock."""
    i = row.instance
    try:
        seq = recorder.begin(i.sop_uid, i.sop_class_uid, i.series_uid, i.study_uid, i.transfer_syntax, i.blob_key,
                             i.digest, i.size, row.patient_id, row.stamp, *row.texts, row.instance_number,
                             row.modality, now_iso())
        if seq is None:
            return None
        try:
            if durable is not None:
                durable()
        except BaseException:
            recorder.rollback()
            raise
        recorder.commit()
    except CRECORD.RecordError as exc:  # type: ignore[union-attr]
        raise IndexFailure(str(exc)) from exc
    return StoreStatus.STORED, seq


def record(conn: sqlite3.Connection, row: IndexRow,
           same_content: Callable[[str], bool] | None = None,
           keep_outdated: bool = True) -> tuple[StoreStatus, int | None]:
    """Record ``row`` in the transaction open on ``conn`` (:func:`~bastion.index.rows.status_against` says what
    that does): its status and change-log seq (None: a duplicate)."""
    inst = row.instance
    texts = row.texts[:3]
    keys = (inst.series_uid, inst.study_uid, row.patient_id)
    found = conn.execute(LOOKUP, (*texts, inst.sop_uid, *keys)).fetchone()
    status = status_against(row, (found[0], found[1], found[3]) if found[0] is not None else None, same_content)
    levels: Levels = levels_of(found)
    if status is StoreStatus.DUPLICATE or (status is StoreStatus.OUTDATED and not keep_outdated):
        return status, None
    if not keep_outdated and levels[1] is None and conn.execute(hidden.TOMBSTONE, (inst.study_uid,)).fetchone():
        # a new arrival (the ingest's record) into a deleted study, whose rows are hidden: only a store that would
        # make its study row again can meet one (the compiled record, which writes no level row, never does).
        # Writes hold the index's writer lock, which deleting takes too, so a deletion comes wholly before or
        # after this. (Undelete, rebuilds and recovery record the hidden versions again: keep_outdated.)
        raise StudyDeleted(f"study {inst.study_uid} is deleted: undelete it before storing into it",
                           uid=inst.study_uid)
    if status is StoreStatus.OUTDATED:
        if conn.execute("SELECT 1 FROM versions WHERE blob_key = ?", (inst.blob_key,)).fetchone():
            return StoreStatus.DUPLICATE, None  # this very version is kept already (a rebuild meeting it again)
        conn.execute("INSERT OR REPLACE INTO versions VALUES (?,?,?,?,?,?)",
                     (inst.blob_key, inst.sop_uid, inst.digest, inst.size, row.stamp, found[0]))
        return status, _change(conn, "superseded", inst.sop_uid, inst.series_uid, inst.study_uid, inst.blob_key)
    if status is StoreStatus.SUPERSEDED:
        conn.execute("INSERT OR REPLACE INTO versions VALUES (?,?,?,?,?,?)",
                     (found[0], inst.sop_uid, found[1], found[2], found[3], inst.blob_key))
        _remove_instance(conn, inst.sop_uid, found[4], found[5])
        _change(conn, "superseded", inst.sop_uid, found[4], found[5], found[0])
        # the removal may have changed or deleted the level rows: read them again
        levels = levels_of(conn.execute(LOOKUP, (*texts, "", *keys)).fetchone())
    _add_instance(conn, row, levels)
    return status, _change(conn, "stored", inst.sop_uid, inst.series_uid, inst.study_uid, inst.blob_key)


def delete(conn: sqlite3.Connection, sop_uid: str) -> int | None:
    """Remove instance ``sop_uid`` and its superseded versions in the transaction open on ``conn`` (its series,
    study and patient too once they hold nothing): the seq of the ``deleted`` change, or None if it is not
    indexed."""
    found = conn.execute("SELECT blob_key, series_uid, study_uid FROM instances WHERE sop_uid = ?",
                         (sop_uid,)).fetchone()
    if found is None:
        return None
    key, series_uid, study_uid = found
    conn.execute("DELETE FROM versions WHERE sop_uid = ?", (sop_uid,))
    _remove_instance(conn, sop_uid, series_uid, study_uid)
    return _change(conn, "deleted", sop_uid, series_uid, study_uid, key)


def finding(conn: sqlite3.Connection, kind: str, key: str) -> int:
    """A change-log entry ``kind`` about the version ``key`` of an instance, in the transaction open on ``conn``:
    its seq."""
    sop = (parse_object_key(key) or {}).get("sop", "")
    found = conn.execute("SELECT series_uid, study_uid FROM instances WHERE sop_uid = ?", (sop,)).fetchone()
    series_uid, study_uid = found if found is not None else ("", "")
    return _change(conn, kind, sop, series_uid, study_uid, key)


def _change(conn: sqlite3.Connection, kind: str, sop: str, series: str, study: str, key: str) -> int:
    cur = conn.execute(INSERT_CHANGE, (kind, sop, series, study, key, now_iso()))
    return int(cur.lastrowid or 0)


def _upsert(conn: sqlite3.Connection, table: str, key: str, values: dict[str, Any]) -> None:
    cols = ", ".join(values)
    marks = ", ".join("?" * len(values))
    updates = ", ".join(f"{c} = excluded.{c}" for c in values if c != key)
    conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks}) "
                 f"ON CONFLICT({key}) DO UPDATE SET {updates}", list(values.values()))


def _add_instance(conn: sqlite3.Connection, row: IndexRow, levels: Levels) -> None:
    """Insert the instance and bring its series, study and patient rows up to date.

    ``levels``: those three rows as :data:`LOOKUP` read them in this transaction, compared with the row's texts.
    """
    inst = row.instance
    pid = row.patient_id
    old_series, old_study, old_patient = levels
    new_series, new_study = old_series is None, old_study is None
    series_json, study_json, patient_json, image_json = row.texts
    # Each level's row takes the attributes of the newest instance; most instances repeat what their
    # series, study and patient rows already hold, and rewriting a row (and all its indexes) with the
    # same values is the costliest part of a commit, so an unchanged row is left alone.
    if old_patient is None or not old_patient[0]:
        _upsert(conn, "patients", "patient_id", {
            **columns_for(QueryLevel.PATIENT, row.attrs[QueryLevel.PATIENT]), "patient_id": pid,
            "attrs": patient_json})
    if old_study is None or not old_study[2] or old_study[3] != pid:
        _upsert(conn, "studies", "study_uid", {
            **columns_for(QueryLevel.STUDY, row.attrs[QueryLevel.STUDY]), "study_uid": inst.study_uid,
            "patient_id": pid, "attrs": study_json})
    if old_series is None or not old_series[1] or old_series[2] != inst.study_uid:
        _upsert(conn, "series", "series_uid", {
            **columns_for(QueryLevel.SERIES, row.attrs[QueryLevel.SERIES]), "series_uid": inst.series_uid,
            "study_uid": inst.study_uid, "attrs": series_json})
    conn.execute(INSERT_INSTANCE, (
        inst.sop_uid, inst.series_uid, inst.study_uid, inst.sop_class_uid, row.instance_number,
        inst.transfer_syntax, inst.blob_key, inst.digest, inst.size, row.stamp, image_json))
    conn.execute(COUNT_INSTANCE, (inst.series_uid,))
    if new_series:  # the study's and patient's instances are counted by their series (schema.INSTANCE_COUNTS)
        conn.execute("UPDATE studies SET num_series = num_series + 1 WHERE study_uid = ?", (inst.study_uid,))
        conn.execute("UPDATE patients SET num_series = num_series + 1, num_studies = num_studies + ? "
                     "WHERE patient_id = ?", (int(new_study), pid))
    modality = row.modality
    if old_series is not None and old_series[0] != modality:
        refresh_study_summaries(conn, inst.study_uid)  # the series changed modality: recount
        return
    modalities, classes = split_summary(old_study[0]) if old_study else set(), split_summary(old_study[1]) if old_study else set()
    if modality not in modalities and modality or inst.sop_class_uid not in classes:
        conn.execute("UPDATE studies SET modalities = ?, sop_classes = ? WHERE study_uid = ?",
                     (joined_summary(modalities | {modality}), joined_summary(classes | {inst.sop_class_uid}), inst.study_uid))


def _remove_instance(conn: sqlite3.Connection, sop: str, series_uid: str, study_uid: str) -> None:
    conn.execute("DELETE FROM instances WHERE sop_uid = ?", (sop,))
    pid = conn.execute("SELECT patient_id FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()[0]
    conn.execute("UPDATE series SET num_instances = num_instances - 1 WHERE series_uid = ?", (series_uid,))
    gone_series = conn.execute("DELETE FROM series WHERE series_uid = ? AND num_instances <= 0",
                               (series_uid,)).rowcount
    gone_study = 0
    if gone_series:
        conn.execute("UPDATE studies SET num_series = num_series - 1 WHERE study_uid = ?", (study_uid,))
        gone_study = conn.execute("DELETE FROM studies WHERE study_uid = ? AND num_series <= 0",
                                  (study_uid,)).rowcount
        conn.execute("UPDATE patients SET num_series = num_series - 1, num_studies = num_studies - ? "
                     "WHERE patient_id = ?", (gone_study, pid))
        conn.execute("DELETE FROM patients WHERE patient_id = ? AND num_studies <= 0", (pid,))
    if not gone_study:
        refresh_study_summaries(conn, study_uid)
