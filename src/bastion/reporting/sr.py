"""A signed report as a DICOM Basic Text SR (PS3.3 A.35.1), stored in its study through the ingest.

The SR instance (SOP Class 1.2.840.10008.5.1.4.1.1.88.11, Basic Text SR Storage) carries the study's patient and
study attributes as the index holds them (PS3.3 C.7.1.1 Patient, C.7.2.1 General Study), a series of its own
(Modality SR, SeriesDescription "Reports", one series per report), the SR Document General module (PS3.3 C.17.2:
CompletionFlag COMPLETE, VerificationFlag VERIFIED, VerifyingObserverSequence with the signer, and for an amendment
PredecessorDocumentsSequence referencing the previous SR) and the SR Document Content (PS3.3 C.17.3): a root
CONTAINER titled by the template (its name as code value, scheme ``99BASTION``, its title as meaning) holding one TEXT item per non-empty
section, each named by its title (concept code scheme ``99BASTION``, the section's name as its code).

The SR also carries the report version it signs, whole: its JSON (as :mod:`bastion.blobs.reportlog` keeps it) in
the private element (0073,xx01) OB of private creator ``BASTION REPORT``, and its seal, an HMAC under the report
key, in (0073,xx02) OB (:mod:`bastion.reporting.seal`), so that wherever the SR goes (forwarded from an edge, or
found by ``index rebuild`` without the report's blobs) the report can be kept again from it
(:mod:`bastion.reporting.intake`), and an SR stored by anyone else cannot bring in a report of its own. Its SOP Instance UID is derived from the report's id and version
(:func:`sr_uid`): a sign retried after a failure makes the same instance.
"""

from __future__ import annotations

import json
import logging
import uuid
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, ExplicitVRLittleEndian

from bastion import __version__
from bastion.blobs.reportlog import encoded, is_report_id
from bastion.reporting.seal import seal, sealed

log = logging.getLogger("bastion.reporting")

BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")
#: The attributes of the study copied into the SR (DICOM keywords), from the index's study answer.
STUDY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                  "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID", "StudyDescription")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning[:64]
    return item


def dicom_datetime(iso: str) -> tuple[str, str]:
    """DA and TM of an ISO 8601 UTC time (``2026-12-07T07:14:07.123Z``)."""
    date, _, time = iso.partition("T")
    return date.replace("-", ""), time.rstrip("Z").replace(":", "")[:13]


#: The private block holding the report version an SR signs (PS3.5 7.8): group, creator, element in the block.
PRIVATE_GROUP, PRIVATE_CREATOR, REPORT_ELEMENT, SEAL_ELEMENT = 0x0073, "BASTION REPORT", 0x01, 0x02


#: The namespace of the name-based (version 5) UUIDs behind the reports' UIDs (PS3.5 B.2: 2.25 and the UUID's
#: integer), so that a report's SR series is known by its UID alone (:func:`is_report_series`).
UID_NAMESPACE = uuid.UUID("6b3c2a3e-52a4-5c8e-9d0f-8a1b5e2f4c71")


def derived_uid(text: str) -> str:
    """The 2.25 UID of the name-based UUID of ``text`` in :data:`UID_NAMESPACE` (the reports' series and
    instances)."""
    return "2.25." + str(uuid.uuid5(UID_NAMESPACE, text).int)


def is_report_series(uid: str) -> bool:
    """Whether ``uid`` may be a report's SR series (a 2.25 UID of a name-based UUID): the report intake reads
    only the SRs of such series. Other archives' UUID-derived UIDs are random (version 4), rarely name-based."""
    if not uid.startswith("2.25.") or not uid[5:].isdigit() or len(uid) > 64:
        return False
    value = int(uid[5:])
    return value < 1 << 128 and uuid.UUID(int=value).version == 5


def series_uid(report_id: str) -> str:
    """The report's SR series: one per report, the same for every version (a 2.25 UID derived from its id)."""
    return derived_uid(f"bastion-report-series:{report_id}")


def sr_uid(report_id: str, version: int) -> str:
    """The SOP Instance UID of the SR that signs version ``version`` of the report (a 2.25 UID derived from both)."""
    return derived_uid(f"bastion-report-sr:{report_id}:{version}")


def carried_report(ds: Dataset, key: bytes) -> dict[str, Any] | None:
    """The report version an SR made by :func:`build_sr` carries, or None: another SR, an element that cannot be
    read as a signed report's JSON whose last SR is this one, or one not sealed under ``key``
    (:mod:`bastion.reporting.seal`; logged: a forged report, or one signed under another report key)."""
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        value = bytes(block[REPORT_ELEMENT].value).rstrip(b"\x00 ")
    except (KeyError, TypeError, ValueError):
        return None
    try:
        mac = bytes(block[SEAL_ELEMENT].value)[:32]
    except (KeyError, TypeError, ValueError):
        mac = b""
    if not sealed(key, value, mac):
        log.warning("SR %s carries a report that is not sealed by this archive's report key: left out (forged, "
                    "or signed where another report key is used: docs/reporting.md)", ds.get("SOPInstanceUID", "?"))
        return None
    try:
        doc = json.loads(value)
    except ValueError:
        return None
    if (not isinstance(doc, dict) or not is_report_id(str(doc.get("id"))) or not isinstance(doc.get("version"), int)
            or not isinstance(doc.get("sr"), list) or doc["sr"][-1:] != [str(ds.get("SOPInstanceUID", ""))]):
        return None
    return doc


def build_sr(doc: dict[str, Any], study: dict[str, Any], key: bytes, institution: str = "") -> bytes:
    """The Part 10 bytes of the SR that signs report version ``doc`` (``final`` or ``amended``: its signer,
    ``signed_at``, ISO 8601, and its ``sr`` list ending with this SR's UID, the one before it the SR it amends).
    ``study``: the study's attributes by keyword (:data:`STUDY_KEYWORDS`, as plain strings); ``key``: the report
    key that seals the version carried."""
    sop_uid, signer, signed_at = doc["sr"][-1], str(doc["signed_by"]), str(doc["signed_at"])
    predecessor = doc["sr"][-2] if len(doc["sr"]) > 1 else None
    ds = in_study(BASIC_TEXT_SR, sop_uid, study)
    ds.Modality = "SR"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid(doc["id"]), 9901, "Reports"
    ds.InstanceNumber = len(doc["sr"])
    ds.Manufacturer, ds.SoftwareVersions = "Bastion", __version__
    if institution:
        ds.InstitutionName = institution
    ds.ReferencedPerformedProcedureStepSequence = []
    date, time = dicom_datetime(signed_at)
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
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(REPORT_ELEMENT, "OB", encoded(doc))
    block.add_new(SEAL_ELEMENT, "OB", seal(key, encoded(doc)))
    return part10(ds)


def in_study(sop_class: UID, sop_uid: str, study: dict[str, Any]) -> Dataset:
    """A new instance of ``sop_class`` (UTF-8) in the study whose attributes by keyword are ``study``: its patient's
    and its own (:data:`STUDY_KEYWORDS`, as the index answers them)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword in STUDY_KEYWORDS:
        setattr(ds, keyword, str(study.get(keyword, "")))
    return ds


def part10(ds: Dataset) -> bytes:
    """The Part 10 file of ``ds`` (Explicit VR Little Endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    out = BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def sr_text(ds: Dataset) -> dict[str, str]:
    """The TEXT items of an SR's root container, by concept name (for tests and tools)."""
    return {str(item.ConceptNameCodeSequence[0].CodeMeaning): str(item.TextValue)
            for item in ds.get("ContentSequence", []) if item.get("ValueType") == "TEXT"}
