"""Recording into the PostgreSQL index: the statements of one write transaction.

The rules are the SQLite index's (:mod:`bastion.index.sqlite_record`): a record writes the instance, its series'
count and the change log, and a level row only where the instance's attributes for it differ from what the row
holds. What PostgreSQL adds is that several nodes write at once, each through its own connections:

* **One writer per study at a time.** A transaction takes a transaction advisory lock on each study whose
  instances it adds or removes (:meth:`Tx.lock_studies`) before it reads anything of them, in the order of their
  UIDs: one that comes before a lock it holds is only tried, and if another writer has it the transaction is run
  again taking it first (:class:`LockOrder`), so that writers never wait for each other in a circle. The study's,
  its series' and its instances' rows, its counts and its ModalitiesInStudy / SOPClassesInStudy summaries are thus
  read and written by one transaction at a time, and stay exact. Level rows are written by ``INSERT ... ON
  CONFLICT`` upserts. A patient row, which the studies of a patient share, changes only by upserts and by
  increments that PostgreSQL applies to the newest row version; a count increment that finds the row gone (its
  last other study was removed meanwhile) writes it again.
* **The change log in commit order.** The entries of a transaction are inserted last, after every other lock is
  held (:meth:`Tx.flush`), under a shared transaction advisory lock of the log
  (:data:`~bastion.index.pg_schema.LOG_LOCK`) held until the commit. Whoever takes that lock exclusively
  (:func:`settle`) thus waits for every transaction that holds a ``seq`` to commit or roll back, and then knows
  that no ``seq`` up to the sequence's value will ever appear in the log that has not already.

A transaction that meets a deadlock, a unique violation (two nodes inserting one new instance, say) or a
:class:`LockOrder` is rolled back and run again by the caller (:mod:`bastion.index.postgresql`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from psycopg import Cursor, sql

from bastion.errors import StudyDeleted
from bastion.index.columns import columns_for
from bastion.index.pg_schema import LOG_LOCK, lock_key
from bastion.index.rows import (
    IndexRow,
    Levels,
    joined_summary,
    levels_of,
    now_iso,
    split_summary,
    status_against,
)
from bastion.index.schema import SUMMARY_SEP
from bastion.index.sqlcompile import fold
from bastion.model.levels import QueryLevel
from bastion.model.records import StoreStatus, parse_object_key

#: The SQLite index's lookup (:data:`bastion.index.sqlite_record.LOOKUP`), with the same columns.
LOOKUP = ("SELECT i.blob_key, i.digest, i.size, i.stamp, i.series_uid, i.study_uid, "
          "se.modality, se.attrs = %s, se.study_uid, st.modalities, st.sop_classes, st.attrs = %s, st.patient_id, "
          "p.attrs = %s FROM (SELECT 1) AS one LEFT JOIN instances i ON i.sop_uid = %s "
          "LEFT JOIN series se ON se.series_uid = %s LEFT JOIN studies st ON st.study_uid = %s "
          "LEFT JOIN patients p ON p.patient_id = %s")
#: A superseded version (SQLite's ``INSERT OR REPLACE``).
INSERT_VERSION = ("INSERT INTO versions VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT (blob_key) DO UPDATE SET "
                  "sop_uid = excluded.sop_uid, digest = excluded.digest, size = excluded.size, "
                  "stamp = excluded.stamp, superseded_by = excluded.superseded_by")
INSERT_INSTANCE = "INSERT INTO instances VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
INSERT_CHANGE = ("INSERT INTO changes (kind, sop_uid, series_uid, study_uid, blob_key, at) "
                 "VALUES (%s,%s,%s,%s,%s,%s) RETURNING seq")
#: ModalitiesInStudy and SOPClassesInStudy of one study, counted again (:func:`bastion.index.schema.
#: refresh_study_summaries`; the values are sorted by bytes, as Python sorts them).
REFRESH_SUMMARIES = (
    "UPDATE studies SET "
    "modalities = coalesce((SELECT string_agg(m, %(sep)s ORDER BY m) FROM (SELECT DISTINCT x.modality AS m "
    "FROM series x WHERE x.study_uid = studies.study_uid AND x.modality <> '') AS d), ''), "
    "sop_classes = coalesce((SELECT string_agg(c, %(sep)s ORDER BY c) FROM (SELECT DISTINCT y.sop_class_uid AS c "
    "FROM instances y WHERE y.study_uid = studies.study_uid) AS d), '') WHERE study_uid = %(uid)s")


def _text(value: Any) -> Any:
    """A column value as PostgreSQL can hold it: text has no NUL characters (SQLite's may)."""
    return value.replace("\x00", "") if isinstance(value, str) else value


class LockOrder(Exception):
    """A study's lock that a transaction needs comes before one it holds and another writer has it: the
    transaction is to be run again, taking the locks of ``studies`` with its first."""

    def __init__(self, studies: set[str]) -> None:
        super().__init__(f"the lock of study {min(studies)} is held by another writer")
        self.studies = studies


class Tx:
    """One write transaction on ``cur`` (open) of the index in schema ``schema``: the studies it has locked and
    the change-log entries it will insert at the end. ``first``: studies whose locks it takes with its first
    (those that a :class:`LockOrder` named)."""

    def __init__(self, cur: Cursor[Any], schema: str, first: frozenset[str] = frozenset()) -> None:
        self.cur = cur
        self.schema = schema
        self.first = first
        self.locked: set[str] = set()
        self.pending: list[tuple[str, str, str, str, str]] = []
        self.seqs: list[int] = []  # of the entries flush() inserted, in order (collect())
        self.at = ""  # their time
        self._inserted: list[Cursor[Any]] = []

    def execute(self, query: str | sql.Composed, params: Any = None) -> Cursor[Any]:
        return self.cur.execute(query, params)

    def lock_studies(self, *study_uids: str) -> bool:
        """Take the write lock of each study not held yet, in the order of their UIDs; True if one was taken.
        LockOrder if one comes before a lock held and another writer has it."""
        new = sorted(set(study_uids).union(self.first if not self.locked else ()) - self.locked)
        for uid in new:
            if self.locked and uid < max(self.locked):
                row = self.execute("SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))", (uid,)).fetchone()
                if not row or not row[0]:
                    raise LockOrder(self.locked | {uid})
            else:
                self.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (uid,))
            self.locked.add(uid)
        return bool(new)

    def change(self, kind: str, sop: str, series: str, study: str, key: str) -> int:
        """Queue a change-log entry; its place among the entries :meth:`flush` returns."""
        self.pending.append((kind, sop, series, study, key))
        return len(self.pending) - 1

    def flush(self) -> None:
        """Insert the queued entries, in order, under the log's shared lock; the last thing the transaction does
        before its commit (in a pipeline, their results come with the commit's: :meth:`collect`)."""
        if not self.pending:
            return
        self.execute(sql.SQL("SELECT pg_advisory_xact_lock_shared({}, {})").format(
            sql.Literal(LOG_LOCK), lock_key(self.schema)))
        self.at = now_iso()
        for entry in self.pending:
            cur = self.cur.connection.cursor()
            cur.execute(INSERT_CHANGE, (*entry, self.at))
            self._inserted.append(cur)
        self.pending.clear()

    def collect(self) -> None:
        """Once committed: the ``seq`` of the entries :meth:`flush` inserted, in :attr:`seqs`."""
        for cur in self._inserted:
            row = cur.fetchone()
            assert row is not None
            self.seqs.append(int(row[0]))
            cur.close()
        self._inserted.clear()

    def exists(self, query: str, params: Any) -> bool:
        """True if ``query`` (a statement ``RETURNING`` something) returned a row."""
        return self.execute(query, params).fetchone() is not None


def settle(cur: Cursor[Any], schema: str) -> int:
    """Wait for every transaction holding a ``seq`` to end (in the transaction open on ``cur``, which should do
    nothing else): the largest ``seq`` handed out, below which the log will never change but by a new log."""
    cur.execute(sql.SQL("SELECT pg_advisory_xact_lock({}, {})").format(sql.Literal(LOG_LOCK), lock_key(schema)))
    return handed_out(cur)


def handed_out(cur: Cursor[Any]) -> int:
    """The largest ``seq`` the sequence has handed out (0: none)."""
    row = cur.execute("SELECT last_value, is_called FROM changes_seq").fetchone()
    assert row is not None
    return int(row[0]) if row[1] else int(row[0]) - 1


def _lookup(tx: Tx, row: IndexRow, sop_uid: str) -> tuple[Any, ...]:
    inst = row.instance
    found = tx.execute(LOOKUP, (*row.texts[:3], sop_uid, inst.series_uid, inst.study_uid, row.patient_id)).fetchone()
    assert found is not None
    return tuple(found)


#: The common case in one statement (migration ``0008_record_new_instance``): an instance not yet indexed whose
#: series, study and patient rows already hold what it would write (:func:`_add_instance` writes no level row then),
#: recorded by a database function that runs the statements :func:`record` would, in one implicit transaction. It
#: returns the change-log entry's ``seq``, or NULL if it is not that case and nothing was written.
RECORD_NEW = "SELECT record_new_instance(" + ", ".join(["%s"] * 19) + ")"
#: After a connection lost during :data:`RECORD_NEW`, with its study locked: the ``seq`` of the entry it wrote, if
#: it committed (the entry's time, which the caller chose, finds it through the log's BRIN index).
RECORDED_NEW = "SELECT seq FROM changes WHERE at = %s AND blob_key = %s AND kind = 'stored'"
#: ... and whether the index holds the version it wrote, current or superseded since (the log may have been
#: started again meanwhile, by an online rebuild).
HOLDS_VERSION = ("SELECT 1 FROM instances WHERE sop_uid = %s AND blob_key = %s "
                 "UNION ALL SELECT 1 FROM versions WHERE blob_key = %s")


def record_new_params(row: IndexRow, schema: str, at: str) -> tuple[Any, ...]:
    """The parameters of :data:`RECORD_NEW` for ``row``, in the index in ``schema``, its entry made at ``at``."""
    inst = row.instance
    return (inst.sop_uid, inst.series_uid, inst.study_uid, inst.sop_class_uid, row.instance_number,
            inst.transfer_syntax, inst.blob_key, inst.digest, inst.size, row.stamp, row.texts[3], *row.texts[:3],
            row.patient_id, row.modality, LOG_LOCK, schema, at)


def recorded_new(tx: Tx, row: IndexRow, at: str) -> tuple[bool, int | None]:
    """Whether a :data:`RECORD_NEW` of ``row`` made at ``at`` committed, and its entry's ``seq`` (None if the log
    was started again since). The study's lock is taken first, so a call still running on the server (its client
    gone) has ended."""
    inst = row.instance
    tx.lock_studies(inst.study_uid)
    found = tx.execute(RECORDED_NEW, (at, inst.blob_key)).fetchone()
    if found is not None:
        return True, int(found[0])
    return tx.exists(HOLDS_VERSION, (inst.sop_uid, inst.blob_key, inst.blob_key)), None


def record(tx: Tx, row: IndexRow, same_content: Callable[[str], bool] | None = None,
           keep_outdated: bool = True) -> tuple[StoreStatus, int | None]:
    """Record ``row`` in ``tx``: its status and the place of its change-log entry among ``tx``'s (None: a
    duplicate, nothing written); :func:`~bastion.index.rows.status_against` says what it does."""
    inst = row.instance
    tx.lock_studies(inst.study_uid)
    found = _lookup(tx, row, inst.sop_uid)
    while found[0] is not None and tx.lock_studies(found[5]):  # indexed in another study: hold that one too
        found = _lookup(tx, row, inst.sop_uid)
    status = status_against(row, (found[0], found[1], found[3]) if found[0] is not None else None, same_content)
    levels: Levels = levels_of(found)
    if status is StoreStatus.DUPLICATE or (status is StoreStatus.OUTDATED and not keep_outdated):
        return status, None
    if not keep_outdated and levels[1] is None and tx.exists("SELECT 1 FROM tombstones WHERE study_uid = %s",
                                                             (inst.study_uid,)):
        # a new arrival (the ingest's record) into a deleted study, whose rows are hidden: only a store that would
        # make its study row again can meet one. The study is locked (deleting takes the same lock), so a deletion
        # comes wholly before or after this. (Undelete, rebuilds and recovery record the hidden versions again.)
        raise StudyDeleted(f"study {inst.study_uid} is deleted: undelete it before storing into it",
                           uid=inst.study_uid)
    if status is StoreStatus.OUTDATED:
        if tx.exists("SELECT 1 FROM versions WHERE blob_key = %s", (inst.blob_key,)):
            return StoreStatus.DUPLICATE, None  # this very version is kept already (a rebuild meeting it again)
        tx.execute(INSERT_VERSION, (inst.blob_key, inst.sop_uid, inst.digest, inst.size, row.stamp, found[0]))
        return status, tx.change("superseded", inst.sop_uid, inst.series_uid, inst.study_uid, inst.blob_key)
    if status is StoreStatus.SUPERSEDED:
        tx.execute(INSERT_VERSION, (found[0], inst.sop_uid, found[1], found[2], found[3], inst.blob_key))
        _remove_instance(tx, inst.sop_uid, found[4], found[5])
        tx.change("superseded", inst.sop_uid, found[4], found[5], found[0])
        levels = levels_of(_lookup(tx, row, ""))  # the removal may have changed or deleted the level rows
    _add_instance(tx, row, levels)
    return status, tx.change("stored", inst.sop_uid, inst.series_uid, inst.study_uid, inst.blob_key)


def finding(tx: Tx, kind: str, key: str) -> tuple[str, str, str, int]:
    """A change-log entry ``kind`` about the version ``key`` of an instance in ``tx``: its SOP Instance, series
    and study UIDs (series and study empty where it is not indexed) and the entry's place."""
    sop = (parse_object_key(key) or {}).get("sop", "")
    found = tx.execute("SELECT series_uid, study_uid FROM instances WHERE sop_uid = %s", (sop,)).fetchone()
    series_uid, study_uid = found if found is not None else ("", "")
    return sop, series_uid, study_uid, tx.change(kind, sop, series_uid, study_uid, key)


def delete(tx: Tx, sop_uid: str) -> tuple[str, str, str, int] | None:
    """Remove instance ``sop_uid`` and its superseded versions in ``tx`` (its series, study and patient too once
    they hold nothing): its series, study and blob key, and the place of the ``deleted`` entry; None if it is not
    indexed."""
    found = None
    while True:
        found = tx.execute("SELECT blob_key, series_uid, study_uid FROM instances WHERE sop_uid = %s",
                           (sop_uid,)).fetchone()
        if found is None or not tx.lock_studies(found[2]):
            break  # read again once its study is held: it may have moved or gone meanwhile
    if found is None:
        return None
    key, series_uid, study_uid = found
    tx.execute("DELETE FROM versions WHERE sop_uid = %s", (sop_uid,))
    _remove_instance(tx, sop_uid, series_uid, study_uid)
    return series_uid, study_uid, key, tx.change("deleted", sop_uid, series_uid, study_uid, key)


#: The table and key of each level row an instance has above it.
_LEVEL_TABLES = {QueryLevel.PATIENT: ("patients", "patient_id"), QueryLevel.STUDY: ("studies", "study_uid"),
                 QueryLevel.SERIES: ("series", "series_uid")}


def _upsert(tx: Tx, row: IndexRow, level: QueryLevel) -> None:
    """Write ``row``'s patient, study or series row (``level``): inserted, or updated where it exists."""
    inst = row.instance
    own = {QueryLevel.PATIENT: {"patient_id": row.patient_id, "attrs": row.texts[2]},
           QueryLevel.STUDY: {"study_uid": inst.study_uid, "patient_id": row.patient_id, "attrs": row.texts[1]},
           QueryLevel.SERIES: {"series_uid": inst.series_uid, "study_uid": inst.study_uid, "attrs": row.texts[0]}}
    values = {**columns_for(level, row.attrs[level]), **own[level]}
    if level is QueryLevel.STUDY:  # the patient's name, on the study row too (migration 0004)
        values["patient_name_key"] = patient_name_key(row)
    table, key = _LEVEL_TABLES[level]
    updates = ", ".join(f"{c} = excluded.{c}" for c in values if c != key)
    tx.execute(f"INSERT INTO {table} ({', '.join(values)}) VALUES ({', '.join(['%s'] * len(values))}) "
               f"ON CONFLICT ({key}) DO UPDATE SET {updates}", [_text(v) for v in values.values()])


def patient_name_key(row: IndexRow) -> str:
    """``studies.patient_name_key`` of ``row``: its patient's name as searches compare it (ASCII-lowered)."""
    return fold(str(columns_for(QueryLevel.PATIENT, row.attrs[QueryLevel.PATIENT])["patient_name"]))


def _add_instance(tx: Tx, row: IndexRow, levels: Levels) -> None:
    """Insert the instance and bring its series, study and patient rows up to date (``levels``: those rows as
    :data:`LOOKUP` read them with the study locked). A level row whose text is the instance's is left as it is."""
    inst = row.instance
    pid = row.patient_id
    old_series, old_study, old_patient = levels
    new_series, new_study = old_series is None, old_study is None
    stale = {QueryLevel.PATIENT: old_patient is None or not old_patient[0],
             QueryLevel.STUDY: old_study is None or not old_study[2] or old_study[3] != pid,
             QueryLevel.SERIES: old_series is None or not old_series[1] or old_series[2] != inst.study_uid}
    for level in _LEVEL_TABLES:
        if stale[level]:
            _upsert(tx, row, level)
    if stale[QueryLevel.PATIENT] and old_patient is not None:  # the patient's other studies carry its name too
        name = patient_name_key(row)
        tx.execute("UPDATE studies SET patient_name_key = %s WHERE patient_id = %s AND patient_name_key <> %s",
                   (name, pid, name))
    tx.execute(INSERT_INSTANCE, (
        inst.sop_uid, inst.series_uid, inst.study_uid, inst.sop_class_uid, row.instance_number,
        inst.transfer_syntax, inst.blob_key, inst.digest, inst.size, row.stamp, row.texts[3]))
    tx.execute("UPDATE series SET num_instances = num_instances + 1 WHERE series_uid = %s", (inst.series_uid,))
    if new_series:  # the study's and patient's instances are counted by their series (schema.INSTANCE_COUNTS)
        tx.execute("UPDATE studies SET num_series = num_series + 1 WHERE study_uid = %s", (inst.study_uid,))
        count = ("UPDATE patients SET num_series = num_series + 1, num_studies = num_studies + %s "
                 "WHERE patient_id = %s RETURNING 1")
        if not tx.exists(count, (int(new_study), pid)):  # removed with its last other study meanwhile
            _upsert(tx, row, QueryLevel.PATIENT)
            tx.execute(count, (int(new_study), pid))
    modality = row.modality
    if old_series is not None and old_series[0] != modality:
        tx.execute(REFRESH_SUMMARIES, {"sep": SUMMARY_SEP, "uid": inst.study_uid})  # the series changed modality
        return
    modalities, classes = split_summary(old_study[0]) if old_study else set(), split_summary(old_study[1]) if old_study else set()
    if modality not in modalities and modality or inst.sop_class_uid not in classes:
        tx.execute("UPDATE studies SET modalities = %s, sop_classes = %s WHERE study_uid = %s",
                   (joined_summary(modalities | {modality}), joined_summary(classes | {inst.sop_class_uid}), inst.study_uid))


def _remove_instance(tx: Tx, sop: str, series_uid: str, study_uid: str) -> None:
    """Remove an instance of a study ``tx`` holds, and its series, study and patient rows once they are empty."""
    tx.execute("DELETE FROM instances WHERE sop_uid = %s", (sop,))
    found = tx.execute("SELECT patient_id FROM studies WHERE study_uid = %s", (study_uid,)).fetchone()
    tx.execute("UPDATE series SET num_instances = num_instances - 1 WHERE series_uid = %s", (series_uid,))
    gone_series = tx.exists("DELETE FROM series WHERE series_uid = %s AND num_instances <= 0 RETURNING 1",
                            (series_uid,))
    gone_study = 0
    if gone_series:
        tx.execute("UPDATE studies SET num_series = num_series - 1 WHERE study_uid = %s", (study_uid,))
        gone_study = int(tx.exists("DELETE FROM studies WHERE study_uid = %s AND num_series <= 0 RETURNING 1",
                                   (study_uid,)))
        if found is not None:
            tx.execute("UPDATE patients SET num_series = num_series - 1, num_studies = num_studies - %s "
                       "WHERE patient_id = %s", (gone_study, found[0]))
            tx.execute("DELETE FROM patients WHERE patient_id = %s AND num_studies <= 0", (found[0],))
    if not gone_study:
        tx.execute(REFRESH_SUMMARIES, {"sep": SUMMARY_SEP, "uid": study_uid})


def clear_tables(tx: Tx, tables: Iterable[str]) -> None:
    """Empty ``tables`` (a ``TRUNCATE``: it waits for the transactions that use them)."""
    tx.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(sql.Identifier(t) for t in tables)))
