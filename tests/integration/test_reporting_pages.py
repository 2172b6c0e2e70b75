"""The reporting pages in headless Chromium (``tests/browser/reporting_check.mjs``) over a real server, authentication
off: the reading list shows a stored CT study unreported; user A claims it and user B, in a second browser context,
sees the claim and is refused; A opens the study beside the OHIF viewer, drafts from ct-head with a pick-list button
and typing, saves, signs (the SR is in the study over QIDO-RS and in OHIF's study list), and amends with a reason.
Also the reading list's API: filters, claims (409 naming the holder, expiry, release), priority, bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from conftest import BastionServer, Study, browser_check_result, make_study, start_browser_check

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    # Claims expire at the database's clock: tests/contract/test_claims.py waits one out.
    started = BastionServer(tmp_path_factory.mktemp("pages") / "data",
                            settings={"BASTION_REPORT_CLAIM_MINUTES": "45"}).start()
    yield started
    started.stop()


def _store(server: BastionServer, tmp: Any, **kwargs: Any) -> Study:
    made = make_study(tmp, series=1, per_series=2, **kwargs)
    sent = server.storescu(*made.files)
    assert sent.returncode == 0, sent.stderr
    return made


def api(server: BastionServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, server.url(path), timeout=60, **kwargs)


def listed(server: BastionServer, **params: str) -> list[dict[str, Any]]:
    rsp = api(server, "GET", "/api/reading-list", params=params)
    assert rsp.status_code == 200, rsp.text
    studies: list[dict[str, Any]] = rsp.json()["studies"]
    return studies


@pytest.mark.usefixtures("browser")
def test_read_claim_draft_sign_and_amend_in_the_pages(server: BastionServer,
                                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    study = _store(server, tmp_path_factory.mktemp("ct"), modality="CT", patient_name="Pagecheck^Carol",
                   accession="ACC-PAGES-1")
    out = tmp_path_factory.mktemp("reporting-check")
    proc = start_browser_check("reporting_check.mjs", "--base", server.url(""), "--study", study.study_uid,
                               "--patient", "Pagecheck", "--out", out, "--timeout", "90000")
    result = browser_check_result(proc, timeout=220)
    assert result["exit_code"] == 0, f"{json.dumps(result)}\n{server.log()[-4000:]}"
    assert result["bClaimAnswer"]["status"] == 409 and "Dr A" in result["bClaimAnswer"]["error"]
    assert "final" in result["historyStates"] and "amended" in result["historyStates"]
    assert result["viewerLinksReadingList"] == "/reporting"  # the viewer's header links to the reading list
    doc = api(server, "GET", f"/api/reports/{result['reportId']}").json()
    assert doc["state"] == "amended" and len(doc["sr"]) == 2 and doc["signed_by"] == "Dr A"
    assert doc["sections"]["impression"].startswith("Amended impression")
    assert doc["reason"] == "Corrected the impression"
    sr = api(server, "GET", f"/dicom-web/studies/{study.study_uid}/instances", params={"Modality": "SR"}).json()
    assert sorted(i["00080018"]["Value"][0] for i in sr) == sorted(doc["sr"])
    entry = listed(server, study=study.study_uid)[0]
    assert entry["state"] == "amended" and entry["report"]["id"] == doc["id"]
    assert entry["claim"]["user"] == "Dr A"


def test_reading_list_filters_and_states(server: BastionServer, tmp_path_factory: pytest.TempPathFactory) -> None:
    ct = _store(server, tmp_path_factory.mktemp("a"), modality="CT", patient_name="Filter^Alice",
                accession="ACC-FILTER-A", study_date="20240105")
    mr = _store(server, tmp_path_factory.mktemp("b"), modality="MR", patient_name="Filter^Bob",
                accession="ACC-FILTER-B", study_date="20240210")
    both = [s["study"] for s in listed(server, q="filter^")]
    assert both == [mr.study_uid, ct.study_uid]  # newest study first
    assert [s["study"] for s in listed(server, q="ACC-FILTER-A")] == [ct.study_uid]
    assert [s["study"] for s in listed(server, q="filter", modality="MR")] == [mr.study_uid]
    assert [s["study"] for s in listed(server, q="filter", **{"from": "2024-02-01", "to": "20240229"})] == [mr.study_uid]
    entry = listed(server, study=ct.study_uid)[0]
    assert entry["state"] == "unreported" and entry["report"] is None and entry["claim"] is None
    assert entry["patient_name"] == "Filter^Alice" and entry["modalities"] == ["CT"] and entry["priority"] == "routine"

    made = api(server, "POST", "/api/reports", json={"study": ct.study_uid, "template": "ct-head"}).json()
    assert [s["study"] for s in listed(server, q="filter", state="draft")] == [ct.study_uid]
    assert [s["study"] for s in listed(server, q="filter", state="unreported")] == [mr.study_uid]
    assert listed(server, study=ct.study_uid)[0]["report"]["id"] == made["id"]

    assert api(server, "PUT", f"/api/reading-list/{mr.study_uid}/priority", json={"priority": "stat"}).status_code == 200
    assert [s["study"] for s in listed(server, priority="stat")] == [mr.study_uid]
    assert [s["study"] for s in listed(server, q="filter", priority="routine")] == [ct.study_uid]
    assert listed(server, study=mr.study_uid)[0]["priority"] == "stat"

    for bad in ({"state": "done"}, {"priority": "soon"}, {"from": "2024-13"}, {"limit": "501"}, {"study": "x"},
                {"modality": "ct'"}):
        rsp = api(server, "GET", "/api/reading-list", params=bad)
        assert rsp.status_code == 400 and rsp.json()["error"], bad
    assert api(server, "PUT", f"/api/reading-list/{mr.study_uid}/priority", json={"priority": "soon"}
               ).status_code == 400


def test_claims_are_exclusive_and_released(server: BastionServer, tmp_path_factory: pytest.TempPathFactory) -> None:
    study = _store(server, tmp_path_factory.mktemp("c"), modality="CT", patient_name="Claim^Dora")
    path = f"/api/reading-list/{study.study_uid}/claim"
    assert api(server, "POST", path, json={}).status_code == 400  # auth off: "user" is required
    assert api(server, "POST", "/api/reading-list/1.2.3.4.5.999/claim", json={"user": "a"}).status_code == 404
    before = datetime.now(UTC)
    taken = api(server, "POST", path, json={"user": "Dr A"})
    assert taken.status_code == 200 and taken.json()["claim"]["user"] == "Dr A"
    expires = datetime.fromisoformat(taken.json()["claim"]["expires"])
    assert timedelta(minutes=44) < expires - before < timedelta(minutes=46)  # report_claim_minutes = 45
    other = api(server, "POST", path, json={"user": "Dr B"})
    assert other.status_code == 409 and "Dr A" in other.json()["error"]
    assert api(server, "DELETE", path, params={"user": "Dr B"}).status_code == 409  # not B's to release
    assert api(server, "POST", path, json={"user": "Dr A"}).status_code == 200  # renewed by its holder
    assert listed(server, study=study.study_uid)[0]["claim"]["user"] == "Dr A"
    released = api(server, "DELETE", path, params={"user": "Dr A"})
    assert released.status_code == 200 and released.json()["released"] is True
    assert listed(server, study=study.study_uid)[0]["claim"] is None
    assert api(server, "POST", path, json={"user": "Dr B"}).json()["claim"]["user"] == "Dr B"
