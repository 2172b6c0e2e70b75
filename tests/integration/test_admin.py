"""The admin page (``/admin``) in headless Chromium: search, upload through the file input, health, the copies
in the server's two blob stores (the leg's own store and a directory), one of them repaired, and the forwarding
queue of a destination that is down, its dead letters retried.

``tests/browser/admin_check.mjs`` drives the page and prints one JSON line; these tests read it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import backends
import httpx
import pytest
from conftest import (
    BastionServer,
    browser_check_result,
    free_port,
    make_study,
    relabel_sample,
    start_browser_check,
)
from pydicom.uid import generate_uid

pytestmark = [pytest.mark.usefixtures("browser"), pytest.mark.timeout(120)]

BOUNDARY = "admin-test-boundary"
#: A forwarding destination where nothing listens: every instance stored is a dead letter after one attempt.
NOWHERE = f"NOWHERE@127.0.0.1:{free_port()}"
#: The server is an edge too, of an upstream that is down: the Queues panel shows its backlog.
UPSTREAM_DOWN = f"CENTRAL@127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    data = tmp_path_factory.mktemp("admin") / "data"
    first = backends.environment_for_command(data).get("BASTION_BLOBS", str(data / "blobs"))
    srv = BastionServer(data, settings={"BASTION_BLOBS": f"{first},{_second_store(data)}",
                                        "BASTION_REPAIR_INTERVAL": "2", "BASTION_FORWARD": NOWHERE,
                                        "BASTION_FORWARD_MAX_ATTEMPTS": "1", "BASTION_UPSTREAM": UPSTREAM_DOWN,
                                        "BASTION_PREFETCH_PRIORS": "0",
                                        "BASTION_REMOTES": "WS1@127.0.0.1:104,VNA@tls://vna.example.org:2762"}).start()
    yield srv
    srv.stop()


def _second_store(data: Path) -> Path:
    """The server's second blob store: a directory beside its data directory's own."""
    return data / "blobs2"


@pytest.fixture(scope="module")
def report(server: BastionServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Store one study (STOW-RS), prepare another file to upload, run admin_check.mjs once."""
    work = tmp_path_factory.mktemp("admin-work")
    stored = make_study(work / "stored", series=1, per_series=2, patient_name="Adminsearch^Stored")
    body = b"".join(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.read_bytes() + b"\r\n"
                    for f in stored.files) + f"--{BOUNDARY}--\r\n".encode()
    r = httpx.post(server.url("/dicom-web/studies"), content=body, timeout=30,
                   headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'})
    assert r.status_code == 200, r.text
    second = _second_store(server.data)
    lost_copy = sorted(p for p in second.rglob("*.dcm") if ".journal" not in p.parts)[0]
    lost_copy.unlink()  # the repair makes it again; the Copies panel shows the finding and its repair
    upload_study = generate_uid(prefix=None)
    upload = relabel_sample("CT_small.dcm", work / "upload", study_uid=upload_study,
                            patient_name="Uploaded^Throughadmin", patient_id="ADMIN-UP")
    bad = work / "not-dicom.dcm"
    bad.write_bytes(b"this is not a DICOM file\n" * 10)
    out = work / "admin-check"
    proc = start_browser_check("admin_check.mjs", "--base", server.url(""), "--out", out,
                               "--search", "adminsearch*", "--study", stored.study_uid,
                               "--upload", upload, "--upload-search", "UPLOADED*", "--upload-study", upload_study,
                               "--bad-upload", bad, "--copies", "2",
                               "--repaired-key", lost_copy.relative_to(second).as_posix(), "--queue", NOWHERE,
                               "--edge", UPSTREAM_DOWN)
    result = browser_check_result(proc, timeout=90)
    result["out"] = str(out)
    result["upload_study"] = upload_study
    result["second_store"] = str(second)
    return result


def _context(report: dict[str, Any], server: BastionServer) -> str:
    return f"{report} (screenshots in {report.get('out')})\nserver log tail:\n{server.log()[-2000:]}"


def test_health_panel_shows_the_dicom_listener_up(report: dict[str, Any], server: BastionServer) -> None:
    assert report["healthUp"], _context(report, server)
    assert report["remotes"] == ["WS1 @ 127.0.0.1:104", "VNA @ tls://vna.example.org:2762"], _context(report, server)


#: What the health panel says of the compiled parts: in the pure-Python leg (BASTION_PURE_PYTHON=1, inherited by
#: the server) the red line that they are not built.
_PARTS = ("Python (slower: the C extension was not built)" if os.environ.get("BASTION_PURE_PYTHON")
          else "compiled")


def test_health_panel_says_whether_the_header_scan_is_compiled(report: dict[str, Any],
                                                                server: BastionServer) -> None:
    assert report.get("headerScan") == _PARTS, _context(report, server)


def test_health_panel_says_whether_the_file_write_is_compiled(report: dict[str, Any],
                                                               server: BastionServer) -> None:
    expected = "not used (object storage)" if backends.REMOTE else _PARTS  # S3 writes no file
    assert report.get("fileWrite") == expected, _context(report, server)


def test_wildcard_patient_search_lists_the_study_with_a_viewer_link(report: dict[str, Any],
                                                                     server: BastionServer) -> None:
    assert report["searchOk"], _context(report, server)
    assert report["viewerLink"].startswith("/viewer?StudyInstanceUIDs="), _context(report, server)


def test_upload_through_the_file_input_stores_and_is_found(report: dict[str, Any], server: BastionServer) -> None:
    assert report["uploadOk"], _context(report, server)
    assert "1 stored, 0 failed" in report["uploadStatus"]
    assert report["uploadedFound"], _context(report, server)
    studies = server.get_json(f"/dicom-web/studies?StudyInstanceUID={report['upload_study']}")
    assert len(studies) == 1


def test_a_refused_upload_says_failed_with_its_reason(report: dict[str, Any], server: BastionServer) -> None:
    status = report["badUploadStatus"]
    assert status and status.startswith("HTTP 409: 0 stored, 1 failed"), _context(report, server)
    assert "0xC000 cannot understand" in status, _context(report, server)


def test_copies_panel_lists_both_blob_stores(report: dict[str, Any], server: BastionServer) -> None:
    stores = report["copiesStores"]
    assert stores is not None and len(stores) == 2, _context(report, server)
    assert stores[1]["location"] == report["second_store"], _context(report, server)
    assert all(s["state"] in ("ok", "copies wanting repair") for s in stores), _context(report, server)
    assert report["copiesCounts"].startswith("found "), _context(report, server)
    assert report["copiesScrub"].startswith("scrub: "), _context(report, server)  # where the scrub is, or not yet


def test_copies_panel_shows_a_lost_copy_and_its_repair(report: dict[str, Any], server: BastionServer) -> None:
    repaired = report["copiesRepaired"]
    assert repaired is not None, _context(report, server)
    assert repaired["problem"] == "missing" and repaired["store"] == report["second_store"], _context(report, server)
    assert repaired["repaired"], _context(report, server)


def test_queues_panel_shows_dead_letters_and_retries_them(report: dict[str, Any], server: BastionServer) -> None:
    row = report["queueRow"]
    assert row is not None and int(row["dead"]) >= 1, _context(report, server)
    assert "cannot connect" in row["lastError"], _context(report, server)
    assert report["queueRetried"] and "pending again" in report["queueRetried"], _context(report, server)
    queues = server.get_json("/api/queues")["queues"]
    assert [(q["name"], q["to"]) for q in queues] == [(NOWHERE, NOWHERE), ("upstream", UPSTREAM_DOWN)], queues


def test_queues_panel_shows_the_edge_backlog(report: dict[str, Any], server: BastionServer) -> None:
    line = report["edgeLine"]
    assert line is not None and line.startswith(f"Edge of {UPSTREAM_DOWN}: backlog"), _context(report, server)
    assert "held upstream" in line, _context(report, server)


def test_page_had_no_failed_request_or_script_error(report: dict[str, Any], server: BastionServer) -> None:
    assert report["failedRequests"] == [], _context(report, server)
    assert report["consoleErrors"] == [], _context(report, server)
    assert report["errors"] == [], _context(report, server)
    assert report["exit_code"] == 0, _context(report, server)


def test_admin_page_is_served_without_caching(server: BastionServer) -> None:
    r = httpx.get(server.url("/admin"))
    assert r.status_code == 200 and r.headers["cache-control"] == "no-cache"
    assert 'id="files"' in r.text
    assert httpx.get(server.url("/admin/"), follow_redirects=False).status_code in (307, 302)
