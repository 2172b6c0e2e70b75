-- The Bastion index in PostgreSQL: the tables, columns and indexes of the SQLite schema (bastion/index/schema.py).
--
-- Text columns are COLLATE "C": they compare and sort by bytes, as SQLite's BINARY does, so that searches match
-- and page in the same order on both. patient_name and referring_physician, COLLATE NOCASE in SQLite, are
-- matched and sorted as lower(column) (ASCII letters only under "C", as NOCASE folds them): the name index is
-- on that expression. Numbers that sort with NULLs are indexed NULLS FIRST, as SQLite orders them.
--
-- The change log's seq comes from the sequence changes_seq (one step, no cache: a seq is never handed out
-- twice, and a new log moves the sequence past every seq handed out before with setval). meta holds the log's
-- identity: log_epoch and log_start (the seq it starts after).

CREATE TABLE meta (
  key text COLLATE "C" PRIMARY KEY,
  value text NOT NULL
);

CREATE TABLE patients (
  patient_id text COLLATE "C" PRIMARY KEY,
  patient_name text COLLATE "C" NOT NULL DEFAULT '',
  patient_birth_date text COLLATE "C" NOT NULL DEFAULT '',
  patient_sex text COLLATE "C" NOT NULL DEFAULT '',
  attrs text NOT NULL,
  num_studies integer NOT NULL DEFAULT 0,
  num_series integer NOT NULL DEFAULT 0
);
CREATE INDEX patients_name_id ON patients (lower(patient_name), patient_id);

CREATE TABLE studies (
  study_uid text COLLATE "C" PRIMARY KEY,
  patient_id text COLLATE "C" NOT NULL,
  study_date text COLLATE "C" NOT NULL DEFAULT '',
  study_time text COLLATE "C" NOT NULL DEFAULT '',
  accession_number text COLLATE "C" NOT NULL DEFAULT '',
  study_id text COLLATE "C" NOT NULL DEFAULT '',
  study_description text COLLATE "C" NOT NULL DEFAULT '',
  referring_physician text COLLATE "C" NOT NULL DEFAULT '',
  attrs text NOT NULL,
  num_series integer NOT NULL DEFAULT 0,
  modalities text COLLATE "C" NOT NULL DEFAULT '',
  sop_classes text COLLATE "C" NOT NULL DEFAULT ''
);
CREATE INDEX studies_patient_order ON studies (patient_id, study_date, study_time, study_uid DESC);
CREATE INDEX studies_order ON studies (study_date, study_time, study_uid DESC);
CREATE INDEX studies_accession ON studies (accession_number);

CREATE TABLE series (
  series_uid text COLLATE "C" PRIMARY KEY,
  study_uid text COLLATE "C" NOT NULL,
  modality text COLLATE "C" NOT NULL DEFAULT '',
  series_number bigint,
  series_description text COLLATE "C" NOT NULL DEFAULT '',
  series_date text COLLATE "C" NOT NULL DEFAULT '',
  body_part text COLLATE "C" NOT NULL DEFAULT '',
  attrs text NOT NULL,
  num_instances integer NOT NULL DEFAULT 0
);
CREATE INDEX series_order ON series (study_uid, series_number NULLS FIRST, series_uid);
CREATE INDEX series_modality ON series (modality, study_uid);

CREATE TABLE instances (
  sop_uid text COLLATE "C" PRIMARY KEY,
  series_uid text COLLATE "C" NOT NULL,
  study_uid text COLLATE "C" NOT NULL,
  sop_class_uid text COLLATE "C" NOT NULL,
  instance_number bigint,
  transfer_syntax text COLLATE "C" NOT NULL,
  blob_key text COLLATE "C" NOT NULL,
  digest text COLLATE "C" NOT NULL,
  size bigint NOT NULL,
  stamp text COLLATE "C" NOT NULL,
  attrs text NOT NULL
);
CREATE INDEX instances_order ON instances (series_uid, instance_number NULLS FIRST, sop_uid);
CREATE INDEX instances_study_class ON instances (study_uid, sop_class_uid);

CREATE TABLE versions (
  blob_key text COLLATE "C" PRIMARY KEY,
  sop_uid text COLLATE "C" NOT NULL,
  digest text COLLATE "C" NOT NULL,
  size bigint NOT NULL,
  stamp text COLLATE "C" NOT NULL,
  superseded_by text COLLATE "C" NOT NULL
);
CREATE INDEX versions_sop ON versions (sop_uid);
CREATE INDEX versions_stamp ON versions (stamp);

CREATE SEQUENCE changes_seq AS bigint MINVALUE 1 INCREMENT 1 CACHE 1 NO CYCLE;

CREATE TABLE changes (
  seq bigint PRIMARY KEY DEFAULT nextval('changes_seq'),
  kind text COLLATE "C" NOT NULL,
  sop_uid text COLLATE "C" NOT NULL,
  series_uid text COLLATE "C" NOT NULL,
  study_uid text COLLATE "C" NOT NULL,
  blob_key text COLLATE "C" NOT NULL,
  at text COLLATE "C" NOT NULL
);
ALTER SEQUENCE changes_seq OWNED BY changes.seq;
-- The objects stored in the last minute (statistics): a BRIN index is a few pages, and the log is written in
-- the order of at.
CREATE INDEX changes_at ON changes USING brin (at);

INSERT INTO meta VALUES ('log_epoch', replace(gen_random_uuid()::text, '-', '')), ('log_start', '0');
