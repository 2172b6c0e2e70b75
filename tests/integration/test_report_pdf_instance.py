"""``[report] encapsulated_pdf``: a signed report version's printable PDF stored in its study as a DICOM Encapsulated
PDF instance beside its SR (docs/reporting.md, "The SR"), found by QIDO-RS and C-FIND, read back by WADO-RS and shown
by the bundled OHIF viewer in Chromium; an amendment adds the next version's; a version always makes the same bytes
(a sign retried stores a duplicate); off, nothing but the SR."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from conftest import BastionServer, Study, browser_check_result, make_study, start_browser_check
from pypdf import PdfReader
from test_reporting import _wado_sr, api

from bastion.reporting.encapsulated import ENCAPSULATED_PDF, pdf_uid

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    started = BastionServer(tmp_path_factory.mktemp("report-pdf") / "data",
                            settings={"BASTION_REPORT_ENCAPSULATED_PDF": "true", "BASTION_SITE_NAME": "St Elsewhere"}
                            ).start()
    yield started
    started.stop()


def _study(server: BastionServer, where: Path, accession: str) -> Study:
    made = make_study(where, series=1, per_series=1, modality="CT", patient_name="Pdf^Patient", accession=accession)
    sent = server.storescu(*made.files)
    assert sent.returncode == 0, sent.stderr
    return made


def _signed(server: BastionServer, study: Study, findings: str) -> dict[str, Any]:
    made = api(server, "POST", "/api/reports", json={"study": study.study_uid, "template": "ct-head"})
    assert made.status_code == 201, made.text
    rid = made.json()["id"]
    edited = api(server, "PUT", f"/api/reports/{rid}", json={"sections": {"findings": findings}, "version": 1})
    assert edited.status_code == 200, edited.text
    signed = api(server, "POST", f"/api/reports/{rid}/sign", json={"user": "Dr^Quinn"})
    assert signed.status_code == 200, signed.text
    return dict(signed.json())


def _documents(server: BastionServer, study_uid: str) -> list[dict[str, Any]]:
    rsp = api(server, "GET", f"/dicom-web/studies/{study_uid}/instances", params={"Modality": "DOC"})
    return list(rsp.json()) if rsp.status_code == 200 else []


def _pdf_text(ds: pydicom.Dataset) -> str:
    data = bytes(ds.EncapsulatedDocument)[:int(ds.EncapsulatedDocumentLength)]
    assert data.startswith(b"%PDF-")
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(data)).pages)


def test_a_signed_version_and_its_amendment_are_stored_as_encapsulated_pdfs(server: BastionServer,
                                                                            tmp_path: Path) -> None:
    study = _study(server, tmp_path / "ct", "ACC-PDF-1")
    report = _signed(server, study, "A 3 mm calcified granuloma.")
    (found,) = _documents(server, study.study_uid)
    sop_uid, series_uid = found["00080018"]["Value"][0], found["0020000E"]["Value"][0]
    assert sop_uid == pdf_uid(report["id"], report["version"])
    assert found["00080016"]["Value"] == [ENCAPSULATED_PDF]
    ds = _wado_sr(server, study.study_uid, series_uid, sop_uid)
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf" and ds.Modality == "DOC"
    assert ds.PatientID == study.patient_id and ds.AccessionNumber == "ACC-PDF-1"
    assert ds.BurnedInAnnotation == "YES" and ds.DocumentTitle == "CT Head"
    text = _pdf_text(ds)
    assert "St Elsewhere" in text and "A 3 mm calcified granuloma." in text and "Dr^Quinn" in text
    # the same PDF the ward prints
    printed = api(server, "GET", f"/api/reports/{report['id']}/pdf")
    assert printed.status_code == 200 and printed.content == bytes(ds.EncapsulatedDocument)[:len(printed.content)]

    amended = api(server, "POST", f"/api/reports/{report['id']}/amend", json={
        "user": "Dr^Quinn", "reason": "size corrected", "sections": {"findings": "A 4 mm calcified granuloma."}})
    assert amended.status_code == 200, amended.text
    documents = _documents(server, study.study_uid)
    assert sorted(d["00080018"]["Value"][0] for d in documents) == sorted(
        [sop_uid, pdf_uid(report["id"], amended.json()["version"])])
    assert {d["0020000E"]["Value"][0] for d in documents} == {series_uid}  # one series per report
    latest = _wado_sr(server, study.study_uid, series_uid, pdf_uid(report["id"], amended.json()["version"]))
    assert "A 4 mm calcified granuloma." in _pdf_text(latest) and "size corrected" in _pdf_text(latest)
    # C-FIND sees it too (DCMTK's findscu, IMAGE level in the report's PDF series)
    found_by_cfind = subprocess.run(
        ["findscu", "-S", "-aet", "FINDSCU", "-aec", server.aet, "-k", "QueryRetrieveLevel=IMAGE",
         "-k", f"StudyInstanceUID={study.study_uid}", "-k", f"SeriesInstanceUID={series_uid}",
         "-k", "SOPInstanceUID", "-k", "SOPClassUID", "127.0.0.1", str(server.dicom_port)],
        capture_output=True, text=True, timeout=60)
    assert found_by_cfind.returncode == 0, found_by_cfind.stderr
    assert found_by_cfind.stderr.count("=EncapsulatedPDFStorage") == 2, found_by_cfind.stderr  # DCMTK names it


def test_the_pdf_bytes_depend_on_the_version_alone() -> None:
    """A sign retried (its SR found stored) stores the same PDF again: a duplicate, not a second version."""
    from bastion.reporting.encapsulated import build_encapsulated_pdf
    from bastion.reporting.pdf import report_pdf

    doc = {"id": "r-1", "version": 3, "state": "final", "signed_by": "Dr^Quinn", "signed_at": "2026-12-07T07:14:07.123Z",
           "sections": {"findings": "Normal."}, "template_title": "CT Head", "patient_name": "Pdf^Patient",
           "sr": ["2.25.1"]}
    font = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    first = build_encapsulated_pdf(doc, {"PatientID": "P1"}, report_pdf(doc, {}, "Site", font))
    again = build_encapsulated_pdf(doc, {"PatientID": "P1"}, report_pdf(doc, {}, "Site", font))
    assert first == again


def test_off_by_default_nothing_but_the_sr(tmp_path: Path) -> None:
    plain = BastionServer(tmp_path / "data").start()
    try:
        study = _study(plain, tmp_path / "ct", "ACC-PDF-2")
        _signed(plain, study, "Normal.")
        assert _documents(plain, study.study_uid) == []
        rsp = api(plain, "GET", f"/dicom-web/studies/{study.study_uid}/instances", params={"Modality": "SR"})
        assert rsp.status_code == 200 and len(rsp.json()) == 1
    finally:
        plain.stop()


def test_the_pdf_is_bulk_data_in_the_metadata_as_viewers_fetch_it(server: BastionServer, tmp_path: Path) -> None:
    """What a DICOMweb viewer does to show the document (OHIF's PDF viewport through dicomweb-client): the series'
    metadata names EncapsulatedDocument by a BulkDataURI, which answers the PDF to ``Accept: multipart/related;
    type="application/pdf"``."""
    study = _study(server, tmp_path / "ct", "ACC-PDF-3")
    report = _signed(server, study, "No acute abnormality.")
    (found,) = _documents(server, study.study_uid)
    series_uid = found["0020000E"]["Value"][0]
    metadata = api(server, "GET", f"/dicom-web/studies/{study.study_uid}/series/{series_uid}/metadata").json()
    (instance,) = metadata
    assert instance["00420012"]["Value"] == ["application/pdf"]
    uri = instance["00420011"]["BulkDataURI"]
    rsp = httpx.get(uri if uri.startswith("http") else server.url(uri), timeout=60,
                    headers={"Accept": 'multipart/related; type="application/pdf"'})
    assert rsp.status_code == 200, rsp.text
    boundary = rsp.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    body = rsp.content.split(f"--{boundary}".encode())[1].split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]
    printed = api(server, "GET", f"/api/reports/{report['id']}/pdf").content
    assert body.startswith(b"%PDF-") and body[:len(printed)] == printed


def test_the_viewer_shows_the_report_pdf(server: BastionServer, tmp_path: Path) -> None:
    """In Chromium, the bundled OHIF viewer lists the report's PDF series and shows it in its PDF viewport."""
    study = _study(server, tmp_path / "ct", "ACC-PDF-4")
    report = _signed(server, study, "Shown in the viewer.")
    proc = start_browser_check("report_pdf_check.mjs", "--base", server.url(""), "--study", study.study_uid,
                               "--out", tmp_path / "out")
    result = browser_check_result(proc, timeout=180)
    assert result["exit_code"] == 0, result
    printed = api(server, "GET", f"/api/reports/{report['id']}/pdf").content
    assert result["pdfHead"] == "%PDF-" and result["pdfBytes"] in (len(printed), len(printed) + 1), result
