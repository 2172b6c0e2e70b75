"""The bundled OHIF viewer against a running Bastion, in headless Chromium.

A generated 20-slice CT series (256x256, 16-bit, full geometry) goes in over DIMSE with DCMTK's
storescu; a JPEG 2000 lossless and an RLE multi-frame MR study (pydicom's samples, relabelled) go in
over STOW-RS. ``tests/browser/viewer_check.mjs`` then opens the study list and
``/viewer?StudyInstanceUIDs=...`` for each and reports, as one JSON line, whether the study was listed,
the viewport showed non-blank pixels, scrolling worked and no ``/dicom-web`` request failed. The
checks run concurrently (one Chromium each) to keep the module near 30 s; screenshots are kept under
the test's temporary directory (``viewer-<study>/viewer.png``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    BastionServer,
    Study,
    browser_check_result,
    make_ct_series,
    relabel_sample,
    requires_dcmtk,
    start_browser_check,
)
from pydicom.uid import generate_uid

pytestmark = [requires_dcmtk, pytest.mark.usefixtures("browser"), pytest.mark.timeout(180)]

#: Compressed studies sent with STOW-RS: key -> (pydicom sample, patient name). Both 10-frame MR.
COMPRESSED = {
    "j2k": ("emri_small_jpeg_2k_lossless.dcm", "Compressed^Jpeg2000"),
    "rle": ("emri_small_RLE.dcm", "Compressed^Rle"),
}
BOUNDARY = "viewer-test-boundary"


def stow(server: BastionServer, files: list[Path]) -> httpx.Response:
    """STOW-RS ``files`` in one multipart/related request (PS3.18 10.5)."""
    body = b"".join(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.read_bytes() + b"\r\n"
                    for f in files) + f"--{BOUNDARY}--\r\n".encode()
    return httpx.post(server.url("/dicom-web/studies"), content=body, timeout=60,
                      headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                               "Accept": "application/dicom+json"})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    srv = BastionServer(tmp_path_factory.mktemp("viewer") / "data").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def studies(server: BastionServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Store the three studies; key -> StudyInstanceUID."""
    work = tmp_path_factory.mktemp("viewer-studies")
    ct: Study = make_ct_series(work / "ct", slices=20, size=256, patient_name="Viewer^Ct")
    sent = server.storescu(*ct.files)
    assert sent.returncode == 0 and sent.stdout.count("Received Store Response (Success)") == 20, sent.stdout
    uids = {"ct": ct.study_uid}
    for key, (sample, name) in COMPRESSED.items():
        uid = generate_uid(prefix=None)
        path = relabel_sample(sample, work / key, study_uid=uid, patient_name=name, patient_id=f"PID-{key}",
                              description=f"VIEWER {key.upper()}")
        r = stow(server, [path])
        assert r.status_code == 200, r.text
        uids[key] = uid
    assert server.stats()["studies"] == 3
    return uids


@pytest.fixture(scope="module")
def reports(server: BastionServer, studies: dict[str, str],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Run viewer_check.mjs for every study at once; key -> its JSON report (plus ``out``)."""
    out = tmp_path_factory.mktemp("viewer-checks")
    procs = {key: start_browser_check("viewer_check.mjs", "--base", server.url(""), "--study", uid,
                                      "--out", out / f"viewer-{key}", "--timeout", "90000",
                                      "--scrolls", "4" if key == "ct" else "3")
             for key, uid in studies.items()}
    results = {key: browser_check_result(proc, timeout=150) for key, proc in procs.items()}
    for key, report in results.items():
        report["out"] = str(out / f"viewer-{key}")
    return results


@pytest.mark.parametrize("key", ["ct", "j2k", "rle"])
def test_viewer_lists_opens_and_scrolls_the_study(reports: dict[str, dict[str, Any]], server: BastionServer,
                                                  key: str) -> None:
    report = reports[key]
    context = f"{key}: {report} (screenshots in {report['out']})\nserver log tail:\n{server.log()[-2000:]}"
    assert report["studyListOk"], context
    assert report["viewportNonBlank"], context
    assert report["failedDicomweb"] == [], context
    assert report["dicomwebRequests"] > 3, context
    assert report["errors"] == [], context
    assert report["scrollNonBlank"], context
    assert report["exit_code"] == 0, context


def test_scrolling_the_ct_series_changes_the_slice(reports: dict[str, dict[str, Any]]) -> None:
    report = reports["ct"]
    assert report["scrollChanged"], report
    # OHIF's overlay "I:<instance> (<n>/20)": the series is one stack of 20 and the wheel moved through it.
    assert report.get("sliceLabelBefore") and "/20)" in report["sliceLabelBefore"], report
    assert report.get("sliceLabelAfter") != report.get("sliceLabelBefore"), report
