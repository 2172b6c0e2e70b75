"""Break-glass: short-lived tokens the archive itself signs, accepted while the identity provider is down.

``bastion emergency-token`` mints a JWT signed with the archive's own Ed25519 key (RFC 8037, made on first use in
``<data>/auth/emergency-key.jwk``, mode 0600). The server verifies it offline, with that key alone; its lifetime is
capped at ``auth_emergency_max_hours`` both when minted and when checked. Every token minted and every use of one
is kept in ``<data>/auth/emergency.sqlite3`` (who, why, role, issued, expires, uses, last use) for review on the
admin page (``GET /api/emergency``); the audit log has each use too. ``bastion emergency-token --revoke ID`` cuts a
token short: the server looks at the ledger on each use (it writes the use there anyway) and refuses a revoked one.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.jwk import KeySet, OKPKey

from bastion.auth.principal import ROLES, Principal
from bastion.auth.tokens import AuthenticationFailed, TokenCheck, verify_jwt
from bastion.blobs.fileio import keep_first

#: The ``iss`` (and ``aud``) of a break-glass token: it names the archive, not an identity provider.
EMERGENCY_ISSUER = "urn:bastion:emergency"
ALGORITHM = "Ed25519"

_SCHEMA = """CREATE TABLE IF NOT EXISTS override (
    jti TEXT PRIMARY KEY, user TEXT NOT NULL, role TEXT NOT NULL, reason TEXT NOT NULL,
    issued REAL NOT NULL, expires REAL NOT NULL, minted_by TEXT NOT NULL DEFAULT '',
    uses INTEGER NOT NULL DEFAULT 0, first_use REAL, last_use REAL, last_address TEXT NOT NULL DEFAULT '',
    revoked REAL)"""


class EmergencyError(ValueError):
    """A break-glass token cannot be minted as asked."""


def key_file(data: Path) -> Path:
    """The archive's break-glass signing key."""
    return data / "auth" / "emergency-key.jwk"


def ledger_file(data: Path) -> Path:
    """The record of break-glass tokens and their uses."""
    return data / "auth" / "emergency.sqlite3"


def signing_key(data: Path, create: bool, path: Path | None = None) -> OKPKey | None:
    """The archive's Ed25519 key (``path``, default :func:`key_file`); made (mode 0600) when ``create`` and there
    is none yet, else None."""
    path = path or key_file(data)
    if not path.exists():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = OKPKey.generate_key("Ed25519", auto_kid=True)  # another mint may link its key first: that one is used
        keep_first(path, json.dumps(key.as_dict(private=True)).encode(), 0o600)
    return OKPKey.import_key(json.loads(path.read_text()))


def _ledger(data: Path) -> sqlite3.Connection:
    path = ledger_file(data)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(_SCHEMA)
    if "revoked" not in {row[1] for row in db.execute("PRAGMA table_info(override)")}:  # a ledger made before it
        db.execute("ALTER TABLE override ADD COLUMN revoked REAL")
    return db


@dataclass(frozen=True)
class Minted:
    """A break-glass token and what it grants."""

    token: str
    jti: str
    user: str
    role: str
    reason: str
    issued: float
    expires: float


def mint(data: Path, role: str, hours: float, reason: str, user: str, max_hours: float,
         minted_by: str = "") -> Minted:
    """Sign a break-glass token for ``user`` with ``role`` for ``hours`` (at most ``max_hours``), and record it."""
    if role not in ROLES:
        raise EmergencyError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if not 0 < hours <= max_hours:
        raise EmergencyError(f"--hours {hours:g}: a break-glass token lasts more than 0 and at most {max_hours:g} "
                             "hours (auth_emergency_max_hours)")
    if not reason.strip():
        raise EmergencyError("--reason is required: say why the break-glass access is needed")
    if not user.strip():
        raise EmergencyError("--user is required (who will use the token)")
    key = signing_key(data, create=True)
    assert key is not None
    now = int(time.time())
    exp = now + int(hours * 3600)
    jti = secrets.token_urlsafe(12)
    claims = {"iss": EMERGENCY_ISSUER, "aud": EMERGENCY_ISSUER, "sub": user.strip(), "role": role,
              "reason": reason.strip(), "jti": jti, "iat": now, "nbf": now, "exp": exp, "emergency": True}
    token = jwt.encode({"alg": ALGORITHM, "kid": key.kid}, claims, key, algorithms=[ALGORITHM])
    with contextlib.closing(_ledger(data)) as db:
        db.execute("INSERT INTO override (jti, user, role, reason, issued, expires, minted_by) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)", (jti, user.strip(), role, reason.strip(), now, exp, minted_by))
    return Minted(token, jti, user.strip(), role, reason.strip(), now, exp)


class EmergencyTokens:
    """The server's side: verifies break-glass tokens offline and counts their uses."""

    def __init__(self, data: Path, max_hours: float, leeway: float) -> None:
        self.data, self.max_hours, self.leeway = data, max_hours, leeway
        self._lock = threading.Lock()
        self._key: OKPKey | None = None
        self._db: sqlite3.Connection | None = None

    def _public_key(self) -> OKPKey | None:
        if self._key is None:
            self._key = signing_key(self.data, create=False)
        return self._key

    def verify(self, token: str) -> tuple[Principal, dict[str, Any]]:
        """The :class:`Principal` (``emergency=True``) of a valid break-glass token, and its claims."""
        key = self._public_key()
        if key is None:
            raise AuthenticationFailed("no break-glass key on this archive (none was ever minted)")
        check = TokenCheck(EMERGENCY_ISSUER, EMERGENCY_ISSUER, (ALGORITHM,), self.leeway)
        claims = verify_jwt(token, KeySet([key]), check)
        lifetime = float(claims["exp"]) - float(claims.get("iat", 0))
        if claims.get("role") not in ROLES or not claims.get("jti") or lifetime > self.max_hours * 3600 + 1:
            raise AuthenticationFailed("break-glass token not valid (role, id or lifetime)")
        principal = Principal(user=str(claims.get("sub", "")), role=str(claims["role"]), via="emergency",
                              emergency=True, reason=str(claims.get("reason", "")))
        return principal, claims

    def used(self, token_claims: dict[str, Any], address: str) -> bool:
        """Count one use of a break-glass token (a token minted on another node joins the ledger here); False when
        the token was revoked (the use is counted all the same: it was attempted)."""
        now = time.time()
        with self._lock:
            if self._db is None:
                self._db = _ledger(self.data)
            self._db.execute(
                "INSERT INTO override (jti, user, role, reason, issued, expires, uses, first_use, last_use, "
                "last_address) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?) ON CONFLICT(jti) DO UPDATE SET "
                "uses = uses + 1, first_use = COALESCE(first_use, excluded.first_use), last_use = excluded.last_use, "
                "last_address = excluded.last_address",
                (token_claims["jti"], token_claims.get("sub", ""), token_claims.get("role", ""),
                 token_claims.get("reason", ""), token_claims.get("iat", now), token_claims.get("exp", now),
                 now, now, address))
            row = self._db.execute("SELECT revoked FROM override WHERE jti = ?", (token_claims["jti"],)).fetchone()
        return row is None or row[0] is None


def revoke(data: Path, jti: str) -> bool:
    """Revoke the break-glass token ``jti`` (its id, printed when it was minted); False if there is none live."""
    if not ledger_file(data).exists():
        return False
    with contextlib.closing(_ledger(data)) as db:
        done = db.execute("UPDATE override SET revoked = ? WHERE jti = ? AND revoked IS NULL", (time.time(), jti))
        return done.rowcount > 0


def overrides(data: Path) -> list[dict[str, Any]]:
    """Every break-glass token minted or used, newest first, each with ``active`` (not expired nor revoked)."""
    if not ledger_file(data).exists():
        return []
    now = time.time()
    with contextlib.closing(_ledger(data)) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM override ORDER BY issued DESC").fetchall()
    return [{**dict(r), "active": r["expires"] > now and r["revoked"] is None} for r in rows]
