"""The index schema (SQLite dialect). Everything here is derivable from the blob store."""

SCHEMA_VERSION = 1

DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

CREATE TABLE IF NOT EXISTS patients (
  patient_id TEXT PRIMARY KEY,
  patient_name TEXT NOT NULL DEFAULT '' COLLATE NOCASE,
  patient_birth_date TEXT NOT NULL DEFAULT '',
  patient_sex TEXT NOT NULL DEFAULT '',
  attrs TEXT NOT NULL,
  num_studies INTEGER NOT NULL DEFAULT 0,
  num_series INTEGER NOT NULL DEFAULT 0,
  num_instances INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS patients_name ON patients(patient_name);

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
  num_instances INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS studies_patient ON studies(patient_id);
CREATE INDEX IF NOT EXISTS studies_date ON studies(study_date, study_time);
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
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid, series_number);
CREATE INDEX IF NOT EXISTS series_modality ON series(modality, study_uid);

CREATE TABLE IF NOT EXISTS instances (
  sop_uid TEXT PRIMARY KEY,
  series_uid TEXT NOT NULL,
  study_uid TEXT NOT NULL,
  sop_class_uid TEXT NOT NULL,
  instance_number INTEGER,
  transfer_syntax TEXT NOT NULL,
  blob_key TEXT NOT NULL,
  sha256 TEXT NOT NULL,
  size INTEGER NOT NULL,
  stamp TEXT NOT NULL,
  attrs TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid, instance_number);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE INDEX IF NOT EXISTS instances_blob ON instances(blob_key);
CREATE INDEX IF NOT EXISTS instances_stamp ON instances(stamp);

CREATE TABLE IF NOT EXISTS versions (
  blob_key TEXT PRIMARY KEY,
  sop_uid TEXT NOT NULL,
  sha256 TEXT NOT NULL,
  size INTEGER NOT NULL,
  stamp TEXT NOT NULL,
  superseded_by TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS versions_sop ON versions(sop_uid);
CREATE INDEX IF NOT EXISTS versions_stamp ON versions(stamp);

CREATE TABLE IF NOT EXISTS changes (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  kind TEXT NOT NULL,
  sop_uid TEXT NOT NULL,
  series_uid TEXT NOT NULL,
  study_uid TEXT NOT NULL,
  blob_key TEXT NOT NULL,
  at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_at ON changes(at);
"""

TABLES = ("patients", "studies", "series", "instances", "versions", "changes")
