"""A small, real OpenID Connect issuer for the tests: discovery, JWKS, authorization code + PKCE, token, userinfo.

It serves on a free loopback port over real HTTP (``http.server`` in a thread) and signs with joserfc RSA keys:
what a Keycloak or Entra ID tenant would answer, cut to what Bastion, the viewer and the admin page use. The
authorization endpoint logs in the configured user at once (no form), as a test needs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from joserfc import jwt
from joserfc.jwk import RSAKey


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestIssuer:
    """An OIDC issuer on ``http://127.0.0.1:<port>``; ``audience`` is the ``aud`` of its access tokens."""

    __test__ = False

    def __init__(self, audience: str = "bastion", client_id: str = "bastion-viewer",
                 user: str = "dr.who", roles: tuple[str, ...] = ("viewer",), port: int = 0) -> None:
        self.audience, self.client_id, self.user, self.roles = audience, client_id, user, roles
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = RSAKey.generate_key(2048, auto_kid=True)
        self.published = [self.key]
        self.codes: dict[str, dict[str, Any]] = {}
        self.jwks_requests = 0
        self._server: ThreadingHTTPServer | None = None

    # --- tokens -----------------------------------------------------------------------------------------------
    def token(self, *, key: RSAKey | None = None, alg: str = "RS256", lifetime: float = 300, **claims: Any) -> str:
        """An access token (claims override the defaults: iss, aud, sub, preferred_username, roles, iat, exp)."""
        now = int(time.time())
        body: dict[str, Any] = {"iss": self.url, "aud": self.audience, "sub": f"sub-{self.user}",
                                "preferred_username": self.user, "roles": list(self.roles), "iat": now,
                                "nbf": now, "exp": now + int(lifetime), "jti": secrets.token_hex(8)}
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        key = key or self.key
        return jwt.encode({"alg": alg, "kid": key.kid}, body, key, algorithms=[alg])

    def rotate(self) -> RSAKey:
        """A new signing key, published beside the old one; tokens are signed with it from now on."""
        self.key = RSAKey.generate_key(2048, auto_kid=True)
        self.published.append(self.key)
        return self.key

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.as_dict(private=False) | {"use": "sig", "alg": "RS256"} for k in self.published]}

    # --- HTTP ---------------------------------------------------------------------------------------------------
    def start(self) -> TestIssuer:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Access-Control-Allow-Origin", "*")
                self.send_header("Access-Control-Allow-Headers", "*")
                self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if body is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_OPTIONS(self) -> None:  # noqa: N802
                self._send(204)

            def do_GET(self) -> None:  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                if url.path == "/.well-known/openid-configuration":
                    self._send(200, issuer.discovery())
                elif url.path == "/jwks":
                    issuer.jwks_requests += 1
                    self._send(200, issuer.jwks())
                elif url.path == "/authorize":
                    code = secrets.token_urlsafe(16)
                    issuer.codes[code] = query
                    target = query["redirect_uri"] + "?" + urllib.parse.urlencode(
                        {"code": code, "state": query.get("state", "")})
                    self._send(302, None, {"Location": target})
                elif url.path == "/userinfo":
                    self._send(200, {"sub": f"sub-{issuer.user}", "preferred_username": issuer.user})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                if urllib.parse.urlsplit(self.path).path != "/token":
                    self._send(404, {"error": "not found"})
                    return
                asked = issuer.codes.pop(form.get("code", ""), None)
                if asked is None:
                    self._send(400, {"error": "invalid_grant"})
                    return
                challenge = asked.get("code_challenge")
                if challenge:
                    digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
                    if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != challenge:
                        self._send(400, {"error": "invalid_grant", "error_description": "PKCE"})
                        return
                id_token = issuer.token(aud=issuer.client_id, nonce=asked.get("nonce"), roles=None)
                self._send(200, {"access_token": issuer.token(), "id_token": id_token, "token_type": "Bearer",
                                 "expires_in": 300, "scope": asked.get("scope", "openid")})

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def discovery(self) -> dict[str, Any]:
        return {"issuer": self.url, "authorization_endpoint": f"{self.url}/authorize",
                "token_endpoint": f"{self.url}/token", "jwks_uri": f"{self.url}/jwks",
                "userinfo_endpoint": f"{self.url}/userinfo", "response_types_supported": ["code"],
                "subject_types_supported": ["public"], "id_token_signing_alg_values_supported": ["RS256"],
                "code_challenge_methods_supported": ["S256"], "scopes_supported": ["openid", "profile"]}

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
