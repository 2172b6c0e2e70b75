"""Who may call which route: the access table and the ASGI middleware that enforces it, default deny.

With ``[auth] enabled``, every HTTP request is matched against :data:`RULES` (first match wins; no match: denied):

- ``GET``/``HEAD`` ``/health``, ``/app-config.js`` (the viewer's settings), ``/admin`` (the page's shell; its
  data comes from admin routes), ``/api/auth/config`` (how to log in), ``/api/openapi.json`` (the API's
  description): public;
- ``GET``/``HEAD`` ``/api/whoami``: any authenticated party;
- ``GET``/``HEAD`` ``/dicom-web/...`` (QIDO-RS, WADO-RS, metadata, rendered) and ``/wado`` (WADO-URI): viewer;
- ``POST`` ``/dicom-web/studies`` and ``/dicom-web/studies/{uid}`` (STOW-RS): uploader;
- ``GET``/``HEAD`` ``/api/templates``, ``/api/reports...`` (the printable ``/api/reports/{id}/pdf`` too) and
  ``/fhir/...``: viewer or radiologist;
- ``POST`` ``/api/reports``, ``PUT`` ``/api/reports/{id}``, ``POST`` ``/api/reports/{id}/sign|amend|audio``,
  ``POST`` ``/api/reports/{id}/audio/{audio}/reject``: radiologist (a rule's role ``a|b``: either);
- ``GET``/``HEAD``/``POST`` ``/api/typing`` and ``/api/typing/{report}/{audio}`` (the typing queue): typist or
  radiologist;
- ``GET``/``HEAD`` ``/reporting...`` (the reporting pages' shells and files): public; ``GET``/``HEAD``
  ``/api/reading-list``: viewer or radiologist; ``POST``/``DELETE`` ``/api/reading-list/{study}/claim`` and ``PUT``
  ``/api/reading-list/{study}/priority``: radiologist;
- ``DELETE`` anywhere, anything under ``/api/`` (the HL7 outbox, ``/api/hl7``, among it) and ``/admin/``: admin;
- ``OPTIONS`` anywhere: public (a CORS preflight carries no credentials);
- ``GET``/``HEAD`` on any other path: public (the viewer's static files and its single-page-app fallback).

``admin`` may do everything; ``uploader`` does not include ``viewer`` (a modality may store but not read). No or
bad credentials: 401 with ``WWW-Authenticate: Bearer``; a role that does not allow the route: 403; more than
``auth_failure_limit`` bad credentials from one address in a minute: 429 with ``Retry-After``. All with a JSON
``{"error": ...}``. Authentication outcomes are audited (PS3.15 A.5.3, User Authentication, 110114): every failure, the
first success of a credential in an hour, and every request made with a break-glass token.

With ``[auth]`` off, every request's principal is :data:`~bastion.auth.ANONYMOUS` and nothing is checked.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from bastion.archive import Archive
from bastion.audit import AuditEvent, AuditKind, Outcome
from bastion.auth import ANONYMOUS, SCOPE_KEY, Principal, principal_in
from bastion.auth.authenticator import Authenticator, Verified
from bastion.auth.ratelimit import FailureLimiter
from bastion.auth.tokens import AuthenticationFailed

PUBLIC = "public"
AUTHENTICATED = "authenticated"
DENY = "deny"
#: The party of a public route's request (no credentials looked at): it holds no role.
UNAUTHENTICATED = Principal(user="", role="", via="none")
#: Seconds between two audited successes of one credential.
SUCCESS_AUDIT_EVERY = 3600.0
_READ = frozenset({"GET", "HEAD"})
_ANY = frozenset({"*"})
_RESERVED = ("dicom-web", "wado", "api", "admin", "health", "fhir")
#: Who may read reports (a rule's role may name alternatives, ``|``-separated).
REPORT_READER = "viewer|radiologist"
#: Who works the typing queue (lists it, plays its recordings, posts what was typed).
TYPING = "typist|radiologist"


@dataclass(frozen=True)
class Rule:
    """``methods`` on the paths ``pattern`` matches need ``role``."""

    methods: frozenset[str]
    pattern: re.Pattern[str]
    role: str

    def matches(self, method: str, path: str) -> bool:
        return ("*" in self.methods or method in self.methods) and self.pattern.fullmatch(path) is not None


def _rule(methods: frozenset[str], pattern: str, role: str) -> Rule:
    return Rule(methods, re.compile(pattern, re.DOTALL), role)


RULES: tuple[Rule, ...] = (
    _rule(_READ, r"/health", PUBLIC),
    _rule(_READ, r"/app-config\.js", PUBLIC),
    _rule(_READ, r"/admin/?", PUBLIC),
    _rule(_READ, r"/api/auth/config", PUBLIC),
    _rule(_READ, r"/api/openapi\.json", PUBLIC),
    _rule(_READ, r"/api/whoami", AUTHENTICATED),
    _rule(_READ, r"/dicom-web/.+", "viewer"),
    _rule(_READ, r"/wado", "viewer"),
    _rule(frozenset({"POST"}), r"/dicom-web/studies(/[^/]+)?", "uploader"),
    _rule(_READ, r"/api/templates", REPORT_READER),
    _rule(_READ, r"/api/reports(/[^/]+(/audio(/[^/]+)?|/pdf)?)?", REPORT_READER),
    _rule(frozenset({"POST"}), r"/api/reports(/[^/]+/(sign|amend|audio))?", "radiologist"),
    _rule(frozenset({"PUT"}), r"/api/reports/[^/]+", "radiologist"),
    _rule(frozenset({"POST"}), r"/api/reports/[^/]+/audio/[^/]+/reject", "radiologist"),
    _rule(_READ | {"POST"}, r"/api/typing(/[^/]+/[^/]+)?", TYPING),
    _rule(_READ, r"/fhir/.+", REPORT_READER),
    _rule(_READ, r"/reporting(/.*)?", PUBLIC),
    _rule(_READ, r"/api/reading-list", REPORT_READER),
    _rule(frozenset({"POST", "DELETE"}), r"/api/reading-list/[^/]+/claim", "radiologist"),
    _rule(frozenset({"PUT"}), r"/api/reading-list/[^/]+/priority", "radiologist"),
    _rule(frozenset({"DELETE"}), r"/.*", "admin"),
    _rule(_ANY, r"/api(/.*)?", "admin"),
    _rule(_ANY, r"/admin/.*", "admin"),
    _rule(frozenset({"OPTIONS"}), r"/.*", PUBLIC),
    _rule(_READ, r"/(?!(?:" + "|".join(_RESERVED) + r")(?:/|$)).*", PUBLIC),
)


def required_role(method: str, path: str) -> str:
    """The role ``method path`` needs under :data:`RULES`: a role, :data:`PUBLIC`, :data:`AUTHENTICATED` or
    :data:`DENY` (no rule allows it)."""
    for rule in RULES:
        if rule.matches(method, path):
            return rule.role
    return DENY


def principal_of(request: Request) -> Principal:
    """The party that made ``request`` (set by :class:`AccessControl`; ANONYMOUS while authentication is off)."""
    return principal_in(request.scope)


def _credential(scope: Scope) -> str:
    """The bearer token of ``Authorization: Bearer ...``, else the ``X-API-Key``, else ``""``."""
    api_key = ""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key":
            api_key = value.decode("latin-1").strip()
    return api_key


async def _answer(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class AccessControl:
    """ASGI middleware: authenticates the request, sets ``scope["bastion.principal"]``, enforces :data:`RULES`."""

    def __init__(self, app: ASGIApp, archive: Archive, authenticator: Authenticator | None) -> None:
        self.app, self.archive, self.auth = app, archive, authenticator
        self.limiter = FailureLimiter(archive.settings.auth_failure_limit)
        self._audited: OrderedDict[str, float] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.auth is None:
            scope[SCOPE_KEY] = ANONYMOUS
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        need = required_role(method, path)
        if need == PUBLIC:
            scope[SCOPE_KEY] = UNAUTHENTICATED
            await self.app(scope, receive, send)
            return
        address = (scope.get("client") or ("", 0))[0]
        credential = _credential(scope)
        if not credential:
            await _answer(send, 401, "authentication required: send Authorization: Bearer <token> or X-API-Key",
                          [(b"www-authenticate", b'Bearer realm="bastion"')])
            return
        verified = self.auth.cached(credential)
        if verified is None:
            if wait := self.limiter.retry_after(address):
                await _answer(send, 429, f"too many failed authentications from {address}: try again in {wait} s",
                              [(b"retry-after", str(wait).encode())])
                return
            try:
                verified = await asyncio.to_thread(self.auth.authenticate, credential)
            except AuthenticationFailed as exc:
                self.limiter.failed(address)
                self._audit_login(Outcome.SERIOUS_FAILURE, exc.user, "", address, f"{method} {path}: {exc.reason}")
                await _answer(send, 401, f"authentication failed: {exc.reason}",
                              [(b"www-authenticate", b'Bearer realm="bastion", error="invalid_token"')])
                return
        principal = verified.principal
        self._audit_success(verified, address)
        if principal.emergency and not await asyncio.to_thread(self._emergency_use, verified, address, method, path):
            self.auth.forget(verified)
            self._audit_login(Outcome.SERIOUS_FAILURE, principal.user, principal.role, address,
                              f"{method} {path}: break-glass token revoked", True)
            await _answer(send, 401, "authentication failed: break-glass token revoked",
                          [(b"www-authenticate", b'Bearer realm="bastion", error="invalid_token"')])
            return
        if need == DENY or not (need == AUTHENTICATED or any(principal.may(r) for r in need.split("|"))):
            held = ", ".join(r for r in principal.roles if r) or "no role"
            why = (f"{method} {path} is not allowed" if need == DENY
                   else f"{method} {path} needs the {need} role ({principal.user or 'you'} hold {held})")
            self._audit_login(Outcome.MINOR_FAILURE, principal.user, principal.role, address, why,
                              principal.emergency)
            await _answer(send, 403, why, [(b"www-authenticate", b'Bearer realm="bastion", error="insufficient_scope"')])
            return
        scope[SCOPE_KEY] = principal
        await self.app(scope, receive, send)

    def _audit_login(self, outcome: Outcome, user: str, role: str, address: str, detail: str,
                     emergency: bool = False) -> None:
        self.archive.audit.record(AuditEvent(kind=AuditKind.LOGIN, outcome=outcome, action="E", user=user,
                                             role=role, address=address, via="api", detail=detail,
                                             emergency=emergency))

    def _audit_success(self, verified: Verified, address: str) -> None:
        """Audit a credential's success at most once per :data:`SUCCESS_AUDIT_EVERY` (and address)."""
        key = f"{verified.digest}@{address}"
        now = time.monotonic()
        last = self._audited.get(key)
        if last is not None and now - last < SUCCESS_AUDIT_EVERY:
            return
        self._audited[key] = now
        self._audited.move_to_end(key)
        while len(self._audited) > 50_000:
            self._audited.popitem(last=False)
        p = verified.principal
        self._audit_login(Outcome.SUCCESS, p.user, p.role, address, f"authenticated via {p.via}", p.emergency)

    def _emergency_use(self, verified: Verified, address: str, method: str, path: str) -> bool:
        """Count and audit one request made with a break-glass token; False if the token was revoked."""
        p = verified.principal
        assert self.auth is not None
        try:
            live = self.auth.emergency.used(verified.claims, address)
        except Exception:  # the ledger cannot be read: the token's signature stands; the audit event is the record
            live = True
        self.archive.audit.record(AuditEvent(
            kind=AuditKind.EMERGENCY, outcome=Outcome.SUCCESS, action="E", user=p.user, role=p.role,
            address=address, via="api", emergency=True,
            detail=f"{method} {path} (break-glass: {p.reason})" + ("" if live else " refused: revoked")))
        return live
