"""Authentication pieces without a server: the access table, roles, the failure limiter, token checks, API keys and
break-glass tokens (real joserfc keys and signatures, real files)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from bastion.auth import ANONYMOUS, Principal, apikeys
from bastion.auth.emergency import EmergencyError, EmergencyTokens, mint
from bastion.auth.jwks import JwksSource
from bastion.auth.principal import strongest
from bastion.auth.ratelimit import FailureLimiter
from bastion.auth.tokens import AuthenticationFailed, TokenCheck, claim_at, verify_jwt
from bastion.settings import SettingsError, load_settings
from bastion.web.access import AUTHENTICATED, DENY, PUBLIC, required_role


@pytest.mark.parametrize(("method", "path", "role"), [
    ("GET", "/health", PUBLIC), ("HEAD", "/health", PUBLIC), ("POST", "/health", DENY),
    ("GET", "/", PUBLIC), ("GET", "/viewer", PUBLIC), ("GET", "/app-config.js", PUBLIC),
    ("GET", "/assets/x.js", PUBLIC), ("GET", "/admin", PUBLIC), ("GET", "/api/auth/config", PUBLIC),
    ("GET", "/api/openapi.json", PUBLIC), ("POST", "/api/openapi.json", "admin"),
    ("GET", "/api/whoami", AUTHENTICATED),
    ("GET", "/dicom-web/studies", "viewer"), ("HEAD", "/dicom-web/studies/1.2/series", "viewer"),
    ("GET", "/dicom-web/studies/1.2/series/3/instances/4/frames/1", "viewer"),
    ("GET", "/dicom-web/studies/1.2/rendered", "viewer"), ("GET", "/wado", "viewer"),
    ("POST", "/dicom-web/studies", "uploader"), ("POST", "/dicom-web/studies/1.2", "uploader"),
    ("POST", "/dicom-web/studies/1.2/series", DENY), ("PUT", "/dicom-web/studies", DENY),
    ("DELETE", "/dicom-web/studies/1.2", "admin"), ("POST", "/api/studies/1.2/undelete", "admin"),
    ("GET", "/api/audit", "admin"), ("POST", "/api/studies/1.2/export", "admin"), ("GET", "/api/emergency", "admin"),
    ("GET", "/api/statistics", "admin"), ("GET", "/api", "admin"), ("POST", "/api/queues/x/retry", "admin"),
    ("GET", "/admin/x", "admin"), ("OPTIONS", "/dicom-web/studies", PUBLIC),
    ("GET", "/dicom-web", DENY), ("GET", "/wado/x", DENY), ("PATCH", "/", DENY),
    ("GET", "/api/templates", "viewer|radiologist"), ("GET", "/api/reports", "viewer|radiologist"),
    ("GET", "/api/reports/ab/audio/cd", "viewer|radiologist"), ("POST", "/api/reports", "radiologist"),
    ("PUT", "/api/reports/ab", "radiologist"), ("POST", "/api/reports/ab/sign", "radiologist"),
    ("POST", "/api/reports/ab/amend", "radiologist"), ("POST", "/api/reports/ab/audio", "radiologist"),
    ("POST", "/api/reports/ab/audio/cd/reject", "radiologist"), ("GET", "/api/reports/ab/audio/cd/reject", "admin"),
    ("GET", "/api/typing", "typist|radiologist"), ("GET", "/api/typing/ab/cd", "typist|radiologist"),
    ("POST", "/api/typing/ab/cd", "typist|radiologist"), ("POST", "/api/typing/ab", "admin"),
    ("GET", "/api/reading-list", "viewer|radiologist"), ("POST", "/api/reading-list/1.2/claim", "radiologist"),
    ("DELETE", "/api/reading-list/1.2/claim", "radiologist"), ("PUT", "/api/reading-list/1.2/priority", "radiologist"),
    ("POST", "/api/reading-list", "admin"), ("GET", "/reporting/study/1.2", PUBLIC), ("POST", "/reporting", DENY),
    ("POST", "/api/templates", "admin"), ("DELETE", "/api/reports/ab", "admin"),
    ("GET", "/fhir/DiagnosticReport", "viewer|radiologist"), ("POST", "/fhir/DiagnosticReport", DENY),
    ("GET", "/fhir", DENY),
])
def test_the_access_table(method: str, path: str, role: str) -> None:
    assert required_role(method, path) == role


def test_roles() -> None:
    uploader = Principal("modality", "uploader", "apikey")
    assert uploader.may("uploader") and not uploader.may("viewer") and not uploader.may("admin")
    admin = Principal("root", "admin", "oidc")
    assert all(admin.may(r) for r in ("viewer", "uploader", "admin"))
    both = Principal("x", "uploader", "oidc", roles=("uploader", "viewer"))
    assert both.may("viewer") and both.may("uploader") and not both.may("admin")
    assert not Principal("x", "", "oidc").may("viewer")
    assert ANONYMOUS.may("admin")
    assert strongest("viewer admin") == ("admin", "viewer") and strongest(["offline", "uploader"]) == ("uploader",)
    assert strongest(None) == ()
    assert claim_at({"realm_access": {"roles": ["viewer"]}}, "realm_access.roles") == ["viewer"]
    assert claim_at({"realm_access": "x"}, "realm_access.roles") is None


def test_the_failure_limiter_is_bounded_and_forgets() -> None:
    limiter = FailureLimiter(3, window=60, max_addresses=100)
    for t in range(3):
        assert limiter.retry_after("a", now=float(t)) == 0
        limiter.failed("a", now=float(t))
    assert limiter.retry_after("a", now=3.0) == 57
    assert limiter.retry_after("b", now=3.0) == 0
    assert limiter.retry_after("a", now=60.5) == 0  # the oldest failure is a minute old
    for i in range(1000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}", now=5.0)
    assert len(limiter) == 100


CHECK = TokenCheck("https://idp", "bastion", ("RS256",), leeway=30)


def _token(key: RSAKey, **claims: object) -> str:
    now = int(time.time())
    body = {"iss": "https://idp", "aud": "bastion", "sub": "u", "exp": now + 60, "iat": now} | claims
    return jwt.encode({"alg": "RS256", "kid": key.kid}, {k: v for k, v in body.items() if v is not None}, key,
                      algorithms=["RS256"])


def test_verify_jwt_checks_each_claim() -> None:
    key = RSAKey.generate_key(2048, auto_kid=True)
    keys = KeySet([key])
    assert verify_jwt(_token(key, aud=["other", "bastion"]), keys, CHECK)["sub"] == "u"
    now = time.time()
    cases = {"another audience": _token(key, aud="other"), "another issuer": _token(key, iss="https://evil"),
             "expired": _token(key, exp=int(now) - 31), "not valid yet": _token(key, nbf=int(now) + 120),
             "no expiry": _token(key, exp=None)}
    for words, token in cases.items():
        with pytest.raises(AuthenticationFailed, match=words):
            verify_jwt(token, keys, CHECK)
    assert verify_jwt(_token(key, exp=int(now) - 10), keys, CHECK)  # within the leeway
    with pytest.raises(AuthenticationFailed, match="signature"):
        verify_jwt(_token(RSAKey.generate_key(2048, auto_kid=True)), keys, CHECK)
    with pytest.raises(AuthenticationFailed, match="not allowed"):
        verify_jwt(_token(key), keys, TokenCheck("https://idp", "bastion", ("ES256",), 30))


def test_jwks_keeps_only_asymmetric_signing_keys(tmp_path: Path) -> None:
    rsa = RSAKey.generate_key(2048, auto_kid=True)
    doc = {"keys": [rsa.as_dict(private=False), {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
                    rsa.as_dict(private=False) | {"kid": "enc", "use": "enc"}]}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(doc))
    source = JwksSource("", str(path), tmp_path / "cache.json", 3600)
    assert [k.kid for k in source.current(None).keys] == [rsa.kid]


def test_jwks_is_cached_on_disk_and_used_when_the_url_fails(tmp_path: Path) -> None:
    rsa = RSAKey.generate_key(2048, auto_kid=True)
    answers = [{"keys": [rsa.as_dict(private=False)]}]

    def fetch(url: str) -> dict[str, object]:
        if not answers:
            raise OSError("connection refused")
        return answers.pop()

    cache = tmp_path / "auth" / "jwks.json"
    assert JwksSource("http://idp/jwks", "", cache, 3600, fetch=fetch).current(rsa.kid).keys
    assert cache.exists()
    again = JwksSource("http://idp/jwks", "", cache, 0.001, fetch=fetch)  # refresh due, the issuer down
    time.sleep(0.01)
    assert [k.kid for k in again.current(rsa.kid).keys] == [rsa.kid]
    assert "connection refused" in again.last_error


def test_api_keys(tmp_path: Path) -> None:
    key = apikeys.create(tmp_path, "gateway", "uploader")
    assert key.startswith(apikeys.PREFIX) and len(key) >= 47
    stored = (tmp_path / "auth" / "apikeys.json").read_text()
    assert key not in stored and apikeys.digest(key) in stored
    assert oct((tmp_path / "auth" / "apikeys.json").stat().st_mode)[-3:] == "600"
    store = apikeys.ApiKeyStore(tmp_path)
    principal = store.principal(key)
    assert principal is not None and principal.user == "gateway" and principal.role == "uploader"
    assert store.principal(key + "x") is None
    with pytest.raises(apikeys.ApiKeyError, match="exists"):
        apikeys.create(tmp_path, "gateway", "viewer")
    with pytest.raises(apikeys.ApiKeyError, match="role"):
        apikeys.create(tmp_path, "other", "superuser")
    assert apikeys.revoke(tmp_path, "gateway") == 1 and apikeys.revoke(tmp_path, "gateway") == 0
    fresh = apikeys.ApiKeyStore(tmp_path)
    assert fresh.principal(key) is None


def test_break_glass_tokens(tmp_path: Path) -> None:
    with pytest.raises(EmergencyError, match="at most 24"):
        mint(tmp_path, "viewer", 25, "why", "dr.x", max_hours=24)
    with pytest.raises(EmergencyError, match="reason"):
        mint(tmp_path, "viewer", 1, " ", "dr.x", max_hours=24)
    minted = mint(tmp_path, "viewer", 2, "IdP down", "dr.x", max_hours=24)
    tokens = EmergencyTokens(tmp_path, max_hours=24, leeway=30)
    principal, claims = tokens.verify(minted.token)
    assert principal.emergency and principal.user == "dr.x" and principal.reason == "IdP down"
    assert claims["exp"] - claims["iat"] == 7200
    # A server that allows shorter break-glass tokens refuses a longer one.
    with pytest.raises(AuthenticationFailed, match="lifetime"):
        EmergencyTokens(tmp_path, max_hours=1, leeway=30).verify(minted.token)
    other = tmp_path / "other"
    with pytest.raises(AuthenticationFailed, match="signature"):
        tokens.verify(mint(other, "admin", 1, "x", "y", max_hours=24).token)


def test_auth_settings_are_checked_at_start(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="auth_issuer"):
        load_settings(env={"BASTION_AUTH_ENABLED": "true"})
    with pytest.raises(SettingsError, match="HS256"):
        load_settings(env={"BASTION_AUTH_ENABLED": "true", "BASTION_AUTH_ISSUER": "i", "BASTION_AUTH_AUDIENCE": "a",
                           "BASTION_AUTH_JWKS_FILE": "f", "BASTION_AUTH_ALGORITHMS": "RS256,HS256"})
    config = tmp_path / "b.toml"
    config.write_text('[auth]\nenabled = true\nissuer = "https://idp"\naudience = "bastion"\njwks_url = "https://idp/k"\n'
                      'role_claim = "realm_access.roles"\n')
    settings = load_settings(config, env={})
    assert settings.auth_enabled and settings.auth_role_claim == "realm_access.roles"
    config.write_text("[auth]\nenable = true\n")
    with pytest.raises(SettingsError, match="auth_enable"):
        load_settings(config, env={})


def test_forwarding_credentials_are_kept_and_never_shown() -> None:
    settings = load_settings(env={"BASTION_UPSTREAM": "https://central/dicom-web", "BASTION_UPSTREAM_API_KEY": "bst_s"})
    assert settings.upstream_rule is not None and settings.upstream_rule.api_key == "bst_s"
    assert "bst_s" not in repr(settings.upstream_rule)
    from bastion.model.remotes import ForwardRule

    rule = ForwardRule.parse({"to": "https://x/dicom-web", "api_key": "bst_t"})
    assert rule.api_key == "bst_t" and "bst_t" not in repr(rule)


def _served(routes: list[Any], prefix: str = "") -> list[tuple[str, str]]:
    """(method, a concrete path) for every route of the app, its path parameters filled with sample values."""
    from starlette.routing import Mount, Route

    out = []
    for route in routes:
        if isinstance(route, Mount):
            out += _served(list(route.routes), prefix + route.path)
        elif isinstance(route, Route):
            path = re.sub(r"\{[^}]+\}", "1.2.3", prefix + route.path)
            out += [(method, path) for method in sorted(route.methods or {"GET"})]
    return out


#: The routes served without credentials once [auth] is on: none of them holds patient data.
PUBLIC_ROUTES = {("GET", "/health"), ("HEAD", "/health"), ("GET", "/app-config.js"), ("HEAD", "/app-config.js"),
                 ("GET", "/admin"), ("HEAD", "/admin"), ("GET", "/admin/"), ("HEAD", "/admin/"),
                 ("GET", "/api/auth/config"), ("HEAD", "/api/auth/config"), ("GET", "/api/openapi.json"),
                 ("HEAD", "/api/openapi.json"), ("GET", "/"), ("HEAD", "/"), ("GET", "/1.2.3"), ("HEAD", "/1.2.3")}
# The reporting pages' shells and files (their data comes from the API).
PUBLIC_ROUTES |= {(m, p) for m in ("GET", "HEAD") for p in ("/reporting", "/reporting/", "/reporting/static/1.2.3",
                                                           "/reporting/study/1.2.3", "/reporting/typing")}


def test_every_route_of_the_app_is_in_the_access_table(tmp_path: Path) -> None:
    """Each route the app serves needs a role (or is knowingly public): a route added later without a rule is
    refused to everyone (a failure here says which), and none holding data is public by accident."""
    from bastion.archive import Archive
    from bastion.web.app import create_app

    archive = Archive.open(load_settings(env={}, data=str(tmp_path / "data")))
    try:
        app = create_app(archive)
        served = _served(list(app.routes))
    finally:
        archive.close()
    assert len(served) > 40
    denied = [(m, p) for m, p in served if required_role(m, p) == DENY]
    assert not denied, f"routes no rule allows (add them to bastion.web.access.RULES): {denied}"
    public = {(m, p) for m, p in served if required_role(m, p) == PUBLIC}
    assert public <= PUBLIC_ROUTES, f"routes served without credentials: {sorted(public - PUBLIC_ROUTES)}"
    for method, path in served:
        if path.startswith(("/api/reports", "/api/templates", "/fhir/", "/api/reading-list")):
            assert required_role(method, path) in ("viewer|radiologist", "radiologist"), (method, path)
        elif path.startswith("/api/typing"):
            assert required_role(method, path) == "typist|radiologist", (method, path)
        elif path.startswith(("/api/", "/admin/")) and (method, path) not in PUBLIC_ROUTES and path != "/api/whoami":
            assert required_role(method, path) == "admin", (method, path)
        if path.startswith(("/dicom-web/", "/wado")):
            assert required_role(method, path) in ("viewer", "uploader", "admin"), (method, path)
