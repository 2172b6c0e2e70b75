"""HTTP authentication and roles against a real server and a real (test) OpenID Connect issuer.

Every route group is called with no token, an expired token, a token for another audience, from another issuer,
with a bad signature, with the wrong role and with the right role; API keys are made, used and revoked with the
CLI; a break-glass token is accepted while the issuer is unreachable, and audited; the JWKS cached on disk
validates after a restart with the issuer down; failed authentications are rate-limited.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import backends
import httpx
import pytest
from conftest import BASTION, BastionServer, Study, free_port, make_study, run_bastion
from joserfc.jwk import RSAKey
from oidc_issuer import TestIssuer

AUDIENCE = "bastion"


def auth_settings(issuer: TestIssuer, **extra: str) -> dict[str, str]:
    return {"BASTION_AUTH_ENABLED": "true", "BASTION_AUTH_ISSUER": issuer.url, "BASTION_AUTH_AUDIENCE": AUDIENCE,
            "BASTION_AUTH_JWKS_URL": f"{issuer.url}/jwks", "BASTION_AUTH_CLIENT_ID": "bastion-viewer",
            "BASTION_AUTH_FAILURE_LIMIT": "1000", **extra}


def stow_body(study: Study) -> tuple[bytes, str]:
    boundary = "bastion-test-boundary"
    parts = b""
    for path in study.files:
        parts += (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    return parts + f"--{boundary}--\r\n".encode(), f'multipart/related; type="application/dicom"; boundary={boundary}'


def audit_entries(data: Path, deadline: float = 20.0, want: Callable[[list[dict[str, Any]]], bool] = bool,
                  ) -> list[dict[str, Any]]:
    """Every audit entry written under ``data`` (waiting, up to ``deadline`` s, until ``want`` holds)."""
    end = time.monotonic() + deadline
    while True:
        entries = []
        for path in sorted((data / "audit").glob("*.jsonl")):
            entries += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if want(entries) or time.monotonic() > end:
            return entries
        time.sleep(0.2)


@pytest.fixture(scope="module")
def issuer() -> Iterator[TestIssuer]:
    started = TestIssuer(audience=AUDIENCE).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, issuer: TestIssuer) -> Iterator[BastionServer]:
    started = BastionServer(tmp_path_factory.mktemp("auth") / "data", settings=auth_settings(issuer)).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, server: BastionServer, issuer: TestIssuer) -> Study:
    made = make_study(tmp_path_factory.mktemp("study"), series=1, per_series=2)
    body, ctype = stow_body(made)
    rsp = httpx.post(server.url("/dicom-web/studies"), content=body, timeout=30,
                     headers={"Content-Type": ctype, "Authorization": f"Bearer {issuer.token(roles=['uploader'])}"})
    assert rsp.status_code == 200, rsp.text
    return made


def routes_of(study: Study) -> dict[str, tuple[str, str, str]]:
    """Each route group: (method, path, the role it needs)."""
    st = study.study_uid
    se = next(iter(study.series))
    sop = f"{se}.1"
    return {
        "qido": ("GET", "/dicom-web/studies?PatientID=" + study.patient_id, "viewer"),
        "wado-rs": ("GET", f"/dicom-web/studies/{st}/series/{se}/instances/{sop}", "viewer"),
        "metadata": ("GET", f"/dicom-web/studies/{st}/metadata", "viewer"),
        "rendered": ("GET", f"/dicom-web/studies/{st}/series/{se}/instances/{sop}/rendered", "viewer"),
        "wado-uri": ("GET", f"/wado?requestType=WADO&studyUID={st}&seriesUID={se}&objectUID={sop}", "viewer"),
        "stow": ("POST", "/dicom-web/studies", "uploader"),
        "api": ("GET", "/api/statistics", "admin"),
        "api-emergency": ("GET", "/api/emergency", "admin"),
        "admin": ("GET", "/admin/anything", "admin"),
    }


def call(server: BastionServer, study: Study, method: str, path: str, token: str | None,
         header: str = "Authorization") -> httpx.Response:
    headers: dict[str, str] = {}
    if token is not None:
        headers[header] = f"Bearer {token}" if header == "Authorization" else token
    content = None
    if method == "POST":
        content, headers["Content-Type"] = stow_body(study)
    return httpx.request(method, server.url(path), headers=headers, content=content, timeout=30)


def wrong_role(role: str) -> str:
    return {"viewer": "uploader", "uploader": "viewer", "admin": "viewer"}[role]


GROUPS = ["qido", "wado-rs", "metadata", "rendered", "wado-uri", "stow", "api", "api-emergency", "admin"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_route_group_checks_its_credentials(server: BastionServer, issuer: TestIssuer, study: Study,
                                                  group: str) -> None:
    method, path, role = routes_of(study)[group]
    other_key = RSAKey.generate_key(2048, auto_kid=True)
    forged = RSAKey.import_key(other_key.as_dict(private=True) | {"kid": issuer.key.kid})
    refused = {
        "no token": None,
        "expired": issuer.token(roles=[role], iat=int(time.time()) - 3600, nbf=int(time.time()) - 3600,
                                exp=int(time.time()) - 600),
        "other audience": issuer.token(roles=[role], aud="another-app"),
        "wrong issuer": issuer.token(roles=[role], iss="http://127.0.0.1:1/evil"),
        "bad signature": issuer.token(roles=[role], key=forged),
    }
    for case, token in refused.items():
        rsp = call(server, study, method, path, token)
        assert rsp.status_code == 401, (case, rsp.status_code, rsp.text)
        assert rsp.headers["www-authenticate"].startswith("Bearer"), case
        assert "error" in rsp.json(), case
    rsp = call(server, study, method, path, issuer.token(roles=[wrong_role(role)]))
    assert rsp.status_code == 403, ("wrong role", rsp.status_code, rsp.text)
    assert role in rsp.json()["error"]
    rsp = call(server, study, method, path, issuer.token(roles=["none-of-ours"]))
    assert rsp.status_code == 403, ("no Bastion role", rsp.status_code)
    for good in (role, "admin"):
        rsp = call(server, study, method, path, issuer.token(roles=[good]))
        # /admin/anything has no page: past the access check, the router answers 404.
        assert rsp.status_code == (404 if group == "admin" else 200), (good, rsp.status_code, rsp.text[:300])


def test_public_routes_and_default_deny(server: BastionServer, issuer: TestIssuer) -> None:
    assert httpx.get(server.url("/health"), timeout=10).status_code == 200
    shell = httpx.get(server.url("/admin"), timeout=10)
    assert shell.status_code == 200 and "<html" in shell.text
    config = httpx.get(server.url("/api/auth/config"), timeout=10).json()
    assert config == {"enabled": True, "issuer": issuer.url, "client_id": "bastion-viewer", "scope": "openid profile"}
    app_config = httpx.get(server.url("/app-config.js"), timeout=10).text
    assert f'"authority": "{issuer.url}"' in app_config and '"response_type": "code"' in app_config
    admin = issuer.token(roles=["admin"])
    # Methods and paths no rule allows are refused even to an admin.
    assert httpx.put(server.url("/dicom-web/studies"), headers={"Authorization": f"Bearer {admin}"},
                     timeout=10).status_code == 403
    assert httpx.post(server.url("/health"), timeout=10).status_code in (401, 403)
    assert httpx.get(server.url("/wado/other"), timeout=10).status_code == 401
    who = httpx.get(server.url("/api/whoami"), headers={"Authorization": f"Bearer {issuer.token()}"}, timeout=10)
    assert who.json()["user"] == "dr.who" and who.json()["roles"] == ["viewer"] and who.json()["via"] == "oidc"


def test_nested_role_claim_and_both_roles(tmp_path: Path, issuer: TestIssuer) -> None:
    server = BastionServer(tmp_path / "data", settings=auth_settings(
        issuer, BASTION_AUTH_ROLE_CLAIM="realm_access.roles")).start()
    try:
        token = issuer.token(roles=None, realm_access={"roles": ["viewer", "uploader", "offline_access"]})
        who = httpx.get(server.url("/api/whoami"), headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
        assert who["roles"] == ["uploader", "viewer"]
        assert httpx.get(server.url("/dicom-web/studies"), headers={"Authorization": f"Bearer {token}"},
                         timeout=10).status_code in (200, 204)
        flat = issuer.token(roles=["admin"])  # the role is not where this server looks
        assert httpx.get(server.url("/api/statistics"), headers={"Authorization": f"Bearer {flat}"},
                         timeout=10).status_code == 403
    finally:
        server.stop()


def _b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def test_algorithm_confusion_and_none_are_refused(server: BastionServer, issuer: TestIssuer) -> None:
    claims = {"iss": issuer.url, "aud": AUDIENCE, "sub": "x", "roles": ["admin"], "exp": int(time.time()) + 300}
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."
    # HS256 keyed with the issuer's public key, the classic confusion attack.
    # (joserfc refuses to make it, so the attacker's token is made by hand.)
    signing_input = f"{_b64({'alg': 'HS256', 'kid': issuer.key.kid, 'typ': 'JWT'})}.{_b64(claims)}"
    mac = hmac.new(issuer.key.as_pem(private=False), signing_input.encode(), hashlib.sha256).digest()
    hs = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    for token in (unsigned, hs, "not-a-jwt", "a.b.c"):
        rsp = httpx.get(server.url("/api/statistics"), headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert rsp.status_code == 401, (token[:20], rsp.text)


def test_audit_records_failures_and_the_first_success_only(server: BastionServer, issuer: TestIssuer) -> None:
    token = issuer.token(roles=["viewer"], preferred_username="audit.me")
    for _ in range(5):
        assert httpx.get(server.url("/dicom-web/studies"), headers={"Authorization": f"Bearer {token}"},
                         timeout=10).status_code in (200, 204)
    bad = issuer.token(roles=["viewer"], preferred_username="audit.bad", aud="elsewhere")
    assert httpx.get(server.url("/dicom-web/studies"), headers={"Authorization": f"Bearer {bad}"},
                     timeout=10).status_code == 401

    def seen(entries: list[dict[str, Any]]) -> bool:
        return any(e.get("kind") == "login" and e.get("outcome") == 8 and "another audience" in e.get("detail", "")
                   for e in entries) and any(e.get("user") == "audit.me" for e in entries)

    entries = audit_entries(server.data, want=seen)
    mine = [e for e in entries if e.get("kind") == "login" and e.get("user") == "audit.me"]
    assert len(mine) == 1 and mine[0]["outcome"] == 0 and mine[0]["address"] == "127.0.0.1", mine
    assert any(e.get("kind") == "login" and e.get("outcome") == 8 and "another audience" in e.get("detail", "")
               for e in entries)


def test_api_keys_create_use_revoke(server: BastionServer, study: Study) -> None:
    made = run_bastion("apikey", "create", "--data", server.data, "--name", "modality-1", "--role", "uploader")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("bst_") and len(key) > 40
    assert key not in (server.data / "auth" / "apikeys.json").read_text()
    listed = run_bastion("apikey", "list", "--data", server.data)
    assert "modality-1" in listed.stdout and "uploader" in listed.stdout and key not in listed.stdout
    method, path, _ = routes_of(study)["stow"]
    deadline = time.monotonic() + 20
    while (rsp := call(server, study, method, path, key)).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)  # the server reads the key file again within a second
    assert rsp.status_code == 200, rsp.text
    assert call(server, study, method, path, key, header="X-API-Key").status_code == 200
    assert call(server, study, "GET", "/dicom-web/studies", key).status_code == 403  # an uploader may not read
    revoked = run_bastion("apikey", "revoke", "--data", server.data, "modality-1")
    assert revoked.returncode == 0, revoked.stderr
    deadline = time.monotonic() + 20
    while (rsp := call(server, study, method, path, key)).status_code != 401 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rsp.status_code == 401
    assert run_bastion("apikey", "revoke", "--data", server.data, "modality-1").returncode != 0
    entries = audit_entries(server.data, want=lambda es: any("revoked" in e.get("detail", "") for e in es))
    assert any(e.get("kind") == "config" and "modality-1" in e.get("detail", "") for e in entries)


def test_key_rotation_refetches_the_jwks(tmp_path: Path) -> None:
    issuer = TestIssuer(audience=AUDIENCE).start()
    server = BastionServer(tmp_path / "data", settings=auth_settings(issuer)).start()
    try:
        assert httpx.get(server.url("/api/whoami"), headers={"Authorization": f"Bearer {issuer.token()}"},
                         timeout=10).status_code == 200
        fetched = issuer.jwks_requests
        issuer.rotate()
        token = issuer.token()
        deadline = time.monotonic() + 60  # an unknown kid refetches at most every 10 s
        while (rsp := httpx.get(server.url("/api/whoami"), headers={"Authorization": f"Bearer {token}"},
                                timeout=10)).status_code != 200 and time.monotonic() < deadline:
            time.sleep(1)
        assert rsp.status_code == 200, rsp.text
        assert issuer.jwks_requests > fetched
        # Forged key ids do not make the server hammer the issuer.
        before = issuer.jwks_requests
        for i in range(20):
            forged = RSAKey.import_key(RSAKey.generate_key(2048).as_dict(private=True) | {"kid": f"forged-{i}"})
            httpx.get(server.url("/api/whoami"), headers={"Authorization": f"Bearer {issuer.token(key=forged)}"},
                      timeout=10)
        assert issuer.jwks_requests - before <= 2
    finally:
        server.stop()
        issuer.stop()


def test_jwks_cache_survives_a_restart_with_the_issuer_down(tmp_path: Path) -> None:
    issuer = TestIssuer(audience=AUDIENCE).start()
    data = tmp_path / "data"
    settings = auth_settings(issuer)
    server = BastionServer(data, settings=settings).start()
    try:
        first = issuer.token(roles=["viewer"])
        assert httpx.get(server.url("/dicom-web/studies"), headers={"Authorization": f"Bearer {first}"},
                         timeout=10).status_code in (200, 204)
        assert (data / "auth" / "jwks.json").exists()
    finally:
        server.stop()
    later = issuer.token(roles=["viewer"])  # signed before it goes down, never seen by the server
    issuer.stop()
    server = BastionServer(data, settings=settings).start()
    try:
        rsp = httpx.get(server.url("/dicom-web/studies"), headers={"Authorization": f"Bearer {later}"}, timeout=30)
        assert rsp.status_code in (200, 204), rsp.text
    finally:
        server.stop()


def test_break_glass_with_the_issuer_unreachable(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    data = tmp_path / "data"
    settings = {"BASTION_AUTH_ENABLED": "true", "BASTION_AUTH_ISSUER": closed, "BASTION_AUTH_AUDIENCE": AUDIENCE,
                "BASTION_AUTH_JWKS_URL": f"{closed}/jwks", "BASTION_AUTH_FAILURE_LIMIT": "1000"}
    server = BastionServer(data, settings=settings).start()
    try:
        too_long = run_bastion("emergency-token", "--data", data, "--role", "viewer", "--hours", "48",
                               "--reason", "test")
        assert too_long.returncode != 0 and "at most 24" in too_long.stderr
        minted = run_bastion("emergency-token", "--data", data, "--role", "viewer", "--hours", "2", "--reason",
                             "identity provider down, stroke case", "--user", "dr.night")
        assert minted.returncode == 0, minted.stderr
        token = minted.stdout.strip()
        assert oct((data / "auth" / "emergency-key.jwk").stat().st_mode)[-3:] == "600"
        for _ in range(3):
            rsp = httpx.get(server.url("/dicom-web/studies"), headers={"Authorization": f"Bearer {token}"},
                            timeout=30)
            assert rsp.status_code in (200, 204), rsp.text
        assert httpx.get(server.url("/api/statistics"), headers={"Authorization": f"Bearer {token}"},
                         timeout=30).status_code == 403  # a viewer override is not an admin
        # An OIDC-looking token cannot be checked with the issuer down and no keys cached: refused.
        fake = TestIssuer(audience=AUDIENCE)
        assert httpx.get(server.url("/dicom-web/studies"), timeout=30, headers={
            "Authorization": f"Bearer {fake.token(iss=closed)}"}).status_code == 401
        who = httpx.get(server.url("/api/whoami"), headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
        assert who["emergency"] is True and who["user"] == "dr.night" and who["via"] == "emergency"
        # A token signed by another archive's key is refused.
        other = tmp_path / "other"
        assert run_bastion("emergency-token", "--data", other, "--role", "admin", "--hours", "1", "--reason",
                           "x").returncode == 0
        foreign = run_bastion("emergency-token", "--data", other, "--role", "admin", "--hours", "1", "--reason",
                              "x").stdout.strip()
        assert httpx.get(server.url("/api/emergency"), headers={"Authorization": f"Bearer {foreign}"},
                         timeout=10).status_code == 401
        admin = run_bastion("apikey", "create", "--data", data, "--name", "reviewer", "--role", "admin").stdout.strip()
        deadline = time.monotonic() + 20
        while (rsp := httpx.get(server.url("/api/emergency"), headers={"X-API-Key": admin},
                                timeout=10)).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        listing = rsp.json()
        assert listing["active"] == 1
        row = listing["overrides"][0]
        assert row["user"] == "dr.night" and row["role"] == "viewer" and row["uses"] == 5
        assert row["reason"] == "identity provider down, stroke case" and row["last_address"] == "127.0.0.1"

        def audited(entries: list[dict[str, Any]]) -> bool:
            return len([e for e in entries if e.get("kind") == "emergency" and e.get("via") != "cli"]) >= 5

        entries = audit_entries(data, want=audited)
        uses = [e for e in entries if e.get("kind") == "emergency" and e.get("via") != "cli"]
        assert len(uses) == 5 and all(e.get("emergency") and e.get("user") == "dr.night" for e in uses)
        assert any(e.get("kind") == "emergency" and e.get("via") == "cli" and "minted" in e.get("detail", "")
                   for e in entries)
        # Revoked, it is refused at its next use (the server looks at the ledger on each use).
        revoked = run_bastion("emergency-token", "--data", data, "--revoke", row["jti"])
        assert revoked.returncode == 0, revoked.stderr
        rsp = httpx.get(server.url("/dicom-web/studies"), headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert rsp.status_code == 401 and "revoked" in rsp.json()["error"]
        assert run_bastion("emergency-token", "--data", data, "--revoke", row["jti"]).returncode != 0
        listing = httpx.get(server.url("/api/emergency"), headers={"X-API-Key": admin}, timeout=10).json()
        assert listing["active"] == 0 and listing["overrides"][0]["revoked"] is not None
    finally:
        server.stop()


def test_failed_authentications_are_rate_limited(tmp_path: Path, issuer: TestIssuer) -> None:
    server = BastionServer(tmp_path / "data", settings=auth_settings(issuer, BASTION_AUTH_FAILURE_LIMIT="3")).start()
    try:
        good = issuer.token()
        assert httpx.get(server.url("/api/whoami"), headers={"Authorization": f"Bearer {good}"},
                         timeout=10).status_code == 200
        bad = {"Authorization": "Bearer bst_not-a-key"}
        assert [httpx.get(server.url("/api/whoami"), headers=bad, timeout=10).status_code
                for _ in range(3)] == [401, 401, 401]
        limited = httpx.get(server.url("/api/whoami"), headers=bad, timeout=10)
        assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 60
        assert "error" in limited.json()
        # A token seen before still works; a new one waits with the rest of this address.
        assert httpx.get(server.url("/api/whoami"), headers={"Authorization": f"Bearer {good}"},
                         timeout=10).status_code == 200
        assert httpx.get(server.url("/api/whoami"), headers={"Authorization": f"Bearer {issuer.token()}"},
                         timeout=10).status_code == 429
        assert httpx.get(server.url("/health"), timeout=10).status_code == 200
    finally:
        server.stop()


def test_enabled_without_issuer_is_one_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "bastion.toml"
    config.write_text("[auth]\nenabled = true\n")
    result = run_bastion("serve", "--config", config, "--data", tmp_path / "data", "--http-port", str(free_port()),
                         "--dicom-port", str(free_port()), timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "auth_issuer" in lines[0] and "auth_jwks_url" in lines[0], result.stderr


@pytest.mark.usefixtures("browser")
@pytest.mark.timeout(300)
def test_viewer_and_admin_page_log_in_at_the_issuer(tmp_path: Path) -> None:
    """The bundled OHIF viewer and the admin page log in at the test issuer in headless Chromium (authorization
    code + PKCE), then the viewer lists and opens a study with the bearer token on every DICOMweb request, and the
    admin page shows the break-glass overrides."""
    from conftest import browser_check_result, start_browser_check

    from bastion.web.viewer import find_ohif_dir

    if find_ohif_dir("") is None:
        pytest.skip("the OHIF viewer is not installed (scripts/fetch-ohif.sh)")
    issuer = TestIssuer(audience=AUDIENCE, user="dr.browser", roles=("viewer",)).start()
    data = tmp_path / "data"
    server = BastionServer(data, settings=auth_settings(issuer)).start()
    try:
        made = make_study(tmp_path / "study", series=1, per_series=2, patient_name="Login^Browser")
        body, ctype = stow_body(made)
        assert httpx.post(server.url("/dicom-web/studies"), content=body, timeout=30, headers={
            "Content-Type": ctype, "Authorization": f"Bearer {issuer.token(roles=['uploader'])}"}).status_code == 200
        viewer = browser_check_result(start_browser_check(
            "auth_check.mjs", "--step", "viewer", "--base", server.url(""), "--issuer", issuer.url, "--study",
            made.study_uid, "--patient", "Login", "--out", tmp_path / "viewer", "--timeout", "120000"), timeout=180)
        assert viewer["exit_code"] == 0, viewer
        token = run_bastion("emergency-token", "--data", data, "--role", "viewer", "--hours", "1", "--reason",
                            "browser check", "--user", "dr.glass").stdout.strip()
        assert httpx.get(server.url("/dicom-web/studies"), headers={"Authorization": f"Bearer {token}"},
                         timeout=10).status_code == 200
        issuer.roles = ("admin",)
        admin = browser_check_result(start_browser_check(
            "auth_check.mjs", "--step", "admin", "--base", server.url(""), "--issuer", issuer.url, "--user",
            "dr.browser", "--emergency-user", "dr.glass", "--out", tmp_path / "admin", "--timeout", "90000"),
            timeout=150)
        assert admin["exit_code"] == 0, admin
        assert "browser check" in admin["emergencyRow"]
        key = run_bastion("apikey", "create", "--data", data, "--name", "desk", "--role", "admin").stdout.strip()
        pasted = browser_check_result(start_browser_check(
            "auth_check.mjs", "--step", "admin", "--base", server.url(""), "--issuer", issuer.url, "--user", "desk",
            "--credential", key, "--out", tmp_path / "pasted", "--timeout", "90000"), timeout=150)
        assert pasted["exit_code"] == 0, pasted
        assert "apikey" in pasted["who"]
    finally:
        server.stop()
        issuer.stop()


def test_index_rebuild_asks_the_server_with_a_node_local_token(tmp_path: Path) -> None:
    key = RSAKey.generate_key(2048, auto_kid=True)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    env = {"BASTION_AUTH_ENABLED": "true", "BASTION_AUTH_ISSUER": "https://idp.invalid",
           "BASTION_AUTH_AUDIENCE": AUDIENCE, "BASTION_AUTH_JWKS_FILE": str(jwks)}
    data = tmp_path / "data"
    server = BastionServer(data, settings=env).start()
    try:
        assert httpx.post(server.url("/api/index/rebuild"), timeout=10).status_code == 401
        result = subprocess.run([BASTION, "index", "rebuild", "--data", str(data)], capture_output=True, text=True,
                                timeout=300, env=os.environ | env | {"BASTION_HTTP_PORT": str(server.http_port)})
        if backends.REMOTE:  # the server took the token, then refused: the online rebuild is SQLite's only (409)
            assert result.returncode == 2 and "for a SQLite index only" in result.stderr, result.stderr[-2000:]
        else:
            assert result.returncode == 0, result.stderr[-2000:]
            assert "rebuilds its index while it serves" in result.stderr
        assert oct((data / "auth" / "local-key.jwk").stat().st_mode)[-3:] == "600"
        entries = audit_entries(data, want=lambda es: any(str(e.get("user", "")).endswith("(local)") for e in es))
        assert any(e.get("kind") == "login" and str(e.get("user", "")).endswith("(local)") and e.get("outcome") == 0
                   for e in entries)
    finally:
        server.stop()


def test_forwarding_to_an_authenticated_bastion_sends_its_api_key(tmp_path: Path) -> None:
    """A [[forward]] STOW-RS rule with api_key delivers to a Bastion with [auth] on; one without is refused 401."""
    key = RSAKey.generate_key(2048, auto_kid=True)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    central_data = tmp_path / "central"
    uploader = run_bastion("apikey", "create", "--data", central_data, "--name", "edge-1", "--role", "uploader")
    reader = run_bastion("apikey", "create", "--data", central_data, "--name", "reader", "--role", "admin")
    assert uploader.returncode == 0 and reader.returncode == 0, uploader.stderr + reader.stderr
    central = BastionServer(central_data, settings={
        "BASTION_AUTH_ENABLED": "true", "BASTION_AUTH_ISSUER": "https://idp.invalid",
        "BASTION_AUTH_AUDIENCE": AUDIENCE, "BASTION_AUTH_JWKS_FILE": str(jwks)}).start()
    config = tmp_path / "edge.toml"
    target = central.url("/dicom-web")
    config.write_text(f'[[forward]]\nname = "with-key"\nto = "{target}"\napi_key = "{uploader.stdout.strip()}"\n\n'
                      f'[[forward]]\nname = "without-key"\nto = "{target}"\n')
    edge = BastionServer(tmp_path / "edge", settings={"BASTION_CONFIG": str(config),
                                                       "BASTION_FORWARD_BACKOFF": "60"}).start()
    try:
        made = make_study(tmp_path / "study", series=1, per_series=2)
        body, ctype = stow_body(made)
        assert httpx.post(edge.url("/dicom-web/studies"), content=body, headers={"Content-Type": ctype},
                          timeout=30).status_code == 200
        admin = {"X-API-Key": reader.stdout.strip()}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = httpx.get(central.url(f"/dicom-web/studies?StudyInstanceUID={made.study_uid}"), headers=admin,
                              timeout=10)
            queues = {q["name"]: q for q in edge.get_json("/api/queues")["queues"]}
            if found.status_code == 200 and queues.get("without-key", {}).get("last_error"):
                break
            time.sleep(0.5)
        assert found.status_code == 200 and len(found.json()) == 1, found.text
        assert queues["with-key"]["delivered"] == 2
        assert "401" in queues["without-key"]["last_error"]
        assert uploader.stdout.strip() not in json.dumps(edge.get_json("/api/queues"))
    finally:
        edge.stop()
        central.stop()
