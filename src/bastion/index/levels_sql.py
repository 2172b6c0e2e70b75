"""The SQL of a search that every index backend shares: which tables a level joins, the stable order results come
in (ending with the tie-breaking UID), the columns a search reads, and the DICOM JSON made from a row of them."""

from __future__ import annotations

from typing import Any

from bastion.index.schema import INSTANCE_COUNTS, SUMMARY_SEP
from bastion.model import dicom_json
from bastion.model.levels import QueryLevel
from bastion.model.records import JsonDataset

#: Per level: the tables a search joins (:data:`FROM`, aliases :data:`ALIAS`) and the order its results come in.
ORDER = {
    QueryLevel.PATIENT: "p.patient_name, p.patient_id",
    QueryLevel.STUDY: "s.study_date DESC, s.study_time DESC, s.study_uid",
    QueryLevel.SERIES: "se.study_uid, se.series_number, se.series_uid",
    QueryLevel.IMAGE: "i.series_uid, i.instance_number, i.sop_uid",
}
FROM = {
    QueryLevel.PATIENT: "patients p",
    QueryLevel.STUDY: "studies s JOIN patients p ON p.patient_id = s.patient_id",
    QueryLevel.SERIES: "series se JOIN studies s ON s.study_uid = se.study_uid "
                       "JOIN patients p ON p.patient_id = s.patient_id",
    QueryLevel.IMAGE: "instances i JOIN series se ON se.series_uid = i.series_uid "
                      "JOIN studies s ON s.study_uid = i.study_uid JOIN patients p ON p.patient_id = s.patient_id",
}
ALIAS = {QueryLevel.PATIENT: "p", QueryLevel.STUDY: "s", QueryLevel.SERIES: "se", QueryLevel.IMAGE: "i"}
INSTANCE_COLS = "i.sop_uid, i.sop_class_uid, i.series_uid, i.study_uid, i.transfer_syntax, i.blob_key, i.digest, i.size"

#: Per level, what a search reads for each result (:func:`dataset_of` makes its DICOM JSON).
FIND_COLUMNS = {
    QueryLevel.PATIENT: f"p.attrs, p.num_studies, p.num_series, {INSTANCE_COUNTS['patient']}",
    QueryLevel.STUDY: f"p.attrs, s.attrs, s.num_series, {INSTANCE_COUNTS['study']}, s.modalities, s.sop_classes",
    QueryLevel.SERIES: "p.attrs, s.attrs, se.attrs, se.num_instances, se.series_uid",
    QueryLevel.IMAGE: "p.attrs, s.attrs, se.attrs, i.attrs, i.transfer_syntax, i.series_uid",
}


def _us(tag: str, value: int) -> dict[str, Any]:
    return {tag: {"vr": "IS", "Value": [value]}}


def dataset_of(level: QueryLevel, row: tuple[Any, ...]) -> JsonDataset:
    """The DICOM JSON a search answers for one row of :data:`FIND_COLUMNS` at ``level``: the level's and its
    parents' attributes (each level names its parents' UIDs, PS3.4 C.4.1.2.1) and the level's computed
    attributes (PS3.4 C.3, C.6.2.1.2)."""
    ds: JsonDataset = {}
    if level is QueryLevel.PATIENT:
        ds.update(dicom_json.loads(row[0]))
        ds.update(_us("00201200", row[1]) | _us("00201202", row[2]) | _us("00201204", row[3]))
        return ds
    depth = level.depth
    for part in row[:depth + 1]:
        ds.update(dicom_json.loads(part))
    if level is QueryLevel.STUDY:
        ds.update(_us("00201206", row[2]) | _us("00201208", row[3]))
        mods, classes = row[4].split(SUMMARY_SEP) if row[4] else [], row[5].split(SUMMARY_SEP) if row[5] else []
        ds["00080061"] = {"vr": "CS", "Value": mods} if mods else {"vr": "CS"}
        ds["00080062"] = {"vr": "UI", "Value": classes} if classes else {"vr": "UI"}
    elif level is QueryLevel.SERIES:
        ds.update(_us("00201209", row[3]))
    else:
        ds["00083002"] = {"vr": "UI", "Value": [row[4]]}
    return ds
