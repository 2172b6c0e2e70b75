"""The audit trail end to end: a real server, DCMTK storescu / findscu / movescu and HTTP QIDO-RS, WADO-RS,
WADO-URI and STOW-RS; the entries name the right user, address, studies and counts; ``bastion audit verify`` says
OK; an edited line makes it fail naming that line; the export is PS3.15 A.5 XML in RFC 5424 syslog lines."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    DEST_AET,
    HAVE_DCMTK,
    BastionServer,
    StoreSCP,
    browser_check_result,
    make_study,
    run_bastion,
    run_dcmtk,
    start_browser_check,
    unavailable,
)
from syslog_listener import SyslogListener

BOUNDARY = "auditboundary"


@pytest.fixture(autouse=True)
def _dcmtk() -> None:
    if not HAVE_DCMTK:
        unavailable("DCMTK not installed")


def _wait_for(entries: Callable[[], list[dict[str, Any]]], wanted: Callable[[list[dict[str, Any]]], bool],
              timeout: float = 60.0) -> list[dict[str, Any]]:
    """Poll ``entries`` until ``wanted`` holds (the writers flush every 200 ms; a generous deadline)."""
    deadline = time.monotonic() + timeout
    found = entries()
    while not wanted(found) and time.monotonic() < deadline:
        time.sleep(0.2)
        found = entries()
    return found


def _of(found: list[dict[str, Any]], kind: str, **match: Any) -> list[dict[str, Any]]:
    return [e for e in found if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())]


def test_accesses_are_audited_and_the_chain_verifies(tmp_path: Path, storescp: StoreSCP,
                                                     bastion_factory: Callable[..., BastionServer]) -> None:
    server = bastion_factory(remotes=(f"{DEST_AET}@127.0.0.1:{storescp.port}",))
    study = make_study(tmp_path / "study", series=2, per_series=3)
    other = make_study(tmp_path / "other", series=1, per_series=2)

    # DIMSE: one association storing 6 instances, a C-FIND, a C-MOVE
    proc = run_dcmtk("storescu", "-v", "-aet", "MODALITY1", *server.addr(), *map(str, study.files), timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = run_dcmtk("findscu", "-v", "-S", "-aet", "FINDER", "-k", "QueryRetrieveLevel=STUDY",
                     "-k", f"PatientID={study.patient_id}", "-k", "StudyInstanceUID", *server.addr(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    proc = run_dcmtk("movescu", "-v", "-S", "-aet", "MOVER", "-aem", DEST_AET, "-k", "QueryRetrieveLevel=STUDY",
                     "-k", f"StudyInstanceUID={study.study_uid}", *server.addr(), timeout=90)
    assert proc.returncode == 0, proc.stderr

    # HTTP: QIDO-RS, WADO-RS metadata, WADO-URI, STOW-RS
    (sop_path, *_) = study.files
    with httpx.Client(base_url=server.url(""), timeout=30) as http:
        r = http.get("/dicom-web/studies", params={"PatientID": study.patient_id},
                     headers={"Accept": "application/dicom+json"})
        assert r.status_code == 200 and len(r.json()) == 1
        r = http.get(f"/dicom-web/studies/{study.study_uid}/metadata", headers={"Accept": "application/dicom+json"})
        assert r.status_code == 200 and len(r.json()) == 6
        series_uid = next(iter(study.series))
        sop_uid = sop_path.stem
        r = http.get("/wado", params={"requestType": "WADO", "studyUID": study.study_uid, "seriesUID": series_uid,
                                      "objectUID": sop_uid, "contentType": "application/dicom"})
        assert r.status_code == 200
        body = b"".join(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.read_bytes()
                        + b"\r\n" for f in other.files) + f"--{BOUNDARY}--\r\n".encode()
        r = http.post("/dicom-web/studies", content=body, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            "Accept": "application/dicom+json"})
        assert r.status_code == 200, r.text

        def recent() -> list[dict[str, Any]]:
            rsp = http.get("/api/audit", params={"limit": 200})
            assert rsp.status_code == 200, rsp.text
            return list(rsp.json()["entries"])

        found = _wait_for(recent, lambda f: len(_of(f, "store")) >= 2 and _of(f, "retrieve") and _of(f, "view", count=1))

        # the C-STOREs: one event for the association's study, not six
        (stored,) = _of(found, "store", via="dimse")
        assert stored["user"] == "MODALITY1" and stored["address"] == "127.0.0.1"
        assert stored["studies"] == [study.study_uid] and stored["count"] == 6
        assert stored["patient_id"] == study.patient_id and stored["outcome"] == 0
        (stowed,) = _of(found, "store", via="dicomweb")
        assert stowed["studies"] == [other.study_uid] and stowed["count"] == 2 and stowed["user"] == "anonymous"
        # the C-FIND and the QIDO-RS search
        (find,) = _of(found, "query", via="dimse")
        assert find["user"] == "FINDER" and find["level"] == "STUDY" and find["count"] == 1
        assert f"PatientID={study.patient_id}" in find["detail"] and find["patient_id"] == study.patient_id
        (qido,) = _of(found, "query", via="dicomweb")
        assert qido["address"] == "127.0.0.1" and qido["count"] == 1 and qido["level"] == "STUDY"
        # the C-MOVE
        (moved,) = _of(found, "retrieve")
        assert moved["user"] == "MOVER" and moved["destination"] == DEST_AET
        assert moved["studies"] == [study.study_uid] and moved["count"] == 6
        # the views: the metadata of 6 instances, one instance over WADO-URI
        assert _of(found, "view", detail="metadata", count=6, studies=[study.study_uid])
        assert _of(found, "view", detail="wado-uri", count=1, studies=[study.study_uid])
        # the server's start
        assert _of(found, "config", event_type="110120")
        seqs = [e["seq"] for e in found]
        assert seqs == sorted(seqs, reverse=True)  # newest first
        assert http.get("/api/audit", params={"kind": "nonsense"}).status_code == 400
        assert [e["kind"] for e in http.get("/api/audit", params={"kind": "retrieve"}).json()["entries"]] == ["retrieve"]
        check = http.get("/api/audit/verify").json()
        assert check["ok"] is True, check

    server.stop()
    data = server.data
    proc = run_bastion("audit", "verify", "--data", data)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK: ")

    proc = run_bastion("audit", "export", "--data", data, "--format", "syslog")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) >= 8
    for line in lines:
        assert line.startswith(("<85>1 ", "<84>1 ")) and " bastion " in line and " IHE+RFC-3881 - " in line
        ET.fromstring(line.split(" - \ufeff", 1)[1])
    moved_xml = [line for line in lines if 'UserID="MOVER"' in line and 'UserID="DEST"' in line]
    assert len(moved_xml) == 1
    root = ET.fromstring(moved_xml[0].split(" - \ufeff", 1)[1])
    event_id = root.find("EventIdentification/EventID")
    assert event_id is not None and event_id.get("csd-code") == "110104"
    proc = run_bastion("audit", "export", "--data", data, "--format", "jsonl", "--out", tmp_path / "audit.jsonl")
    assert proc.returncode == 0, proc.stderr
    exported = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert exported[-1]["event_type"] == "110121"  # the stop, last
    assert exported[-1]["message"]["EventIdentification"]["EventID"]["csd-code"] == "110100"

    # an edited entry: verify names its file and line
    (log_file,) = sorted((data / "audit").glob("audit-*.jsonl"))
    raw = log_file.read_bytes().splitlines(keepends=True)
    number = next(i for i, line in enumerate(raw) if b'"MOVER"' in line)
    raw[number] = raw[number].replace(b'"MOVER"', b'"NOBODY"')
    log_file.write_bytes(b"".join(raw))
    proc = run_bastion("audit", "verify", "--data", data)
    assert proc.returncode == 1
    assert f"{log_file.name} line {number + 1} (seq {number + 1})" in proc.stdout and "edited" in proc.stdout


@pytest.mark.usefixtures("browser")
def test_the_admin_page_shows_the_audit_panel(tmp_path: Path, storescp: StoreSCP,
                                              bastion_factory: Callable[..., BastionServer]) -> None:
    """A real browser: the Audit panel says the chain verifies, lists the C-MOVE's entry, filters by kind."""
    server = bastion_factory(remotes=(f"{DEST_AET}@127.0.0.1:{storescp.port}",))
    study = make_study(tmp_path / "study", series=1, per_series=2)
    assert run_dcmtk("storescu", "-aet", "PANELSCU", *server.addr(), *map(str, study.files)).returncode == 0
    proc = run_dcmtk("movescu", "-S", "-aet", "PANELMOVER", "-aem", DEST_AET, "-k", "QueryRetrieveLevel=STUDY",
                     "-k", f"StudyInstanceUID={study.study_uid}", *server.addr(), timeout=90)
    assert proc.returncode == 0, proc.stderr
    _wait_for(lambda: list(server.get_json("/api/audit?kind=retrieve")["entries"]), bool)
    report = browser_check_result(start_browser_check("audit_check.mjs", "--base", server.url(""), "--out",
                                                      tmp_path / "browser", "--user", "PANELMOVER"), timeout=120)
    assert report["exit_code"] == 0, report
    assert report["verifyLine"].startswith("OK: ")
    row = report["userRow"]
    assert row["kind"].startswith(("association", "retrieve")) and row["outcome"] == "success"
    assert "127.0.0.1" in row["from"]
    assert report["filteredKinds"] and all(k.startswith("retrieve") for k in report["filteredKinds"])


def test_the_chain_goes_on_after_kill_9(tmp_path: Path, bastion_factory: Callable[..., BastionServer]) -> None:
    """``kill -9`` the server, start it again on the same data: the new processes find the chain's tail from the
    anchor and the file, the chain goes on and verifies."""
    server = bastion_factory()
    first, second = make_study(tmp_path / "a", series=1, per_series=2), make_study(tmp_path / "b", series=1, per_series=3)
    assert run_dcmtk("storescu", "-aet", "BEFORE", *server.addr(), *map(str, first.files)).returncode == 0

    def stores(s: BastionServer) -> Callable[[], list[dict[str, Any]]]:
        return lambda: list(s.get_json("/api/audit?kind=store")["entries"])

    assert _wait_for(stores(server), lambda f: bool(_of(f, "store", user="BEFORE")))
    server.kill9()
    again = bastion_factory(data=server.data)
    assert run_dcmtk("storescu", "-aet", "AFTER", *again.addr(), *map(str, second.files)).returncode == 0
    found = _wait_for(stores(again), lambda f: bool(_of(f, "store", user="AFTER")))
    (after,) = _of(found, "store", user="AFTER")
    assert after["count"] == 3 and after["studies"] == [second.study_uid]
    again.stop()
    proc = run_bastion("audit", "verify", "--data", server.data, "--json")
    verdict = json.loads(proc.stdout)
    assert proc.returncode == 0 and verdict["ok"], verdict
    lines = [json.loads(x) for f in sorted((server.data / "audit").glob("audit-*.jsonl")) for x in f.read_text().splitlines()]
    assert [e["seq"] for e in lines] == list(range(1, len(lines) + 1))
    assert [e.get("event_type") for e in lines if e["kind"] == "config"] == ["110120", "110120", "110121"]
    assert f"audit log at stop: seq {lines[-1]['seq']}, hash {lines[-1]['hash']}" in again.log()


def test_the_server_forwards_its_audit_log_to_a_repository(tmp_path: Path,
                                                          bastion_factory: Callable[..., BastionServer]) -> None:
    """``[audit] forward``: a real TLS syslog receiver gets each entry once, as RFC 5424 with the A.5 XML, the
    server's stop included."""
    listener = SyslogListener(tmp_path / "arr")
    try:
        server = bastion_factory(settings={"BASTION_AUDIT_FORWARD": f"tls://localhost:{listener.port}",
                                           "BASTION_AUDIT_FORWARD_CA": str(listener.cert),
                                           "BASTION_AUDIT_FORWARD_INTERVAL": "0.5"})
        with httpx.Client(base_url=server.url(""), timeout=30) as http:
            r = http.get("/dicom-web/studies", params={"PatientID": "FORWARDED"},
                         headers={"Accept": "application/dicom+json"})
            assert r.status_code in (200, 204)
        _wait_for(lambda: [{}] if any("PatientID=FORWARDED" in m for m in listener.messages) else [], bool)
        server.stop()
        _wait_for(lambda: [{}] if any("110121" in m for m in listener.messages) else [], bool)
    finally:
        listener.close()
    seqs = [int(m.split(" ")[4]) for m in listener.messages]
    assert seqs == list(range(1, len(seqs) + 1))  # each once, in order
    query = next(m for m in listener.messages if "PatientID=FORWARDED" in m)
    root = ET.fromstring(query.split(" - \ufeff", 1)[1])
    event_id = root.find("EventIdentification/EventID")
    assert event_id is not None and event_id.get("csd-code") == "110112"
    assert "110121" in listener.messages[-1]  # the stop, sent after the last flush


def test_an_import_is_audited_once_per_study(tmp_path: Path) -> None:
    """``bastion import`` of two studies: one store event per study, by the OS user, with its count; a refused
    file makes its event a failure naming the reason."""
    first, second = make_study(tmp_path / "in" / "a", series=2, per_series=2), make_study(tmp_path / "in" / "b",
                                                                                          series=1, per_series=3)
    (tmp_path / "in" / "junk.dcm").write_bytes(b"not dicom at all" * 20)
    data = tmp_path / "data"
    proc = run_bastion("import", "--data", data, tmp_path / "in")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the junk file was rejected
    entries = [json.loads(x) for f in sorted((data / "audit").glob("audit-*.jsonl")) for x in f.read_text().splitlines()]
    stores = {tuple(e.get("studies", [])): e for e in entries if e["kind"] == "store"}
    assert set(stores) == {(first.study_uid,), (second.study_uid,), ()}
    assert stores[(first.study_uid,)]["count"] == 4 and stores[(second.study_uid,)]["count"] == 3
    assert stores[(first.study_uid,)]["patient_id"] == first.patient_id and stores[(first.study_uid,)]["via"] == "cli"
    refused = stores[()]
    assert refused["outcome"] == 8 and refused.get("count", 0) == 0 and "refused" in refused["detail"]
    assert run_bastion("audit", "verify", "--data", data).returncode == 0


def test_a_stow_body_cut_short_audits_the_parts_it_stored(tmp_path: Path,
                                                          bastion_factory: Callable[..., BastionServer]) -> None:
    server = bastion_factory()
    study = make_study(tmp_path / "s", series=1, per_series=2)
    first, second = (f.read_bytes() for f in study.files)
    body = (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + first
            + f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + second[:500])  # no end
    with httpx.Client(base_url=server.url(""), timeout=30) as http:
        r = http.post("/dicom-web/studies", content=body, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'})
        assert r.status_code == 400, r.text
        found = _wait_for(lambda: list(http.get("/api/audit", params={"kind": "store"}).json()["entries"]), bool)
    (stored,) = found
    assert stored["studies"] == [study.study_uid] and stored["count"] == 1 and stored["via"] == "dicomweb"
