-- depends: 0003_deleted_studies
-- The patient's name on each study row, lowered as searches compare it (ASCII letters only, as lower() of a
-- "C" column and SQLite's NOCASE fold): patient_name_key. The study order index carries it, so a study search by
-- PatientName walks that index alone (an index-only scan) for the page it answers, instead of reading each
-- study row and its patient's on the way (at 1,000,000 instances that walk read about 1,800 study rows for 100
-- results). Kept equal to the patient's name by the record path (bastion/index/pg_record.py): set when the study
-- row is written, and on every study of a patient whose name changes. Derived, like every other column:
-- `bastion index rebuild` makes it again.

ALTER TABLE studies ADD COLUMN patient_name_key text COLLATE "C" NOT NULL DEFAULT '';
UPDATE studies s SET patient_name_key = lower(p.patient_name) FROM patients p WHERE p.patient_id = s.patient_id;
DROP INDEX studies_order;
CREATE INDEX studies_order ON studies (study_date, study_time, study_uid DESC) INCLUDE (patient_name_key);
CREATE INDEX studies_name_order ON studies (patient_name_key, study_date, study_time, study_uid DESC);
