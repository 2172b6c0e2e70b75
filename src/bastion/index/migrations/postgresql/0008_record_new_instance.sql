-- depends: 0007_report_claims
-- The common case of recording a stored instance, in one statement (bastion/index/pg_record.py: RECORD_NEW, called
-- by PostgresIndex._record_new):
-- a SOP instance not yet indexed whose series, study and patient rows already hold what it would write, which
-- is every instance of a series but its first. It runs the statements the Python record runs for that case,
-- in the same order and under the same locks: the study's lock, the look-up, the instance's row, its series'
-- count, then the change log's shared lock and its entry. Anything else (a new series, study or patient, changed
-- attributes, a re-sent or superseding object, a new modality or SOP class in the study) returns NULL having
-- written nothing, and the Python record records it. Its conditions are pg_record._add_instance's for writing
-- no level row: change both together (tests/unit/test_pg_record_new.py compares the two).
--
-- Each statement of a PL/pgSQL function reads a snapshot taken when it starts, so what is read after the lock
-- is what the last writer of the study committed.

CREATE FUNCTION record_new_instance(
  p_sop text, p_series text, p_study text, p_sop_class text, p_number bigint, p_syntax text, p_key text,
  p_digest text, p_size bigint, p_stamp text, p_attrs text,
  p_series_attrs text, p_study_attrs text, p_patient_attrs text, p_patient text, p_modality text,
  p_log_lock integer, p_schema text, p_at text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
  se record;
  st record;
  entry bigint;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtextextended(p_study, 0));
  PERFORM 1 FROM instances WHERE sop_uid = p_sop;
  IF FOUND THEN
    RETURN NULL;
  END IF;
  SELECT modality, study_uid, attrs = p_series_attrs AS same INTO se FROM series WHERE series_uid = p_series;
  IF NOT FOUND OR NOT se.same OR se.study_uid <> p_study OR se.modality <> p_modality THEN
    RETURN NULL;
  END IF;
  SELECT s.modalities, s.sop_classes, s.patient_id, s.attrs = p_study_attrs AS same, p.attrs = p_patient_attrs AS same_patient
    INTO st FROM studies s JOIN patients p ON p.patient_id = s.patient_id WHERE s.study_uid = p_study;
  IF NOT FOUND OR NOT st.same OR NOT st.same_patient OR st.patient_id <> p_patient
     OR NOT (p_modality = '' OR p_modality = ANY (string_to_array(st.modalities, E'\\')))
     OR NOT (p_sop_class = ANY (string_to_array(st.sop_classes, E'\\'))) THEN
    RETURN NULL;
  END IF;
  INSERT INTO instances VALUES (p_sop, p_series, p_study, p_sop_class, p_number, p_syntax, p_key, p_digest,
                                p_size, p_stamp, p_attrs);
  UPDATE series SET num_instances = num_instances + 1 WHERE series_uid = p_series;
  PERFORM pg_advisory_xact_lock_shared(p_log_lock, hashtext(p_schema));
  INSERT INTO changes (kind, sop_uid, series_uid, study_uid, blob_key, at)
    VALUES ('stored', p_sop, p_series, p_study, p_key, p_at) RETURNING seq INTO entry;
  RETURN entry;
END
$$;
