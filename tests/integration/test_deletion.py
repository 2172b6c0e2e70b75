"""Deleting a study over a real server (docs/deletion.md): DELETE hides it from QIDO-RS, findscu, WADO-RS/URI and
movescu, refuses stores into it; ``bastion purge`` refuses inside the delay; undelete brings it all back with exact
counts; the state log keeps it hidden through ``bastion index rebuild`` and the rebuild at start; a purge with the
delay at 0 removes its bytes from every blob store, and a rebuild does not bring it back."""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from backends import REMOTE
from conftest import (
    DEST_AET,
    BastionServer,
    StoreSCP,
    browser_check_result,
    free_port,
    make_study,
    run_bastion,
    start_browser_check,
)
from test_dimse_retrieve import movescu

pytestmark = pytest.mark.timeout(300)


def _qido(server: BastionServer, path: str) -> list[dict[str, Any]]:
    rsp = httpx.get(server.url(f"/dicom-web/{path}"), timeout=30)
    assert rsp.status_code in (200, 204), rsp.text
    return rsp.json() if rsp.status_code == 200 and rsp.content else []


def _study_count(server: BastionServer, study: str) -> int | None:
    found = _qido(server, f"studies?StudyInstanceUID={study}&includefield=NumberOfStudyRelatedInstances")
    return None if not found else int(found[0]["00201208"]["Value"][0])


def _find(server: BastionServer, study: str, out: Path) -> int:
    proc, responses = server.find({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study,
                                   "NumberOfStudyRelatedInstances": ""}, out=out)
    assert "Final Find Response" in proc.stdout or "C-FIND-RSP" in proc.stdout or proc.returncode == 0, proc.stdout
    return sum(int(r.NumberOfStudyRelatedInstances) for r in responses)


def _delete(server: BastionServer, study: str, reason: str = "") -> httpx.Response:
    query = f"?reason={urllib.parse.quote(reason)}" if reason else ""
    return httpx.delete(server.url(f"/dicom-web/studies/{study}{query}"), timeout=60)


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _refused(storescu_output: str) -> bool:
    """Whether storescu was answered 0x0124 Refused: Not Authorized (DCMTK calls it unknown for a C-STORE)."""
    return re.search(r"Received Store Response \(.*0x0?124\)", storescu_output) is not None


def _audited(data: Path, study: str, action: str) -> bool:
    for path in data.rglob("audit*.jsonl"):
        for line in path.read_text(errors="replace").splitlines():
            if study in line and '"delete"' in line and f'"action": "{action}"' in line.replace('":"', '": "'):
                return True
    return False


def test_delete_hides_everywhere_and_undelete_restores_exactly(bastion: BastionServer, storescp: StoreSCP,
                                                             tmp_path: Path) -> None:
    gone = make_study(tmp_path / "gone", series=2, per_series=3)
    kept = make_study(tmp_path / "kept", series=1, per_series=2)
    proc = bastion.storescu(*gone.files, *kept.files)
    assert proc.stdout.count("Received Store Response (Success)") == 8, proc.stdout
    assert _study_count(bastion, gone.study_uid) == 6
    series_uid = next(iter(gone.series))
    sop = f"{series_uid}.1"

    rsp = _delete(bastion, gone.study_uid, "wrong patient")
    assert rsp.status_code == 200, rsp.text
    tombstone = rsp.json()
    assert (tombstone["study"], tombstone["count"], tombstone["reason"], tombstone["patient_id"],
            tombstone["state"]) == (gone.study_uid, 6, "wrong patient", gone.patient_id, "deleted")
    assert _delete(bastion, gone.study_uid).status_code == 409
    assert _delete(bastion, "1.2.3.4.5.6.7.8.9").status_code == 404
    assert _delete(bastion, "not-a-uid").status_code == 400

    # hidden from QIDO-RS, C-FIND, WADO-RS, WADO-URI, metadata and C-MOVE; the other study is untouched
    assert _study_count(bastion, gone.study_uid) is None and _study_count(bastion, kept.study_uid) == 2
    assert _qido(bastion, f"studies/{gone.study_uid}/instances") == []
    assert _qido(bastion, f"instances?PatientID={gone.patient_id}") == []
    assert _find(bastion, gone.study_uid, tmp_path / "find1") == 0
    assert _find(bastion, kept.study_uid, tmp_path / "find2") == 2
    for path in (f"/dicom-web/studies/{gone.study_uid}", f"/dicom-web/studies/{gone.study_uid}/metadata",
                 f"/dicom-web/studies/{gone.study_uid}/series/{series_uid}/instances/{sop}",
                 f"/wado?requestType=WADO&studyUID={gone.study_uid}&seriesUID={series_uid}&objectUID={sop}"
                 "&contentType=application/dicom"):
        assert httpx.get(bastion.url(path), timeout=30).status_code == 404, path
    storescp.clear()
    output, rsps = movescu(bastion, DEST_AET, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": gone.study_uid})
    assert storescp.received() == {}, output
    assert all(r["completed"] in ("", "0") for r in rsps), output

    # a store into the deleted study is refused, and leaves it hidden
    proc = bastion.storescu(gone.files[0])
    assert "Received Store Response (Success)" not in proc.stdout and _refused(proc.stdout), proc.stdout
    stow = httpx.post(bastion.url("/dicom-web/studies"), timeout=60,
                      content=b"--b\r\nContent-Type: application/dicom\r\n\r\n" + gone.files[1].read_bytes()
                      + b"\r\n--b--\r\n",
                      headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
    assert stow.status_code == 409, stow.text
    assert _study_count(bastion, gone.study_uid) is None

    listed = httpx.get(bastion.url("/api/deleted"), timeout=30).json()
    assert [t["study"] for t in listed["studies"]] == [gone.study_uid] and listed["deletion_delay_days"] == 30

    # inside the delay, bastion purge refuses and removes nothing
    refused = run_bastion("purge", "--data", bastion.data, "--study", gone.study_uid)
    assert refused.returncode == 1 and "inside the 30-day delay" in refused.stderr, refused.stderr
    nothing = run_bastion("purge", "--data", bastion.data)
    assert nothing.returncode == 0 and f"kept study {gone.study_uid}" in nothing.stdout, nothing.stdout

    # undelete: all visible again, counts exact, retrievable
    rsp = httpx.post(bastion.url(f"/api/studies/{gone.study_uid}/undelete"), json={"reason": "right patient"},
                     timeout=60)
    assert rsp.status_code == 200, rsp.text
    assert httpx.post(bastion.url(f"/api/studies/{gone.study_uid}/undelete"), timeout=60).status_code == 404
    assert _study_count(bastion, gone.study_uid) == 6
    assert len(_qido(bastion, f"studies/{gone.study_uid}/instances")) == 6
    assert _find(bastion, gone.study_uid, tmp_path / "find3") == 6
    storescp.clear()
    output, rsps = movescu(bastion, DEST_AET, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": gone.study_uid})
    assert rsps[-1]["completed"] == "6", output
    assert len(storescp.received()) == 6
    assert httpx.get(bastion.url(f"/dicom-web/studies/{gone.study_uid}/metadata"), timeout=30).status_code == 200
    assert httpx.get(bastion.url("/api/deleted"), timeout=30).json()["studies"] == []
    _wait_for(lambda: _audited(bastion.data, gone.study_uid, "D") and _audited(bastion.data, gone.study_uid, "U"),
              "the deletion and the undeletion in the audit trail")


def test_the_state_log_survives_rebuilds_and_purge_removes_every_copy(bastion_factory: Any, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    stores = [] if REMOTE else [tmp_path / "disk1", tmp_path / "disk2"]
    settings = {"BASTION_BLOBS": ",".join(map(str, stores))} if stores else {}
    if stores:
        monkeypatch.setenv("BASTION_BLOBS", settings["BASTION_BLOBS"])  # the CLI commands below use them too
    server: BastionServer = bastion_factory(data, settings=settings)
    gone = make_study(tmp_path / "gone", series=1, per_series=3)
    kept = make_study(tmp_path / "kept", series=1, per_series=2)
    proc = server.storescu(*gone.files, *kept.files)
    assert proc.stdout.count("Received Store Response (Success)") == 5, proc.stdout
    assert _delete(server, gone.study_uid, "duplicate upload").status_code == 200
    server.stop()

    # bastion index rebuild: the stored files come back, the state log hides the study again
    rebuilt = run_bastion("index", "rebuild", "--data", data)
    assert rebuilt.returncode == 0, rebuilt.stderr
    server = bastion_factory(data, settings=settings)
    assert _study_count(server, gone.study_uid) is None and _study_count(server, kept.study_uid) == 2
    assert [t["study"] for t in server.get_json("/api/deleted")["studies"]] == [gone.study_uid]
    last = server.stats()["last_change"]
    server.stop()

    # the rebuild at start (the index lost) hides it too
    if not REMOTE:
        (data / "index.sqlite3").unlink()
        server = bastion_factory(data, settings=settings)
        _wait_for(lambda: server.get_json("/health")["status"] == "ok", "the rebuild at start")
        assert _study_count(server, gone.study_uid) is None and _study_count(server, kept.study_uid) == 2
        last = server.stats()["last_change"]
        server.stop()

    # inside the delay: refused; with deletion_delay_days = 0: purged from every store
    refused = run_bastion("purge", "--data", data, "--study", gone.study_uid)
    assert refused.returncode == 1, refused.stderr
    monkeypatch.setenv("BASTION_DELETION_DELAY_DAYS", "0")
    dry = run_bastion("purge", "--data", data, "--dry-run")
    assert dry.returncode == 0 and f"would purge study {gone.study_uid}" in dry.stdout, dry.stdout
    purged = run_bastion("purge", "--data", data, "--json")
    assert purged.returncode == 0, purged.stderr
    report = json.loads(purged.stdout)
    assert [(t["study"], t["removed_versions"]) for t in report["purged"]] == [(gone.study_uid, 3)]
    assert run_bastion("purge", "--data", data, "--study", gone.study_uid).returncode == 1  # purged already
    assert run_bastion("undelete", "--data", data, gone.study_uid).returncode == 1  # too late

    server = bastion_factory(data, settings=settings)
    for sop in gone.sop_uids:
        assert server.blobs_of(sop) == [], sop
    for store in stores:
        names = [p.name for p in store.rglob("*.dcm")]
        assert len(names) == 2 and not any(gone.study_uid in n for n in names), names
        assert list((store / "state").rglob("*.json")), f"no state log in {store}"
    deleted = [c for c in server.get_json(f"/api/changes?since={last}&limit=1000")["changes"]
               if c["kind"] == "deleted" and c["study_uid"] == gone.study_uid]
    assert sorted(c["sop_uid"] for c in deleted) == sorted(gone.sop_uids)
    assert server.get_json("/api/deleted")["studies"][0]["state"] == "purged"
    proc = server.storescu(gone.files[0])
    assert _refused(proc.stdout), proc.stdout  # a purged study stays refused
    server.stop()

    # a rebuild after the purge does not bring it back
    rebuilt = run_bastion("index", "rebuild", "--data", data)
    assert rebuilt.returncode == 0, rebuilt.stderr
    server = bastion_factory(data, settings=settings)
    assert _study_count(server, gone.study_uid) is None and _study_count(server, kept.study_uid) == 2
    assert server.stats()["instances"] == 2
    assert server.get_json("/api/deleted")["studies"][0]["state"] == "purged"


@pytest.mark.usefixtures("browser")
def test_the_admin_page_deletes_and_undeletes(bastion_factory: Any, tmp_path: Path) -> None:
    """A real browser: the search result's "delete" asks why and hides the study, the Deleted studies panel lists
    it, and its "undelete" brings it back."""
    server: BastionServer = bastion_factory()
    study = make_study(tmp_path / "study", series=1, per_series=2)
    assert server.storescu(*study.files).stdout.count("Received Store Response (Success)") == 2
    report = browser_check_result(start_browser_check("deletion_check.mjs", "--base", server.url(""), "--out",
                                                      tmp_path / "browser", "--study", study.study_uid), timeout=120)
    assert report["exit_code"] == 0, report
    assert report["prompts"][0].startswith(f"Delete study {study.study_uid}") and "30 days" in report["prompts"][0]
    row = report["deletedRow"]
    assert (row["study"], row["patient"], row["instances"], row["reason"], row["state"]) == (
        study.study_uid, study.patient_id, "2", "wrong patient (browser)", "deleted")
    assert _study_count(server, study.study_uid) == 2  # undeleted
    assert server.get_json("/api/deleted")["studies"] == []


def test_only_an_admin_may_delete_once_auth_is_on(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # no identity provider: API keys only
    data = tmp_path / "data"
    server = BastionServer(data, settings={"BASTION_AUTH_ENABLED": "true", "BASTION_AUTH_ISSUER": closed,
                                           "BASTION_AUTH_AUDIENCE": "bastion", "BASTION_AUTH_JWKS_URL": f"{closed}/jwks",
                                           "BASTION_AUTH_FAILURE_LIMIT": "1000"}).start()
    try:
        study = make_study(tmp_path / "study", series=1, per_series=2)
        assert server.storescu(*study.files).stdout.count("Received Store Response (Success)") == 2
        keys = {role: run_bastion("apikey", "create", "--data", data, "--name", f"{role}-key", "--role",
                                  role).stdout.strip() for role in ("viewer", "uploader", "admin")}
        url = server.url(f"/dicom-web/studies/{study.study_uid}?reason=test")
        undelete = server.url(f"/api/studies/{study.study_uid}/undelete")
        _wait_for(lambda: httpx.get(server.url("/api/deleted"), headers={"X-API-Key": keys["admin"]},
                                    timeout=10).status_code == 200, "the API keys to be read")
        assert httpx.delete(url, timeout=10).status_code == 401
        for role in ("viewer", "uploader"):
            headers = {"X-API-Key": keys[role]}
            assert httpx.delete(url, headers=headers, timeout=10).status_code == 403, role
            assert httpx.post(undelete, headers=headers, timeout=10).status_code == 403, role
            assert httpx.get(server.url("/api/deleted"), headers=headers, timeout=10).status_code == 403, role
        viewer = {"X-API-Key": keys["viewer"]}
        assert httpx.get(server.url(f"/dicom-web/studies?StudyInstanceUID={study.study_uid}"), headers=viewer,
                         timeout=10).status_code == 200  # still there
        rsp = httpx.delete(url, headers={"X-API-Key": keys["admin"]}, timeout=30)
        assert rsp.status_code == 200, rsp.text
        assert (rsp.json()["user"], rsp.json()["role"]) == ("admin-key", "admin")
        hidden = httpx.get(server.url(f"/dicom-web/studies?StudyInstanceUID={study.study_uid}"), headers=viewer,
                           timeout=10)
        assert hidden.status_code == 204 or hidden.json() == [], hidden.text
        assert httpx.post(undelete, headers={"X-API-Key": keys["admin"]}, timeout=30).status_code == 200
    finally:
        server.stop()


def test_apply_state_log_follows_the_log_both_ways(archive: Any, tmp_path: Path) -> None:
    """An index that holds a study hidden which the state log says was undeleted since (an online rebuild's new
    index, built before the undelete) gets it back exactly; one that shows a study the log says is deleted hides it;
    applying the log again changes nothing."""
    from bastion.blobs.statelog import UNDELETE
    from bastion.ingest.deletion import apply_state_log

    study = make_study(tmp_path / "study", series=2, per_series=2)
    for path in study.files:
        archive.ingest.store_bytes(path.read_bytes(), "test")
    before = archive.index.statistics()
    archive.deletions.delete(study.study_uid, reason="test", user="tester")
    assert archive.index.statistics().instances == before.instances - 4
    archive.deletions.state_log.append(UNDELETE, study.study_uid, user="elsewhere")  # as another node would
    assert apply_state_log(archive.blobs, archive.index) == 0
    after = archive.index.statistics()
    assert (after.studies, after.series, after.instances) == (before.studies, before.series, before.instances)
    assert archive.deletions.tombstones() == [] and archive.index.hidden_versions(study.study_uid) == []
    archive.deletions.delete(study.study_uid, reason="again")
    archive.index.forget_hidden(study.study_uid, purged=False)  # an index that lost the hiding: shown again
    archive.index.set_tombstone(study.study_uid, None)
    for path in study.files:
        archive.ingest.store_bytes(path.read_bytes(), "test")
    assert archive.index.statistics().instances == before.instances
    assert apply_state_log(archive.blobs, archive.index) == 1
    assert archive.index.statistics().instances == before.instances - 4
    assert [t.study for t in archive.deletions.tombstones()] == [study.study_uid]
    assert apply_state_log(archive.blobs, archive.index) == 1
    assert archive.index.statistics().instances == before.instances - 4


def test_crash_recovery_keeps_a_deleted_study_hidden(archive: Any, tmp_path: Path) -> None:
    """Objects of a deleted study that crash recovery finds unheld (their rows lost) are recorded and hidden again;
    those the index keeps hidden are not taken up at all."""
    from bastion.ingest.rebuild import recover

    study = make_study(tmp_path / "study", series=1, per_series=3)
    for path in study.files:
        archive.ingest.store_bytes(path.read_bytes(), "test")
    archive.deletions.delete(study.study_uid, reason="test")
    assert recover(archive.blobs, archive.index, archive.node_id).indexed == 0  # held, hidden
    archive.index.forget_hidden(study.study_uid, purged=False)  # the rows lost; the tombstone kept
    assert recover(archive.blobs, archive.index, archive.node_id).indexed == 3
    assert archive.index.statistics().instances == 0
    assert len(archive.index.hidden_versions(study.study_uid)) == 3
