"""A signed report as a DICOM Basic Text SR (PS3.3 A.35.1), stored in its study through the ingest.

The SR instance (SOP Class 1.2.840.10008.5.1.4.1.1.88.11, Basic Text SR Storage) carries the study's patient and
study attributes as the index holds them (PS3.3 C.7.1.1 Patient, C.7.2.1 General Study), a series of its own
(Modality SR, SeriesDescription "Reports", one series per report), the SR Document General module (PS3.3 C.17.2:
CompletionFlag COMPLETE, VerificationFlag VERIFIED, VerifyingObserverSequence with the signer, and for an amendment
PredecessorDocumentsSequence referencing the previous SR) and the SR Document Content (PS3.3 C.17.3): a root
CONTAINER titled by the template (its name as code value, scheme ``99BASTION``, its title as meaning) holding one TEXT item per non-empty
section, each named by its title (concept code scheme ``99BASTION``, the section's name as its code).
"""

from __future__ import annotations

import hashlib
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from bastion import __version__

BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")
#: The attributes of the study copied into the SR (DICOM keywords), from the index's study answer.
STUDY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                  "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID", "StudyDescription")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning[:64]
    return item


def _dicom_datetime(iso: str) -> tuple[str, str]:
    """DA and TM of an ISO 8601 UTC time (``2026-12-07T07:14:07.123Z``)."""
    date, _, time = iso.partition("T")
    return date.replace("-", ""), time.rstrip("Z").replace(":", "")[:13]


def series_uid(report_id: str) -> str:
    """The report's SR series: one per report, the same for every version (a 2.25 UID derived from its id)."""
    return "2.25." + str(int(hashlib.sha256(f"bastion-report-series:{report_id}".encode()).hexdigest()[:30], 16))


def build_sr(doc: dict[str, Any], study: dict[str, Any], signer: str, signed_at: str,
             predecessor: str | None = None, institution: str = "") -> tuple[str, bytes]:
    """The SR of report ``doc`` signed by ``signer`` at ``signed_at`` (ISO 8601): its SOP Instance UID and Part 10
    bytes. ``study``: the study's attributes by keyword (:data:`STUDY_KEYWORDS`, as plain strings).
    ``predecessor``: the SOP Instance UID of the SR this one amends."""
    sop_uid = generate_uid(prefix=None)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = BASIC_TEXT_SR, sop_uid
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword in STUDY_KEYWORDS:
        setattr(ds, keyword, str(study.get(keyword, "")))
    ds.Modality = "SR"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid(doc["id"]), 9901, "Reports"
    ds.InstanceNumber = len(doc.get("sr", [])) + 1
    ds.Manufacturer, ds.SoftwareVersions = "Bastion", __version__
    if institution:
        ds.InstitutionName = institution
    ds.ReferencedPerformedProcedureStepSequence = []
    date, time = _dicom_datetime(signed_at)
    ds.ContentDate, ds.ContentTime = date, time
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "VERIFIED"
    observer = Dataset()
    observer.VerifyingObserverName = signer[:64]
    observer.VerifyingOrganization = institution or "Bastion"
    observer.VerificationDateTime = date + time
    observer.VerifyingObserverIdentificationCodeSequence = []
    ds.VerifyingObserverSequence = [observer]
    ds.PerformedProcedureCodeSequence = []
    if predecessor:
        ref_sop = Dataset()
        ref_sop.ReferencedSOPClassUID, ref_sop.ReferencedSOPInstanceUID = BASIC_TEXT_SR, predecessor
        ref_series = Dataset()
        ref_series.SeriesInstanceUID, ref_series.ReferencedSOPSequence = series_uid(doc["id"]), [ref_sop]
        ref_study = Dataset()
        ref_study.StudyInstanceUID = str(study.get("StudyInstanceUID", ""))
        ref_study.ReferencedSeriesSequence = [ref_series]
        ds.PredecessorDocumentsSequence = [ref_study]
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = [_code(str(doc.get("template", "report"))[:16], "99BASTION",
                                        str(doc.get("template_title", "") or "Report"))]
    titles = doc.get("section_titles", {})
    items = []
    for name, text in doc.get("sections", {}).items():
        if not str(text).strip():
            continue
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
        item.ConceptNameCodeSequence = [_code(name[:16], "99BASTION", str(titles.get(name, name)))]
        item.TextValue = str(text)
        items.append(item)
    if doc.get("reason") and predecessor:
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
        item.ConceptNameCodeSequence = [_code("amendment", "99BASTION", "Reason for amendment")]
        item.TextValue = str(doc["reason"])
        items.append(item)
    ds.ContentSequence = items
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = BASIC_TEXT_SR, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    out = BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return sop_uid, out.getvalue()


def sr_text(ds: Dataset) -> dict[str, str]:
    """The TEXT items of an SR's root container, by concept name (for tests and tools)."""
    return {str(item.ConceptNameCodeSequence[0].CodeMeaning): str(item.TextValue)
            for item in ds.get("ContentSequence", []) if item.get("ValueType") == "TEXT"}
