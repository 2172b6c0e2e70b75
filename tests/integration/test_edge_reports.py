"""Reports travel with their SRs (docs/reporting.md, "Downtime and edge nodes", "How signing cannot half-happen"):
a report signed on an edge while the centre is down is a final report at the centre once the edge's queue has
delivered the study; a sign whose report write failed after its SR was stored leaves a final report all the same;
``bastion index rebuild`` brings back, from its SR, a report whose blobs were lost."""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from backends import REMOTE, locations
from conftest import BastionServer, Study, free_port, make_study, run_bastion
from test_edge import Pair, edge_report
from test_forward import wait_for
from test_hl7 import Listener

from bastion.blobs import open_blob_store
from bastion.blobs.reportlog import version_key
from bastion.reporting.hl7_sender import MARGIN_S
from bastion.reporting.sr import build_sr, sr_uid

pytestmark = pytest.mark.timeout(240)

SECTIONS = {"findings": "A 6 mm nodule in the left lower lobe.", "impression": "Indeterminate nodule."}


class KeyedPair(Pair):
    """An edge and its centre given one report key file (docs/reporting.md, "Downtime and edge nodes")."""

    def __init__(self, root: Path, centre: dict[str, str] | None = None) -> None:
        super().__init__(root)
        self.key_file = root / "report.key"
        self.key_file.write_text(secrets.token_hex(32) + "\n")
        self.centre = centre or {}

    def upstream(self) -> BastionServer:
        dicom, http = self.up_ports
        return self._start(BastionServer(self.root / "upstream", remotes=[f"EDGE@127.0.0.1:{self.edge_ports[0]}"],
                                         aet="UPSTREAM", dicom_port=dicom, http_port=http, fixed_ports=True,
                                         settings={"BASTION_REPORT_KEY_FILE": str(self.key_file), **self.centre}))

    @property
    def edge_settings(self) -> dict[str, str]:
        return {**super().edge_settings, "BASTION_REPORT_KEY_FILE": str(self.key_file)}


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = KeyedPair(tmp_path)
    yield p
    p.stop()


def api(server: BastionServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, server.url(path), timeout=60, **kwargs)


def stored_study(server: BastionServer, root: Path) -> Study:
    made = make_study(root, series=1, per_series=2, modality="CT", patient_name="Edge^Patient", accession="ACC-EDGE")
    assert server.storescu(*made.files).stdout.count("Received Store Response (Success)") == 2
    return made


def draft(server: BastionServer, study: Study) -> dict[str, Any]:
    """A preliminary report of ``study`` (version 2) with :data:`SECTIONS`."""
    made = api(server, "POST", "/api/reports", json={"study": study.study_uid, "template": "ct-head"})
    assert made.status_code == 201, made.text
    edited = api(server, "PUT", f"/api/reports/{made.json()['id']}",
                 json={"sections": SECTIONS, "version": 1, "state": "preliminary"})
    assert edited.status_code == 200, edited.text
    doc: dict[str, Any] = edited.json()
    return doc


def sr_uids(server: BastionServer, study_uid: str) -> list[str]:
    rsp = api(server, "GET", f"/dicom-web/studies/{study_uid}/instances", params={"Modality": "SR"})
    return [i["00080018"]["Value"][0] for i in rsp.json()] if rsp.status_code == 200 else []


def reports_of(server: BastionServer, study_uid: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = api(server, "GET", "/api/reports", params={"study": study_uid}).json()["reports"]
    return found


def test_a_report_signed_on_an_edge_while_the_centre_is_down_is_final_at_the_centre(
        pair: Pair, tmp_path: Path) -> None:
    edge = pair.edge()
    study = stored_study(edge, tmp_path / "ct")
    rid = draft(edge, study)["id"]
    signed = api(edge, "POST", f"/api/reports/{rid}/sign", json={"user": "Dr^Edge"})
    assert signed.status_code == 200, signed.text
    report = signed.json()
    assert report["state"] == "final" and sr_uids(edge, study.study_uid) == report["sr"]
    wait_for("the study and its SR queued for the centre", lambda: edge_report(edge)["backlog"] == 3, edge)

    central = pair.upstream()
    wait_for("everything delivered", lambda: edge_report(edge)["backlog"] == 0, edge)
    assert sorted(sr_uids(central, study.study_uid)) == report["sr"]
    [there] = wait_for("the report at the centre", lambda: reports_of(central, study.study_uid), central)
    assert there == report  # the same id, state, sections, signer, SR and history
    assert there["state"] == "final" and there["signed_by"] == "Dr^Edge" and there["sections"]["findings"] == \
        SECTIONS["findings"]
    assert api(central, "GET", f"/api/reports/{rid}").json() == report
    bundle = api(central, "GET", "/fhir/DiagnosticReport", params={"study": study.study_uid}).json()
    assert bundle["total"] == 1 and bundle["entry"][0]["resource"]["status"] == "final"
    assert bundle["entry"][0]["resource"]["conclusion"] == SECTIONS["impression"]

    # The centre amends it; the edge's report stays as signed there (reports go up with the images, not down).
    amended = api(central, "POST", f"/api/reports/{rid}/amend",
                  json={"sections": {"impression": "Nodule; CT in 3 months."}, "reason": "advice", "user": "Dr^Hub"})
    assert amended.status_code == 200, amended.text
    assert amended.json()["version"] == report["version"] + 1 and amended.json()["sr"][0] == report["sr"][0]
    assert api(edge, "GET", f"/api/reports/{rid}").json() == report


def test_a_report_from_an_edge_goes_out_over_hl7_at_the_centre_when_it_arrives(tmp_path: Path) -> None:
    """A report signed on an edge while the centre was down reaches the centre's HL7 receiver once the edge's queue
    delivers its SR. The sender's regular look covers the reports changed since its last look, less a minute
    (MARGIN_S), and its next deep look is ten minutes away: an outage longer than that minute is seen because the
    intake hands each report it keeps to the sender, which this test tells apart by letting the report age past
    the margin before its SR arrives."""
    listener = Listener(free_port()).start()
    pair = KeyedPair(tmp_path, centre={"BASTION_HL7_RECEIVERS": f"127.0.0.1:{listener.port}"})
    try:
        central = pair.upstream()  # the receiver was configured before the outage
        central.stop()
        edge = pair.edge()
        study = stored_study(edge, tmp_path / "ct")
        rid = draft(edge, study)["id"]
        assert api(edge, "POST", f"/api/reports/{rid}/sign", json={"user": "Dr^Edge"}).status_code == 200
        signed = time.monotonic()
        edge.stop()  # so that the centre's sender has looked (its first look is at start) before the SR arrives
        central.start()
        wait_for("the centre's HL7 sender", lambda: "HL7: ORU^R01 of signed reports to" in central.log(), central)
        time.sleep(2)  # its first look (over an index holding one study) is done: the next deep look is 10 min away
        time.sleep(max(0.0, signed + MARGIN_S + 2 - time.monotonic()))  # older than the regular look reaches back
        edge.start()
        wait_for("the report at the centre", lambda: reports_of(central, study.study_uid), central)
        [message] = wait_for("its ORU^R01 at the receiver", lambda: listener.messages(rid), central)
        assert "ORU^R01" in message and "Dr\\S\\Edge" in message  # OBR-32, the signer ("^" escaped)
    finally:
        pair.stop()
        listener.stop()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BastionServer]:
    started = BastionServer(tmp_path / "data").start()
    yield started
    started.stop()


@pytest.mark.skipif(REMOTE, reason="the failure is a directory in the way of the report's file")
def test_a_sign_whose_report_write_fails_after_its_sr_is_stored_ends_final(server: BastionServer,
                                                                          tmp_path: Path) -> None:
    study = stored_study(server, tmp_path / "ct")
    doc = draft(server, study)
    blocked = server.data / "blobs" / version_key(doc["id"], doc["version"] + 1)
    blocked.mkdir(parents=True)  # the signed version's file cannot be made: the write fails after the SR's store
    failed = api(server, "POST", f"/api/reports/{doc['id']}/sign", json={"user": "Dr^Crash"})
    assert failed.status_code == 503, failed.text
    [sr] = sr_uids(server, study.study_uid)  # the SR is stored ...
    assert api(server, "GET", f"/api/reports/{doc['id']}").json()["state"] == "preliminary"  # ... its report not
    retried = api(server, "POST", f"/api/reports/{doc['id']}/sign", json={"user": "Dr^Crash"})
    assert retried.status_code == 503, retried.text  # still failing: but the SR stored stands, not a second one
    assert sr_uids(server, study.study_uid) == [sr] and server.stats()["versions"] == 0
    blocked.rmdir()  # the disk is put right: the intake's next pass keeps the version the SR carries
    final = wait_for("the report final from its SR",
                     lambda: (d := api(server, "GET", f"/api/reports/{doc['id']}").json())["state"] == "final" and d,
                     server)
    assert final["sr"] == [sr] and final["signed_by"] == "Dr^Crash" and final["sections"] == doc["sections"]
    assert final["version"] == doc["version"] + 1
    again = api(server, "POST", f"/api/reports/{doc['id']}/sign", json={"user": "Dr^Crash"})
    assert again.status_code == 409  # signed once
    server.stop()
    server.start()
    assert api(server, "GET", f"/api/reports/{doc['id']}").json() == final
    assert sr_uids(server, study.study_uid) == [sr]


def test_index_rebuild_brings_a_report_back_from_its_sr_when_its_blobs_are_lost(server: BastionServer,
                                                                              tmp_path: Path) -> None:
    study = stored_study(server, tmp_path / "ct")
    rid = draft(server, study)["id"]
    signed = api(server, "POST", f"/api/reports/{rid}/sign", json={"user": "Dr^Lost"}).json()
    amended = api(server, "POST", f"/api/reports/{rid}/amend",
                  json={"sections": {"impression": "Benign."}, "reason": "comparison", "user": "Dr^Lost"}).json()
    assert amended["state"] == "amended" and len(amended["sr"]) == 2
    server.stop()
    blobs = open_blob_store(locations(server.data).get("blobs", str(server.data / "blobs")))
    try:
        lost = sorted(blobs.keys(f"reports/{rid}/"))
        assert lost == [version_key(rid, v) for v in range(1, amended["version"] + 1)]
        for key in lost:
            blobs.delete(key)
    finally:
        blobs.close()
    rebuilt = run_bastion("index", "rebuild", "--data", server.data)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "2 report version(s) kept again from their SRs" in rebuilt.stdout
    server.start()
    assert api(server, "GET", f"/api/reports/{rid}").json() == amended
    assert reports_of(server, study.study_uid) == [amended]
    if not REMOTE:  # the signed version is back as a file too, as its SR carried it
        assert (server.data / "blobs" / version_key(rid, signed["version"])).exists()
        shutil.rmtree(server.data / "blobs" / "reports")
        server.stop()
        for path in server.data.glob("index.sqlite3*"):
            path.unlink()  # and the rebuild at start of a lost index, then the intake at start
        server.start()
        wait_for("the report back after the rebuild at start",
                 lambda: api(server, "GET", f"/api/reports/{rid}").status_code == 200, server)
        assert api(server, "GET", f"/api/reports/{rid}").json() == amended


def test_an_sr_sealed_under_another_key_brings_no_report_in(tmp_path: Path) -> None:
    """Anyone who may store objects could store an SR carrying a "final" report in a radiologist's name: only one
    sealed under the archive's report key is taken (bastion.reporting.seal)."""
    key_file = tmp_path / "report.key"
    key_file.write_text(secrets.token_hex(32))
    server = BastionServer(tmp_path / "data", settings={"BASTION_REPORT_KEY_FILE": str(key_file)}).start()
    try:
        study = stored_study(server, tmp_path / "ct")
        facts = {"StudyInstanceUID": study.study_uid, "PatientID": study.patient_id, "PatientName": "Edge^Patient"}
        made = []
        for name, key in (("forged", secrets.token_bytes(32)), ("sealed", bytes.fromhex(key_file.read_text()))):
            doc = {"id": secrets.token_hex(16), "study": study.study_uid, "patient_id": study.patient_id,
                   "state": "final", "version": 2, "sections": {"impression": f"{name} report"},
                   "section_titles": {"impression": "Impression"}, "template": "blank", "template_title": "Blank",
                   "signed_by": "Dr^Someone", "signed_at": "2026-12-07T10:00:00.000Z", "author": "x", "audio": [],
                   "reason": "", "history": []}
            doc["sr"] = [sr_uid(doc["id"], 2)]
            path = tmp_path / f"{name}.dcm"
            path.write_bytes(build_sr(doc, facts, key))
            assert server.storescu(path).stdout.count("Received Store Response (Success)") == 1  # stored as an SR
            made.append(doc["id"])
        forged, sealed = made
        wait_for("the sealed SR's report taken", lambda: api(server, "GET", f"/api/reports/{sealed}").status_code == 200,
                 server)
        assert api(server, "GET", f"/api/reports/{forged}").status_code == 404  # the forged one was read before it
        assert [r["id"] for r in reports_of(server, study.study_uid)] == [sealed]
        assert "not sealed by this archive's report key" in server.log()
    finally:
        server.stop()
