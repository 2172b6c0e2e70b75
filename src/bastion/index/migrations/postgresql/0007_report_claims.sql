-- depends: 0005_reports
-- Claims on the reading list (bastion/jobs/claims.py): who reads which study, until when (the database's clock),
-- and the study's reading priority. Transient leases like the jobs': not part of the index proper, and
-- `bastion index rebuild` leaves them.

CREATE TABLE report_claims (
  study_uid text COLLATE "C" PRIMARY KEY,
  claimed_by text NOT NULL DEFAULT '',
  expires timestamptz,
  priority text COLLATE "C" NOT NULL DEFAULT 'routine'
);
CREATE INDEX report_claims_priority ON report_claims (priority) WHERE priority <> 'routine';
