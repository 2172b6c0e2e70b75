"""An adversary on the network against a real server with ``[auth]`` on: each test is one class of probe, and
asserts the safe behaviour so that a regression fails.

Requests are sent over raw sockets where an HTTP client would tidy the request (``//``, ``/./``, ``%2F``, lower
case methods); tokens come from the test OpenID Connect issuer (:mod:`oidc_issuer`) and the ``bastion`` CLI.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from conftest import BastionServer, Study, free_port, make_study, requires_dcmtk, run_bastion, run_dcmtk
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey
from oidc_issuer import TestIssuer
from test_auth import AUDIENCE, audit_entries, auth_settings, stow_body
from test_dimse_access import echo, not_authorized, raw_associate

from bastion.auth.emergency import EMERGENCY_ISSUER
from bastion.auth.local import local_token


def raw(server: BastionServer, request_line: str, headers: dict[str, str] | None = None,
        body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send one HTTP/1.1 request exactly as written; (status, headers, body) of the answer."""
    head = f"{request_line}\r\nHost: 127.0.0.1:{server.http_port}\r\nConnection: close\r\n"
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, fields, payload


@pytest.fixture(scope="module")
def issuer() -> Iterator[TestIssuer]:
    started = TestIssuer(audience=AUDIENCE).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, issuer: TestIssuer) -> Iterator[BastionServer]:
    started = BastionServer(tmp_path_factory.mktemp("probes") / "data",
                            settings=auth_settings(issuer, BASTION_AUTH_EMERGENCY_MAX_HOURS="1")).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, server: BastionServer, issuer: TestIssuer) -> Study:
    made = make_study(tmp_path_factory.mktemp("study"), series=1, per_series=2, patient_id="PROBE-PID-7731")
    body, ctype = stow_body(made)
    rsp = httpx.post(server.url("/dicom-web/studies"), content=body, timeout=30,
                     headers={"Content-Type": ctype, "Authorization": f"Bearer {issuer.token(roles=['uploader'])}"})
    assert rsp.status_code == 200, rsp.text
    return made


def leaks(payload: bytes, study: Study) -> bool:
    return study.study_uid.encode() in payload or study.patient_id.encode() in payload


#: Spellings the access table sees as outside /api, /dicom-web and /wado (the router does too: the viewer's shell).
PUBLIC_TRICKS = ("/DICOM-WEB/studies", "/Dicom-Web/studies", "/WADO?requestType=WADO", "/API/audit")


def test_path_tricks_reach_no_data_and_no_admin_route(server: BastionServer, study: Study,
                                                      issuer: TestIssuer) -> None:
    st = study.study_uid
    paths = [
        "//dicom-web/studies", "/dicom-web/./studies", "/dicom-web/../dicom-web/studies", "/DICOM-WEB/studies",
        "/Dicom-Web/studies", "/dicom-web%2Fstudies", "/dicom-web/studies%2F", "/dicom-web/studies/",
        "/%64icom-web/studies", f"/dicom-web/studies/{st}/metadata", f"//dicom-web/studies/{st}/metadata",
        f"/dicom-web//studies/{st}/metadata", f"/dicom-web/studies/{st}/metadata?x=/../../api",
        "/wado?requestType=WADO", "/WADO?requestType=WADO", "/wado/", "//wado?requestType=WADO",
        "/api/../api/audit", "/api/./audit", "//api/audit", "/API/audit", "/api/", "/api", "/api%2Faudit",
        "/api/audit/", "/api/audit;x=1", "/admin/../api/audit", "/health/../api/audit", "/health/",
        "/app-config.js/../api/audit", "/api/openapi.json/../audit", "/api/auth/config/../../api/audit",
        "/dicom-web/studies?PatientID=" + study.patient_id, "/" + "a/" * 3000 + "../" * 3000 + "api/audit",
        "/api/deleted", "/api/emergency", "/api/statistics", "/api/changes",
        f"/api/studies/{st}/digests", "/admin/x", "/admin/",
    ]
    viewer = {"Authorization": f"Bearer {issuer.token(roles=['viewer'])}"}
    # A viewer's token on a path that starts like DICOMweb but leads elsewhere reaches nothing else.
    for path in ("/dicom-web/../api/audit", "/dicom-web/%2E%2E/api/audit", "/dicom-web/studies/../../api/emergency",
                 "/dicom-web/../admin/x", "/dicom-web/..%2Fapi%2Faudit"):
        status, _, payload = raw(server, f"GET {path} HTTP/1.1", viewer)
        assert status in (403, 404), (path, status, payload[:200])
        assert b"entries" not in payload and b"overrides" not in payload, path
    uploader = {"Authorization": f"Bearer {issuer.token(roles=['uploader'])}"}
    for path in ("/dicom-web/studies/..", "/dicom-web/studies/%2E%2E", "/dicom-web/studies/..%2F..%2Fapi"):
        status, _, payload = raw(server, f"POST {path} HTTP/1.1", uploader | {"Content-Type": "application/dicom"},
                                 b"x")
        assert status in (400, 403, 404, 409, 415), (path, status, payload[:200])
    for path in paths:
        status, fields, payload = raw(server, f"GET {path} HTTP/1.1")
        assert status < 500, (path, status)
        assert not leaks(payload, study), (path, status, payload[:200])
        if status == 200:  # only the viewer's shell or a public document may answer
            assert fields.get("content-type", "").startswith(("text/html", "application/javascript",
                                                              "application/json")), (path, fields)
            assert b"audit" not in payload.lower() or b"<html" in payload.lower(), (path, payload[:200])
        if path.lower().startswith(("/api", "/dicom-web/", "/wado")) and path not in PUBLIC_TRICKS:
            # Exactly the protected prefix: the access check answers before any route.
            assert status in (401, 403), (path, status)
        elif status == 200:  # another spelling falls to the viewer's single-page-app shell, data-free
            assert fields.get("content-type", "").startswith("text/html"), (path, fields)


def test_method_tricks_are_refused(server: BastionServer, study: Study, issuer: TestIssuer) -> None:
    st = study.study_uid
    viewer = {"Authorization": f"Bearer {issuer.token(roles=['viewer'])}"}
    uploader = {"Authorization": f"Bearer {issuer.token(roles=['uploader'])}"}
    for line, headers, body in [
        ("HEAD /api/audit HTTP/1.1", {}, b""),
        ("HEAD /api/emergency HTTP/1.1", {}, b""),
        ("OPTIONS /api/audit HTTP/1.1", {"Content-Type": "application/json"}, b'{"reason": "x"}'),
        ("OPTIONS /dicom-web/studies HTTP/1.1", {}, b"x" * 100),
        (f"OPTIONS /dicom-web/studies/{st} HTTP/1.1", {"Origin": "http://evil"}, b""),
        ("GET /api/audit HTTP/1.1", {"X-HTTP-Method-Override": "OPTIONS"}, b""),
        (f"POST /dicom-web/studies/{st} HTTP/1.1", {"X-HTTP-Method-Override": "DELETE", **uploader}, b""),
        (f"POST /dicom-web/studies/{st} HTTP/1.1", {"X-HTTP-Method-Override": "GET", **uploader}, b""),
        ("get /dicom-web/studies HTTP/1.1", {}, b""),
        ("Get /api/audit HTTP/1.1", {}, b""),
        (f"delete /dicom-web/studies/{st} HTTP/1.1", viewer, b""),
        (f"DELETE /dicom-web/studies/{st} HTTP/1.1", viewer, b""),
        (f"DELETE /dicom-web/studies/{st} HTTP/1.1", uploader, b""),
        (f"POST /api/studies/{st}/export HTTP/1.1", viewer, b""),
        (f"POST /api/studies/{st}/export HTTP/1.1", uploader, b""),
        (f"GET /dicom-web/studies/{st}/metadata HTTP/1.1", uploader, b""),
        ("TRACE /dicom-web/studies HTTP/1.1", viewer, b""),
        ("PUT /dicom-web/studies HTTP/1.1", uploader, b"x"),
        ("PATCH /api/audit HTTP/1.1", viewer, b"x"),
        ("CONNECT 127.0.0.1:22 HTTP/1.1", {}, b""),
    ]:
        status, _, payload = raw(server, line, headers, body)
        # (415: an override header is not honoured, the POST is a STOW-RS without a body.)
        assert status in (400, 401, 403, 405) or (status == 415 and "Override" in str(headers)), (line, status)
        assert study.patient_id.encode() not in payload, (line, payload[:200])
    # OPTIONS is public (a CORS preflight): no data route answers it with data.
    se = next(iter(study.series))
    for path in (f"/dicom-web/studies/{st}/metadata", f"/dicom-web/studies/{st}/series/{se}/instances/{se}.1",
                 f"/dicom-web/studies/{st}/series/{se}/instances/{se}.1/rendered",
                 f"/dicom-web/studies/{st}/series/{se}/instances/{se}.1/frames/1",
                 f"/wado?requestType=WADO&studyUID={st}&seriesUID={se}&objectUID={se}.1",
                 "/dicom-web/studies?PatientID=" + study.patient_id, "/api/audit"):
        status, _, payload = raw(server, f"OPTIONS {path} HTTP/1.1", {"Origin": "http://evil.example",
                                                                     "Access-Control-Request-Method": "GET"})
        assert status in (400, 401, 403, 405), (path, status)
        assert study.patient_id.encode() not in payload and b"DICM" not in payload, path
    # The study is still there for a viewer: nothing above deleted it.
    assert httpx.get(server.url(f"/dicom-web/studies/{st}/metadata"), headers=viewer, timeout=30).status_code == 200


def test_public_documents_hold_no_secret_and_no_data(server: BastionServer, study: Study, issuer: TestIssuer) -> None:
    data = server.data
    secrets_on_disk = [json.loads((data / "auth" / name).read_text()).get("d", "")
                       for name in ("emergency-key.jwk", "local-key.jwk") if (data / "auth" / name).exists()]
    for path in ("/app-config.js", "/api/openapi.json", "/api/auth/config", "/admin", "/health", "/",
                 "/viewer?StudyInstanceUIDs=" + study.study_uid):
        rsp = httpx.get(server.url(path), timeout=30)
        assert rsp.status_code == 200, (path, rsp.status_code)
        assert study.patient_id not in rsp.text, path
        low = rsp.text.lower()
        assert "client_secret" not in low and not re.search(r"bst_[A-Za-z0-9_-]{20}", rsp.text), path
        for secret in secrets_on_disk:
            assert secret not in rsp.text, path
    # The viewer's shell for a study's URL is the same shell as for any URL: nothing of the study is in it.
    shell = httpx.get(server.url("/viewer?StudyInstanceUIDs=" + study.study_uid), timeout=30)
    assert study.patient_id not in shell.text
    # The viewer's catch-all serves files of its own directory only.
    for path in ("//etc/passwd", "/..%2F..%2F..%2Fetc%2Fpasswd", "/%2Fetc%2Fpasswd", "/static/../../../etc/passwd"):
        status, _, payload = raw(server, f"GET {path} HTTP/1.1")
        assert b"root:x:0:0" not in payload, path
        assert status in (200, 400, 404), (path, status)
    # Nothing under the data directory is reachable through the viewer.
    for path in ("/" + str(data / "auth" / "emergency-key.jwk"), "/" + str(data / "auth" / "apikeys.json")):
        status, _, payload = raw(server, f"GET /{path} HTTP/1.1")
        assert b'"d"' not in payload and b"sha256" not in payload, path


def _b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def test_token_tricks(server: BastionServer, issuer: TestIssuer, study: Study) -> None:
    def status_with(token: str) -> int:
        return httpx.get(server.url("/api/statistics"), headers={"Authorization": f"Bearer {token}"},
                         timeout=30).status_code

    now = int(time.time())
    assert status_with(issuer.token(roles=["admin"], aud=["other", AUDIENCE])) == 200  # RFC 7519 4.1.3
    assert status_with(issuer.token(roles=["admin"], aud=["other", "another"])) == 401
    assert status_with(issuer.token(roles=["admin"], aud=[])) == 401
    assert status_with(issuer.token(roles=["admin"], nbf=now + 3600)) == 401
    assert status_with(issuer.token(roles=["admin"], iat=now + 3600)) == 401
    assert status_with(issuer.token(roles=["admin"], exp=None)) == 401
    assert status_with(issuer.token(roles=["admin"], exp="9999999999")) == 401
    assert status_with(issuer.token(roles=["admin"], iss=None)) == 401
    assert status_with(issuer.token(roles="admin-ish")) == 403  # a string is not a list of roles: no role
    # A key id that is a path or an injection does not reach the JWKS cache file.
    cache = server.data / "auth" / "jwks.json"
    before = cache.read_bytes() if cache.exists() else b""
    for kid in ("../../../../etc/passwd", "../jwks", "x\"},{\"kty\":\"oct\",\"k\":\"AAAA", "\x00", "a" * 10000):
        forged = RSAKey.import_key(RSAKey.generate_key(2048).as_dict(private=True) | {"kid": kid})
        assert status_with(issuer.token(roles=["admin"], key=forged)) == 401, kid[:20]
    after = cache.read_bytes() if cache.exists() else b""
    assert b"passwd" not in after and (not before or json.loads(after) == json.loads(before))
    assert sorted(p.name for p in (server.data / "auth").iterdir() if "passwd" in p.name) == []
    # A symmetric key published in the issuer's JWKS is never used: anyone with the public set could forge HS256.
    oct_key = OctKey.generate_key(256, auto_kid=True)
    issuer.published.append(oct_key)  # type: ignore[arg-type]
    try:
        claims = {"iss": issuer.url, "aud": AUDIENCE, "sub": "x", "roles": ["admin"], "exp": now + 300, "iat": now}
        hs = jwt.encode({"alg": "HS256", "kid": oct_key.kid}, claims, oct_key, algorithms=["HS256"])
        assert status_with(hs) == 401
    finally:
        issuer.published.remove(oct_key)  # type: ignore[arg-type]
    # A huge token (about 1 MB) is refused cleanly and the server stays up.
    huge = f"{_b64({'alg': 'RS256', 'kid': 'x' * 700_000})}.{_b64({'iss': issuer.url})}.sig"
    try:
        rsp = httpx.get(server.url("/api/statistics"), headers={"Authorization": f"Bearer {huge}"}, timeout=30)
        assert rsp.status_code in (400, 401, 413, 431), rsp.status_code
    except httpx.HTTPError:
        pass  # the server may close a connection whose head is too large
    assert httpx.get(server.url("/health"), timeout=30).status_code == 200
    # API keys: a key-shaped guess, a prefix of nothing, and the SHA-256 of a key are all refused.
    key = run_bastion("apikey", "create", "--data", server.data, "--name", "probe", "--role", "admin").stdout.strip()
    for guess in ("bst_", "bst_" + "A" * 43, key[:-1], key + "x", key.upper(), hashlib.sha256(key.encode()).hexdigest()):
        assert status_with(guess) == 401, guess[:8]
    deadline = time.monotonic() + 20
    while status_with(key) != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status_with(key) == 200
    assert run_bastion("apikey", "revoke", "--data", server.data, "probe").returncode == 0
    deadline = time.monotonic() + 20
    while status_with(key) != 401 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status_with(key) == 401


def test_emergency_token_tricks(server: BastionServer, tmp_path: Path) -> None:
    def status_with(token: str, path: str = "/api/statistics") -> int:
        return httpx.get(server.url(path), headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code

    minted = run_bastion("emergency-token", "--data", server.data, "--role", "viewer", "--hours", "0.5",
                         "--reason", "probe", "--user", "dr.probe")
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    assert status_with(token, "/dicom-web/studies") in (200, 204)
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    for edit in ({"role": "admin"}, {"exp": claims["exp"] + 86400}, {"sub": "someone.else"}):
        edited = f"{head}.{_b64(claims | edit)}.{sig}"
        assert status_with(edited, "/dicom-web/studies") == 401, edit
    # Past this server's cap (auth_emergency_max_hours = 1): minted for 12 hours by the CLI, refused here.
    long = run_bastion("emergency-token", "--data", server.data, "--role", "viewer", "--hours", "12",
                       "--reason", "probe", "--user", "dr.probe")
    assert long.returncode == 0, long.stderr
    assert status_with(long.stdout.strip(), "/dicom-web/studies") == 401
    # A node-local token's claims moved to the break-glass issuer (signed by the other key) are refused.
    forged_claims = {"iss": EMERGENCY_ISSUER, "aud": EMERGENCY_ISSUER}
    local_jwt = local_token(server.data, "probe")
    lh, lb, ls = local_jwt.split(".")
    local_claims = json.loads(base64.urlsafe_b64decode(lb + "=" * (-len(lb) % 4)))
    assert status_with(f"{lh}.{_b64(local_claims | forged_claims)}.{ls}") == 401


def test_many_bad_tokens_are_bounded_and_limited(tmp_path: Path, issuer: TestIssuer) -> None:
    server = BastionServer(tmp_path / "data", settings=auth_settings(issuer, BASTION_AUTH_FAILURE_LIMIT="5")).start()
    try:
        statuses = []
        for i in range(12):
            bad = issuer.token(roles=["admin"], aud=f"other-{i}")
            statuses.append(httpx.get(server.url("/api/statistics"), headers={"Authorization": f"Bearer {bad}"},
                                      timeout=30).status_code)
        assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}, statuses
        # A forged X-Forwarded-For (from loopback, which uvicorn would trust by default) is no new address: still
        # limited, and the audit log keeps the real peer.
        for i in range(3):
            rsp = httpx.get(server.url("/api/statistics"), timeout=30, headers={
                "Authorization": f"Bearer {issuer.token(aud=f'xff-{i}')}", "X-Forwarded-For": f"10.9.0.{i}",
                "Forwarded": f"for=10.9.1.{i}", "X-Real-IP": f"10.9.2.{i}"})
            assert rsp.status_code == 429, (i, rsp.status_code)
        entries = audit_entries(server.data, want=lambda es: sum(e.get("kind") == "login" for e in es) >= 5)
        addresses = {e.get("address") for e in entries if e.get("kind") == "login"}
        assert addresses == {"127.0.0.1"}, addresses
        # Limited, a good token from the same address still gets in (it is not a failure).
        good = issuer.token(roles=["admin"])
        assert httpx.get(server.url("/api/statistics"), headers={"Authorization": f"Bearer {good}"},
                         timeout=30).status_code in (200, 429)
    finally:
        server.stop()


def test_deletion_tricks(server: BastionServer, issuer: TestIssuer, tmp_path: Path) -> None:
    admin = {"Authorization": f"Bearer {issuer.token(roles=['admin'])}"}
    made = make_study(tmp_path / "s", series=1, per_series=1, patient_id="PROBE-DEL")
    body, ctype = stow_body(made)
    assert httpx.post(server.url("/dicom-web/studies"), content=body, timeout=30,
                      headers={"Content-Type": ctype, **admin}).status_code == 200
    for uid in ("..%2F..%2Fetc", "1.2.3%2F..%2F..", "..", "1.2.3;DROP TABLE study", "%00", "*", "1.2.*"):
        status, _, _ = raw(server, f"DELETE /dicom-web/studies/{uid}?reason=probe HTTP/1.1", admin)
        assert status in (400, 404, 405), (uid, status)
    # No HTTP route purges: the bytes stay in the blob store after every try.
    st = made.study_uid
    blobs_before = blob_files(server)
    assert httpx.request("DELETE", server.url(f"/dicom-web/studies/{st}?reason=probe"), headers=admin,
                         timeout=30).status_code == 200
    # Hidden from every reader, the admin included.
    assert httpx.get(server.url(f"/dicom-web/studies/{st}/metadata"), headers=admin, timeout=30).status_code == 404
    qido = httpx.get(server.url("/dicom-web/studies?PatientID=PROBE-DEL"), headers=admin, timeout=30)
    assert qido.status_code == 204 or st not in qido.text, qido.text[:200]
    for method, path in [("DELETE", f"/dicom-web/studies/{st}?purge=true&force=1"), ("POST", "/api/purge"),
                         ("POST", f"/api/studies/{st}/purge"), ("DELETE", f"/api/studies/{st}"),
                         ("DELETE", f"/api/deleted/{st}"), ("DELETE", "/api/deleted")]:
        rsp = httpx.request(method, server.url(path), headers=admin, timeout=30)
        assert rsp.status_code < 500, (method, path, rsp.status_code)
    assert blobs_before and blobs_before <= blob_files(server)
    # Hidden, then restorable: the purge-looking calls did not take it.
    listing = httpx.get(server.url("/api/deleted"), headers=admin, timeout=30).json()
    assert [t["state"] for t in listing["studies"] if t["study"] == st] == ["deleted"], listing
    rsp = httpx.post(server.url(f"/api/studies/{st}/undelete"), headers=admin, timeout=30)
    assert rsp.status_code == 200, rsp.text
    assert httpx.get(server.url(f"/dicom-web/studies/{st}/metadata"), headers=admin, timeout=30).status_code == 200


def blob_files(server: BastionServer) -> set[Path]:
    """The files of the blob store (its objects' bytes)."""
    return {p for p in server.blob_dir.rglob("*") if p.is_file()}


def test_uploader_learns_nothing_of_other_studies(server: BastionServer, issuer: TestIssuer, study: Study,
                                                 tmp_path: Path) -> None:
    """STOW-RS's answer to an uploader names only what it sent: a clash with a stored instance of another study
    does not tell it that study or its patient."""
    uploader = {"Authorization": f"Bearer {issuer.token(roles=['uploader'])}"}
    original = next(iter(study.series.values()))[0]
    ds = pydicom.dcmread(original)
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.999999"
    ds.PatientID = "ATTACKER"
    clash = tmp_path / "clash.dcm"
    ds.save_as(clash)
    boundary = "probe-boundary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + clash.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode())
    blobs_before = blob_files(server)
    rsp = httpx.post(server.url("/dicom-web/studies"), content=body, timeout=30, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}', **uploader})
    assert rsp.status_code < 500, rsp.text
    answer = rsp.text
    assert study.patient_id not in answer and f"{study.study_uid}/" not in answer, answer[:500]
    assert f'"{study.study_uid}"' not in answer, answer[:500]
    # Same SOP Instance UID, other bytes: the archive keeps the old version as superseded (index/base.py), so
    # nothing stored is lost: every blob there before is there after.
    assert blobs_before <= blob_files(server), "a stored object's bytes were removed by an uploader's STOW-RS"


def test_a_purged_study_cannot_be_undeleted_over_http(tmp_path: Path, issuer: TestIssuer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_DELETION_DELAY_DAYS", "0")  # for the purge command too
    server = BastionServer(tmp_path / "data", settings=auth_settings(issuer, BASTION_DELETION_DELAY_DAYS="0")).start()
    try:
        admin = {"Authorization": f"Bearer {issuer.token(roles=['admin'])}"}
        made = make_study(tmp_path / "s", series=1, per_series=1)
        body, ctype = stow_body(made)
        assert httpx.post(server.url("/dicom-web/studies"), content=body, timeout=30,
                          headers={"Content-Type": ctype, **admin}).status_code == 200
        st = made.study_uid
        assert httpx.request("DELETE", server.url(f"/dicom-web/studies/{st}?reason=probe"), headers=admin,
                             timeout=30).status_code == 200
        purged = run_bastion("purge", "--data", server.data, "--study", st)
        assert purged.returncode == 0, purged.stderr
        rsp = httpx.post(server.url(f"/api/studies/{st}/undelete"), headers=admin, timeout=30)
        assert rsp.status_code == 409, rsp.text
        assert httpx.get(server.url(f"/dicom-web/studies/{st}/metadata"), headers=admin,
                         timeout=30).status_code == 404
    finally:
        server.stop()


@requires_dcmtk
def test_dimse_ae_title_and_service_tricks(tmp_path: Path) -> None:
    """AE titles are matched case-sensitively, with spaces not significant (PS3.5 6.2, VR AE; DCMTK pads to 16
    with spaces); a service not granted cannot be had through its neighbour (C-GET for an AE granted C-MOVE to one
    destination only, C-MOVE to itself)."""
    config = tmp_path / "bastion.toml"
    config.write_text(f"""
[remotes]
DEST = "127.0.0.1:{free_port()}"

[dimse.peers]
STORER = {{ host = "127.0.0.1", services = ["echo", "store"] }}
MOVER = {{ host = "127.0.0.1", services = ["echo", "move"], move_destinations = ["DEST"] }}
""")
    server = BastionServer(tmp_path / "data", settings={"BASTION_CONFIG": str(config)}).start()
    try:
        assert echo(server, "STORER").returncode == 0
        for calling, called in (("storer", None), ("Storer", None), ("STORER", server.aet.lower()),
                                ("STORE", None), ("STORERX", None)):
            proc = echo(server, calling, called)
            assert proc.returncode != 0 and "Association Rejected" in proc.stdout, (calling, called, proc.stdout)
        assert raw_associate(server, "STORER", "127.0.0.1")[:1] == b"\x02"  # padded with spaces to 16: accepted
        assert raw_associate(server, "storer", "127.0.0.1")[:1] == b"\x03"
        study = make_study(tmp_path / "study", series=1, per_series=2)
        stored = run_dcmtk("storescu", "-aet", "STORER", *server.addr(), *study.files, timeout=120)
        assert stored.returncode == 0, stored.stdout
        out = tmp_path / "got"
        out.mkdir()
        got = run_dcmtk("getscu", "-v", "-S", "-aet", "MOVER", "-k", "QueryRetrieveLevel=STUDY",
                        "-k", f"StudyInstanceUID={study.study_uid}", "-od", out, *server.addr(), timeout=60)
        assert not_authorized(got.stdout), got.stdout
        assert not list(out.iterdir()), "a C-GET not granted sent instances"
        for destination in ("MOVER", "STORER", "dest"):
            moved = run_dcmtk("movescu", "-v", "-S", "-aet", "MOVER", "-aem", destination, "-k",
                              "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}",
                              *server.addr(), timeout=60)
            assert "Refused" in moved.stdout and "Success" not in moved.stdout.split("Final Move Response")[-1], \
                (destination, moved.stdout)
        found = run_dcmtk("findscu", "-v", "-S", "-aet", "MOVER", "-k", "QueryRetrieveLevel=STUDY",
                          "-k", f"StudyInstanceUID={study.study_uid}", *server.addr(), timeout=60)
        assert not_authorized(found.stdout), found.stdout
    finally:
        server.stop()


def test_malformed_tokens_are_401_not_500(server: BastionServer, issuer: TestIssuer, study: Study) -> None:
    """A token whose header or claims are JSON nested past Python's recursion limit was a 500 with a traceback, and
    so neither audited nor counted by the failure limit: now a 401 like any token that is not a JWT."""
    def b64(raw_bytes: bytes) -> str:
        return base64.urlsafe_b64encode(raw_bytes).rstrip(b"=").decode()

    claims = b64(json.dumps({"iss": issuer.url}).encode())
    rs256 = b64(b'{"alg":"RS256"}')
    tokens = {
        "deep header": b64(b"[" * 3000) + "." + b64(b"{}") + ".x",
        "deep claims": rs256 + "." + b64(b'{"a":' + b"[" * 3000 + b"}") + ".x",
        "not utf-8": b64(bytes([0xFF, 0xFE])) + "." + claims + ".x",
        "not base64": "!!!." + claims + ".x",
        "kid a list": b64(b'{"alg":"RS256","kid":["a"]}') + "." + claims + ".x",
        "alg a list": b64(b'{"alg":["RS256"]}') + "." + claims + ".x",
        "huge number": rs256 + "." + b64(b'{"iss":1' + b"0" * 5000 + b"}") + ".x",
        "crit header": b64(json.dumps({"alg": "RS256", "kid": issuer.key.kid, "crit": ["x"], "x": 1}).encode())
                       + "." + claims + ".x",
        "four parts": b64(b"{}") + "." + claims + ".x.y",
    }
    for case, token in tokens.items():
        rsp = httpx.get(server.url("/api/statistics"), headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert rsp.status_code == 401, (case, rsp.status_code, rsp.text[:200])
    # The same nesting in a deletion's JSON body (an admin's request) is a 400, not a 500.
    admin = {"Authorization": f"Bearer {issuer.token(roles=['admin'])}", "Content-Type": "application/json"}
    rsp = httpx.request("DELETE", server.url(f"/dicom-web/studies/{study.study_uid}"), headers=admin,
                        content=b"[" * 3000, timeout=30)
    assert rsp.status_code == 400, rsp.text[:200]
    rsp = httpx.post(server.url(f"/api/studies/{study.study_uid}/undelete"), headers=admin,
                     content=b'{"reason":' + b"[" * 3000, timeout=30)
    assert rsp.status_code == 400, rsp.text[:200]
    assert "RecursionError" not in server.log()


def test_websocket_upgrade_and_export_tricks(server: BastionServer, issuer: TestIssuer, study: Study,
                                             tmp_path: Path) -> None:
    # A WebSocket handshake is no way around the access table (no route speaks WebSocket).
    for path in ("/dicom-web/studies", "/api/audit"):
        status, _, payload = raw(server, f"GET {path} HTTP/1.1", {
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode()})
        assert status in (400, 401, 403, 426), (path, status)
        assert not leaks(payload, study), path
    # A Patient ID that is a path: the exported ZIP's entries stay in their folders.
    admin = {"Authorization": f"Bearer {issuer.token(roles=['admin'])}"}
    made = make_study(tmp_path / "s", series=1, per_series=1, patient_id="../../../../tmp/evil")
    body, ctype = stow_body(made)
    assert httpx.post(server.url("/dicom-web/studies"), content=body, timeout=30,
                      headers={"Content-Type": ctype, **admin}).status_code == 200
    for deidentify in ("false", "true"):
        rsp = httpx.post(server.url(f"/api/studies/{made.study_uid}/export?deidentify={deidentify}"),
                         headers=admin, timeout=60)
        assert rsp.status_code == 200, rsp.text[:200]
        (tmp_path / "x.zip").write_bytes(rsp.content)
        with zipfile.ZipFile(tmp_path / "x.zip") as archive:
            names = archive.namelist()
        assert names and all(".." not in n.split("/") and not n.startswith("/") for n in names), names
    for path in ("/api/studies/..%2F..%2Fetc/export", "/api/studies/1.2.3%0d%0aX-Evil:%201/export"):
        status, fields, _ = raw(server, f"POST {path} HTTP/1.1", admin)
        assert status in (400, 404, 405), (path, status)  # 405: no such route, the viewer's GET-only fallback
        assert "x-evil" not in fields


def test_a_hostile_jwks_answer_is_a_401_not_a_500(tmp_path: Path, issuer: TestIssuer) -> None:
    """A JWKS URL (plain http, or an issuer taken over) answering JSON nested past Python's recursion limit: the
    fetch fails like any bad answer (the cached keys stay in use), the token is refused, nothing is a 500."""
    class Nested(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            body = b'{"keys": ' + b"[" * 5000
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    hostile = ThreadingHTTPServer(("127.0.0.1", 0), Nested)
    threading.Thread(target=hostile.serve_forever, daemon=True).start()
    server = BastionServer(tmp_path / "data", settings=auth_settings(
        issuer, BASTION_AUTH_JWKS_URL=f"http://127.0.0.1:{hostile.server_address[1]}/jwks")).start()
    try:
        rsp = httpx.get(server.url("/api/statistics"),
                        headers={"Authorization": f"Bearer {issuer.token(roles=['admin'])}"}, timeout=30)
        assert rsp.status_code == 401, (rsp.status_code, rsp.text[:200])
        assert "RecursionError" not in server.log()
    finally:
        server.stop()
        hostile.shutdown()
