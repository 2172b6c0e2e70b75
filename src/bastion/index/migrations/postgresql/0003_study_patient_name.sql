-- depends: 0002_jobs
-- The patient's name on each study row, so that a study search by PatientName reads one index range in name
-- order instead of walking studies in date order and looking up each one's patient (at 1,000,000 instances
-- that walk was 15-18 ms). Kept equal to patients.patient_name by the record path (bastion/index/pg_record.py):
-- set when the study row is written, and on every study of a patient whose name changes. Derived, like every
-- other column: `bastion index rebuild` makes it again.

ALTER TABLE studies ADD COLUMN patient_name text COLLATE "C" NOT NULL DEFAULT '';
UPDATE studies s SET patient_name = p.patient_name FROM patients p WHERE p.patient_id = s.patient_id;
CREATE INDEX studies_name_order ON studies (lower(patient_name), study_date, study_time, study_uid DESC);
