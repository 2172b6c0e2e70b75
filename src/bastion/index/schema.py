"""The index schema (SQLite dialect) and its migrations. Everything here is derivable from the blob store.

``studies.modalities`` and ``studies.sop_classes`` hold ModalitiesInStudy and
SOPClassesInStudy (PS3.4 C.6.2.1.2), sorted and ``\\``-joined: a summary of the study's
series and instances that the record path keeps current, so a study search does not run
two subqueries per result.

Of the counts, only ``series.num_instances`` changes with every stored instance; the study's and the patient's
numbers of instances are summed from their series rows when a search returns them (:data:`INSTANCE_COUNTS`),
and their numbers of series and studies change only when one is added or removed. A commit that records an
instance thus writes one level page, not three (an index made before schema 5 keeps two unused count columns:
:data:`MIGRATE_4_TO_5`). The ordering indexes end with the tie-breaking UID so that
``ORDER BY ... LIMIT`` walks an index instead of sorting.

The change log's identity lives in ``meta``: ``log_epoch`` (a random id a new log gets) and ``log_start`` (the
``seq`` it starts after). A row of kind :data:`FLOOR_KIND` holds a ``seq`` the log continues after (SQLite
gives a new row the largest rowid plus one); it is no change and is never returned (see
:mod:`bastion.index.base` for what the log guarantees).
"""

import contextlib
import sqlite3

from bastion.errors import IndexFailure

SCHEMA_VERSION = 8

#: The kind of the change-log rows that only hold a floor for ``seq`` (never returned as changes).
FLOOR_KIND = "floor"

#: Joins the values of ModalitiesInStudy / SOPClassesInStudy in their columns.
SUMMARY_SEP = "\\"

DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

CREATE TABLE IF NOT EXISTS patients (
  patient_id TEXT PRIMARY KEY,
  patient_name TEXT NOT NULL DEFAULT '' COLLATE NOCASE,
  patient_birth_date TEXT NOT NULL DEFAULT '',
  patient_sex TEXT NOT NULL DEFAULT '',
  attrs TEXT NOT NULL,
  num_studies INTEGER NOT NULL DEFAULT 0,
  num_series INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS patients_name_id ON patients(patient_name, patient_id);

CREATE TABLE IF NOT EXISTS studies (
  study_uid TEXT PRIMARY KEY,
  patient_id TEXT NOT NULL,
  study_date TEXT NOT NULL DEFAULT '',
  study_time TEXT NOT NULL DEFAULT '',
  accession_number TEXT NOT NULL DEFAULT '',
  study_id TEXT NOT NULL DEFAULT '',
  study_description TEXT NOT NULL DEFAULT '',
  referring_physician TEXT NOT NULL DEFAULT '' COLLATE NOCASE,
  attrs TEXT NOT NULL,
  num_series INTEGER NOT NULL DEFAULT 0,
  modalities TEXT NOT NULL DEFAULT '',
  sop_classes TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS studies_patient_order ON studies(patient_id, study_date, study_time, study_uid DESC);
CREATE INDEX IF NOT EXISTS studies_order ON studies(study_date, study_time, study_uid DESC);
CREATE INDEX IF NOT EXISTS studies_accession ON studies(accession_number);

CREATE TABLE IF NOT EXISTS series (
  series_uid TEXT PRIMARY KEY,
  study_uid TEXT NOT NULL,
  modality TEXT NOT NULL DEFAULT '',
  series_number INTEGER,
  series_description TEXT NOT NULL DEFAULT '',
  series_date TEXT NOT NULL DEFAULT '',
  body_part TEXT NOT NULL DEFAULT '',
  attrs TEXT NOT NULL,
  num_instances INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS series_order ON series(study_uid, series_number, series_uid);
CREATE INDEX IF NOT EXISTS series_modality ON series(modality, study_uid);

CREATE TABLE IF NOT EXISTS instances (
  sop_uid TEXT PRIMARY KEY,
  series_uid TEXT NOT NULL,
  study_uid TEXT NOT NULL,
  sop_class_uid TEXT NOT NULL,
  instance_number INTEGER,
  transfer_syntax TEXT NOT NULL,
  blob_key TEXT NOT NULL,
  digest TEXT NOT NULL,
  size INTEGER NOT NULL,
  stamp TEXT NOT NULL,
  attrs TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_order ON instances(series_uid, instance_number, sop_uid);
CREATE INDEX IF NOT EXISTS instances_study_class ON instances(study_uid, sop_class_uid);

CREATE TABLE IF NOT EXISTS versions (
  blob_key TEXT PRIMARY KEY,
  sop_uid TEXT NOT NULL,
  digest TEXT NOT NULL,
  size INTEGER NOT NULL,
  stamp TEXT NOT NULL,
  superseded_by TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS versions_sop ON versions(sop_uid);
CREATE INDEX IF NOT EXISTS versions_stamp ON versions(stamp);

CREATE TABLE IF NOT EXISTS changes (
  seq INTEGER PRIMARY KEY,
  kind TEXT NOT NULL,
  sop_uid TEXT NOT NULL,
  series_uid TEXT NOT NULL,
  study_uid TEXT NOT NULL,
  blob_key TEXT NOT NULL,
  at TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS tombstones (
  study_uid TEXT PRIMARY KEY,
  entry TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS deleted_instances (
  blob_key TEXT PRIMARY KEY,
  study_uid TEXT NOT NULL,
  sop_uid TEXT NOT NULL,
  series_uid TEXT NOT NULL,
  stamp TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deleted_instances_study ON deleted_instances(study_uid);

CREATE TABLE IF NOT EXISTS reports (
  id TEXT PRIMARY KEY,
  study_uid TEXT NOT NULL,
  patient_id TEXT NOT NULL,
  patient_name TEXT NOT NULL,
  accession TEXT NOT NULL,
  modality TEXT NOT NULL,
  study_date TEXT NOT NULL,
  state TEXT NOT NULL,
  version INTEGER NOT NULL,
  updated TEXT NOT NULL,
  doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_updated ON reports(updated, id);
CREATE INDEX IF NOT EXISTS reports_study ON reports(study_uid);

INSERT OR IGNORE INTO meta VALUES ('log_epoch', lower(hex(randomblob(16))));
INSERT OR IGNORE INTO meta VALUES ('log_start', '0');
"""

#: Statements that bring a version-1 index to version 2 (run before :data:`DDL`, in one transaction).
MIGRATE_1_TO_2 = (
    "ALTER TABLE studies ADD COLUMN modalities TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE studies ADD COLUMN sop_classes TEXT NOT NULL DEFAULT ''",
    "DROP INDEX IF EXISTS patients_name",
    "DROP INDEX IF EXISTS studies_patient",
    "DROP INDEX IF EXISTS studies_date",
    "DROP INDEX IF EXISTS series_study",
    "DROP INDEX IF EXISTS instances_series",
    "DROP INDEX IF EXISTS instances_study",
)

#: Version 3: the content digest columns are named ``digest`` (BLAKE3 for new objects, see
#: :mod:`bastion.model.digest`; objects stored before keep their SHA-256 there). Two indexes that every
#: insert had to update are gone: a blob key holds its SOP Instance UID, so ``has_blob`` looks it up by
#: that, and the newest stamp comes from the change log (crash recovery asks for it once).
MIGRATE_2_TO_3 = (
    "ALTER TABLE instances RENAME COLUMN sha256 TO digest",
    "ALTER TABLE versions RENAME COLUMN sha256 TO digest",
    "DROP INDEX IF EXISTS instances_blob",
    "DROP INDEX IF EXISTS instances_stamp",
)

#: Statements that bring an index of version N to N + 1.
#: changes_at cost a page write per stored object; the one query that used it now reads the newest rows by seq.
MIGRATE_3_TO_4 = ("DROP INDEX IF EXISTS changes_at",)

#: Version 5: a stored instance writes one level row, not three. The study's and the patient's numbers of
#: instances are summed from their series (:data:`INSTANCE_COUNTS`); a new index's change log has ``seq`` as an
#: alias of the rowid without AUTOINCREMENT, whose ``sqlite_sequence`` row was one more page per commit (changes
#: are never deleted but all at once, so the largest ``seq`` is never handed out twice). Nothing is rewritten: an
#: index made before keeps its two count columns, no longer read or written, and its AUTOINCREMENT, as copying an
#: archive's change log (one row per stored object) would hold the server up for as long as it takes; `bastion
#: index rebuild` makes the new tables.
MIGRATE_4_TO_5: tuple[str, ...] = ()

#: Version 6: the change log has an identity (``log_epoch``, ``log_start`` in ``meta``, written by :data:`DDL`).
#: The log an index has continues as the new epoch's, from its start: positions read from it stay valid.
MIGRATE_5_TO_6: tuple[str, ...] = ()

#: Version 7: deleted studies (:mod:`bastion.index.hidden`): ``tombstones`` and ``deleted_instances``, made by
#: :data:`DDL`'s ``CREATE TABLE IF NOT EXISTS``; an index made before upgrades in place with both empty.
MIGRATE_6_TO_7: tuple[str, ...] = ()

#: Version 8: radiology reports (:mod:`bastion.index.reports`): ``reports``, made by :data:`DDL`; an index made
#: before upgrades in place with it empty, and the reports come back from the blob store at the next rebuild or
#: start (:func:`bastion.ingest.report_log.apply_report_log`).
MIGRATE_7_TO_8: tuple[str, ...] = ()

MIGRATIONS = {1: MIGRATE_1_TO_2, 2: MIGRATE_2_TO_3, 3: MIGRATE_3_TO_4, 4: MIGRATE_4_TO_5, 5: MIGRATE_5_TO_6,
              6: MIGRATE_6_TO_7, 7: MIGRATE_7_TO_8}

#: NumberOf{Study,Patient}RelatedInstances of the study ``s`` or patient ``p`` a search returns: the sum of their
#: series' counts (a few series per study, found through ``series_order`` and ``studies_patient_order``).
INSTANCE_COUNTS = {
    "study": "(SELECT coalesce(sum(x.num_instances), 0) FROM series x WHERE x.study_uid = s.study_uid)",
    "patient": "(SELECT coalesce(sum(x.num_instances), 0) FROM studies y JOIN series x ON x.study_uid = y.study_uid "
               "WHERE y.patient_id = p.patient_id)",
}

TABLES = ("patients", "studies", "series", "instances", "versions", "changes", "tombstones", "deleted_instances",
          "reports")


def schema_version(conn: sqlite3.Connection) -> int | None:
    """The schema version the index records, read without a write lock; None for a new index."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
        return None
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else None


def create_or_migrate(conn: sqlite3.Connection) -> None:
    """Create the schema, or bring an older one up to :data:`SCHEMA_VERSION` (derived data only).

    An index already at this version is only read: every process that opens it would otherwise take the
    write lock at start.
    """
    if schema_version(conn) == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = schema_version(conn)  # again under the lock: another process may have done it meanwhile
        version = SCHEMA_VERSION if found is None else found
        if version > SCHEMA_VERSION:
            raise IndexFailure(f"the index has schema version {version}, newer than this Bastion's "
                               f"{SCHEMA_VERSION}: rebuild it (bastion index rebuild)")
        for step in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                conn.execute(statement)
        for statement in DDL.split(";"):
            if statement.strip():
                conn.execute(statement)
        if version == 1:
            refresh_study_summaries(conn)
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):  # a failed COMMIT (disk full) may have rolled back already
            conn.execute("ROLLBACK")
        raise


def refresh_study_summaries(conn: sqlite3.Connection, study_uid: str | None = None) -> None:
    """Recompute ModalitiesInStudy and SOPClassesInStudy of one study (or all) from its series and instances.

    The same derivation the record path maintains incrementally; used after a removal,
    on migration, and by bulk loaders.
    """
    sql = ("UPDATE studies SET "
           "modalities = coalesce((SELECT group_concat(m, :sep) FROM (SELECT DISTINCT x.modality AS m "
           "FROM series x WHERE x.study_uid = studies.study_uid AND x.modality <> '' ORDER BY 1)), ''), "
           "sop_classes = coalesce((SELECT group_concat(c, :sep) FROM (SELECT DISTINCT y.sop_class_uid AS c "
           "FROM instances y WHERE y.study_uid = studies.study_uid ORDER BY 1)), '')")
    if study_uid is None:
        conn.execute(sql, {"sep": SUMMARY_SEP})
    else:
        conn.execute(sql + " WHERE study_uid = :uid", {"sep": SUMMARY_SEP, "uid": study_uid})
