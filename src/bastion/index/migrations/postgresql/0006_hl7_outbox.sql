-- depends: 0005_reports
-- The HL7 outbox (bastion/reporting/hl7_outbox.py): one ORU^R01 message per signed report version and receiver,
-- leased to one sender at a time, retried with backoff, dead after its last attempt. Not part of the index proper:
-- `bastion index rebuild` leaves it. Times are Unix seconds of the database's clock.

CREATE TABLE hl7_outbox (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  receiver text COLLATE "C" NOT NULL,
  report_id text COLLATE "C" NOT NULL,
  version integer NOT NULL,
  control_id text COLLATE "C" NOT NULL,
  message text NOT NULL,
  state text COLLATE "C" NOT NULL DEFAULT 'pending',
  attempts integer NOT NULL DEFAULT 0,
  due_at double precision NOT NULL,
  lease_until double precision NOT NULL DEFAULT 0,
  owner text COLLATE "C" NOT NULL DEFAULT '',
  last_error text NOT NULL DEFAULT '',
  created_at double precision NOT NULL,
  done_at double precision,
  UNIQUE (receiver, report_id, version)
);
CREATE INDEX hl7_outbox_pending ON hl7_outbox (receiver, id) WHERE state = 'pending';

CREATE TABLE hl7_receivers (
  receiver text COLLATE "C" PRIMARY KEY,
  since text NOT NULL
);
