"""The reporting pages with ``[auth]`` on, in headless Chromium (``tests/browser/reporting_auth_check.mjs``) over a real
server and the test OpenID Connect issuer: a radiologist signs in at the issuer, claims, drafts, signs and amends,
and the claim, the author, the signer and every version are the token's user; a second radiologist (a pasted token)
sees the claim and cannot take it; a viewer (a pasted API key) reads the list and the report with nothing to change;
a typist (a pasted token) types a rejected recording and is told the list and the editor are not theirs; a page
without a credential, or with an expired one, says "Sign in"."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import BastionServer, browser_check_result, make_study, run_bastion, start_browser_check
from oidc_issuer import TestIssuer
from test_auth import AUDIENCE, auth_settings
from test_dictation_pages import dictate, spoken

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.timeout(420)]

READER = "dr.reader"
SECOND = "dr.second"
TYPIST = "sec.typist"
VIEWER_KEY = "ward-viewer"
TYPED = "Typed by the secretary with authentication on."


def _api(server: BastionServer, method: str, path: str, token: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, server.url(path), timeout=120, headers={"Authorization": f"Bearer {token}"},
                         **kwargs)


@pytest.mark.usefixtures("browser")
def test_the_pages_with_authentication_on(tmp_path: Path) -> None:
    from bastion.web.viewer import find_ohif_dir

    if find_ohif_dir("") is None:
        pytest.skip("the OHIF viewer is not installed (scripts/fetch-ohif.sh)")
    # The issuer's login (the code flow) signs in READER; radiologists read images with the viewer role too.
    issuer = TestIssuer(audience=AUDIENCE, user=READER, roles=("radiologist", "viewer")).start()
    server = BastionServer(tmp_path / "data", settings=auth_settings(issuer)).start()
    try:
        def token(user: str, *roles: str) -> str:
            return issuer.token(roles=list(roles), preferred_username=user, lifetime=1800)

        reader = token(READER, "radiologist", "viewer")
        study = make_study(tmp_path / "ct", series=1, per_series=2, modality="CT", patient_name="Authpage^Ada",
                           accession="ACC-AUTH-1")
        assert server.storescu(*study.files).returncode == 0
        # A rejected recording of another study's draft waits in the typing queue.
        dictated = make_study(tmp_path / "cr", series=1, per_series=1, modality="CR")
        assert server.storescu(*dictated.files).returncode == 0
        created = _api(server, "POST", "/api/reports", reader, json={"study": dictated.study_uid,
                                                                      "template": "chest-xray"})
        assert created.status_code == 201, created.text
        rid = created.json()["id"]
        audio = dictate(server, rid, spoken(tmp_path / "s.wav"), headers={"Authorization": f"Bearer {reader}"})
        rejected = _api(server, "POST", f"/api/reports/{rid}/audio/{audio['audio']}/reject", reader)
        assert rejected.status_code == 200, rejected.text
        key = run_bastion("apikey", "create", "--data", server.data, "--name", VIEWER_KEY, "--role", "viewer")
        assert key.returncode == 0, key.stderr
        now = int(time.time())
        expired = issuer.token(roles=["radiologist", "viewer"], preferred_username=SECOND, iat=now - 3600,
                               nbf=now - 3600, exp=now - 600)

        proc = start_browser_check(
            "reporting_auth_check.mjs", "--base", server.url(""), "--issuer", issuer.url, "--reader", READER,
            "--study", study.study_uid, "--second", token(SECOND, "radiologist", "viewer"), "--second-user", SECOND,
            "--viewer-key", key.stdout.strip(), "--viewer-user", VIEWER_KEY, "--typist", token(TYPIST, "typist"),
            "--typist-user", TYPIST, "--typing-report", rid, "--typed", TYPED, "--expired", expired,
            "--out", tmp_path / "out", "--timeout", "90000")
        result = browser_check_result(proc, timeout=400)
        assert result["exit_code"] == 0, result
        assert result["bClaimAnswer"]["status"] == 409 and READER in result["bClaimAnswer"]["error"]
        assert "expired" in result["expiredMessage"].lower(), result["expiredMessage"]
        assert "typist" in result["typistListMessage"] and "typist" in result["typistEditorMessage"]

        # What the server kept names the token's user, never a typed name.
        doc = _api(server, "GET", f"/api/reports/{result['reportId']}", reader).json()
        assert doc["state"] == "amended" and doc["author"] == READER and doc["signed_by"] == READER
        assert {h["user"] for h in doc["history"]} == {READER} and len(doc["sr"]) == 2
        assert doc["sections"]["impression"].startswith("Amended impression")
        entry = _api(server, "GET", "/api/reading-list", reader, params={"study": study.study_uid}).json()
        assert entry["studies"][0]["claim"]["user"] == READER
        typed = _api(server, "GET", f"/api/reports/{rid}", reader).json()
        recording = next(a for a in typed["audio"] if a["id"] == audio["audio"])
        assert recording["status"] == "typed" and recording["typed_by"] == TYPIST
        assert typed["sections"]["dictation"].endswith(TYPED)
    finally:
        server.stop()
        issuer.stop()
