-- depends: 0008_record_new_instance
-- The landing of small objects (bastion/blobs/landing.py): an object's bytes made durable here, in one short
-- statement, before its store is answered, and moved to the S3 bucket afterwards (then its row is deleted). Not
-- part of the index proper: it is object storage, and `bastion index rebuild` leaves it (and reads it).
-- STORAGE EXTERNAL: DICOM pixel data does not compress with pglz; it is stored out of line as it is.

CREATE TABLE blob_landing (
  key text COLLATE "C" PRIMARY KEY,
  data bytea NOT NULL,
  landed_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE blob_landing ALTER COLUMN data SET STORAGE EXTERNAL;
CREATE INDEX blob_landing_landed_at ON blob_landing (landed_at);
