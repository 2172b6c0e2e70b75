-- depends: 0001_initial
-- Jobs: work that outlives a request (C-MOVE sub-operations), leased to one runner at a time
-- (bastion/jobs/postgresql.py). Not part of the index proper: `bastion index rebuild` leaves them.
--
-- A job is open until closed (answered, or unanswered past the replay window): one open job per key.
-- lease_until is a time of the database's clock; a runner claims an unfinished job whose lease ran out.
-- job_progress holds the status of each item done (SOP Instance UID), so a job taken over skips them.

CREATE TABLE jobs (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  kind text COLLATE "C" NOT NULL,
  key text COLLATE "C" NOT NULL,
  payload jsonb NOT NULL,
  owner text COLLATE "C" NOT NULL,
  lease_until timestamptz NOT NULL,
  outcome jsonb,
  finished_at timestamptz,
  closed boolean NOT NULL DEFAULT false,
  created_at timestamptz NOT NULL
);
CREATE UNIQUE INDEX jobs_open_key ON jobs (key) WHERE NOT closed;
CREATE INDEX jobs_unfinished ON jobs (lease_until) WHERE outcome IS NULL;

CREATE TABLE job_progress (
  job_id bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
  sop_uid text COLLATE "C" NOT NULL,
  status integer NOT NULL,
  PRIMARY KEY (job_id, sop_uid)
);
