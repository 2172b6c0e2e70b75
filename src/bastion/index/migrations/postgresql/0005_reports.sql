-- depends: 0004_study_patient_name
-- Radiology reports (bastion/index/reports.py): one row per report, its latest version whole (doc) and the columns
-- the reading list filters on. Derived from the report versions in the blob store, like every other table:
-- `bastion index rebuild` makes it again.

CREATE TABLE reports (
  id text COLLATE "C" PRIMARY KEY,
  study_uid text COLLATE "C" NOT NULL,
  patient_id text NOT NULL,
  patient_name text NOT NULL,
  accession text NOT NULL,
  modality text NOT NULL,
  study_date text NOT NULL,
  state text NOT NULL,
  version integer NOT NULL,
  updated text COLLATE "C" NOT NULL,
  doc text NOT NULL
);
CREATE INDEX reports_updated ON reports (updated, id);
CREATE INDEX reports_study ON reports (study_uid);
