-- depends: 0002_jobs
-- Deleted studies (bastion/index/hidden.py): each deleted study's tombstone (its state-log entry, JSON), and the
-- versions of its instances moved out of the query tables, kept for undelete and purge. Both are derived from the
-- state log in the blob store: `bastion index rebuild` makes them again.

CREATE TABLE tombstones (
  study_uid text COLLATE "C" PRIMARY KEY,
  entry text NOT NULL
);

CREATE TABLE deleted_instances (
  blob_key text COLLATE "C" PRIMARY KEY,
  study_uid text COLLATE "C" NOT NULL,
  sop_uid text COLLATE "C" NOT NULL,
  series_uid text COLLATE "C" NOT NULL,
  stamp text COLLATE "C" NOT NULL
);
CREATE INDEX deleted_instances_study ON deleted_instances (study_uid);
