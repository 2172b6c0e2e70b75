"""A signed report's printable PDF as a DICOM Encapsulated PDF instance (PS3.3 A.45.1), stored in its study beside
the SR when ``[report] encapsulated_pdf`` is on, for viewers and archives that show DICOM documents but not SR: the
report as the ward prints it.

The instance (SOP Class 1.2.840.10008.5.1.4.1.1.104.1) carries the study's patient and study attributes as the SR
does (PS3.3 C.7.1.1, C.7.2.1), a series of its own per report (Encapsulated Document Series, C.24.1: Modality DOC,
SeriesDescription "Report PDF"), the SC Equipment module (C.8.6.1: ConversionType WSD, a workstation) and the
Encapsulated Document module (C.24.2): the PDF of :func:`bastion.reporting.pdf.report_pdf`, its MIME type and
length, the template's title as DocumentTitle, and BurnedInAnnotation YES (the PDF names the patient). Its SOP
Instance UID is derived from the report's id and version (:func:`pdf_uid`) and the PDF's bytes from the version
alone (its creation date is the signature's), so a sign retried makes the same instance, a duplicate.

The SR stays the record: the report intake (:mod:`bastion.reporting.intake`) reads only SRs, and the PDF's series
UID is name-based like the SR's, so no other archive's series is mistaken for it.
"""

from __future__ import annotations

from typing import Any

from pydicom.uid import UID

from bastion import __version__
from bastion.reporting.sr import derived_uid, dicom_datetime, in_study, part10

ENCAPSULATED_PDF = UID("1.2.840.10008.5.1.4.1.1.104.1")
#: The series number of the reports' PDFs (their SRs' is 9901).
SERIES_NUMBER = 9902


def pdf_uid(report_id: str, version: int) -> str:
    """The SOP Instance UID of the Encapsulated PDF of version ``version`` of the report."""
    return derived_uid(f"bastion-report-pdf:{report_id}:{version}")


def pdf_series_uid(report_id: str) -> str:
    """The report's PDF series: one per report, the same for every version."""
    return derived_uid(f"bastion-report-pdf-series:{report_id}")


def build_encapsulated_pdf(doc: dict[str, Any], study: dict[str, Any], pdf: bytes, institution: str = "") -> bytes:
    """The Part 10 bytes of the Encapsulated PDF instance of signed report version ``doc`` holding ``pdf``.
    ``study``: the study's attributes by keyword (:data:`~bastion.reporting.sr.STUDY_KEYWORDS`)."""
    ds = in_study(ENCAPSULATED_PDF, pdf_uid(str(doc["id"]), int(doc["version"])), study)
    ds.Modality = "DOC"
    ds.SeriesInstanceUID, ds.SeriesNumber = pdf_series_uid(str(doc["id"])), SERIES_NUMBER
    ds.SeriesDescription = "Report PDF"
    ds.InstanceNumber = len(doc.get("sr", [])) or 1
    ds.Manufacturer, ds.SoftwareVersions = "Bastion", __version__
    if institution:
        ds.InstitutionName = institution
    ds.ConversionType = "WSD"
    date, time = dicom_datetime(str(doc.get("signed_at", "")))
    ds.ContentDate, ds.ContentTime = date, time
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.AcquisitionDateTime = date + time
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = str(doc.get("template_title") or "Report")[:64]
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")  # OB: an even length (PS3.5 7.1)
    return part10(ds)
