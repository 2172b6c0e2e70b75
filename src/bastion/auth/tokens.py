"""Bearer tokens: OpenID Connect access tokens (JWT, RFC 7519) checked against the issuer's keys.

A token is accepted when its JWS signature (RFC 7515) verifies with a key of the issuer's JWKS under an allowed
asymmetric algorithm (never ``none``, never HS*), its ``iss`` is the configured issuer, its ``aud`` names the
configured audience, and ``exp`` / ``nbf`` / ``iat`` hold within ``auth_leeway`` seconds. Verification is done by
joserfc; nothing here is cryptography of its own.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from bastion.auth.principal import Principal, strongest


class AuthenticationFailed(Exception):
    """Credentials were presented but are not good; ``reason`` says why, in words safe to show the client."""

    def __init__(self, reason: str, user: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.user = user


@dataclass(frozen=True)
class TokenCheck:
    """What a token must satisfy."""

    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    leeway: float
    role_claim: str = "roles"
    user_claim: str = "preferred_username"


def unverified_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A compact JWS's header and claims, *not verified*: only to choose the key and the checks to apply."""
    try:
        head, body, _sig = token.split(".")
        return _b64json(head), _b64json(body)
    except (ValueError, TypeError, RecursionError) as exc:  # RecursionError: JSON nested past Python's limit
        raise AuthenticationFailed("the bearer token is not a JWT") from exc


def _b64json(part: str) -> dict[str, Any]:
    value = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def claim_at(claims: dict[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` (``realm_access.roles``) in ``claims``, or None."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def verify_jwt(token: str, keys: KeySet, check: TokenCheck, now: float | None = None) -> dict[str, Any]:
    """The claims of ``token`` once its signature, issuer, audience and times are checked (RFC 7519 section 7.2);
    raises :class:`AuthenticationFailed` saying which check failed."""
    header, _ = unverified_parts(token)
    alg = header.get("alg")
    if alg not in check.algorithms:
        raise AuthenticationFailed(f"token algorithm {alg!r} is not allowed")
    try:
        decoded = jwt.decode(token, keys, algorithms=list(check.algorithms))
    except JoseError as exc:
        raise AuthenticationFailed(f"token signature not valid ({exc.error})") from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise AuthenticationFailed(f"token not valid ({exc})") from exc
    claims = dict(decoded.claims)
    now = time.time() if now is None else now
    if claims.get("iss") != check.issuer:
        raise AuthenticationFailed("token from another issuer")
    aud = claims.get("aud")
    if not (aud == check.audience or (isinstance(aud, list) and check.audience in aud)):
        raise AuthenticationFailed("token for another audience")
    exp = claims.get("exp")
    if not isinstance(exp, int | float):
        raise AuthenticationFailed("token has no expiry (exp)")
    if now > exp + check.leeway:
        raise AuthenticationFailed("token expired")
    for name in ("nbf", "iat"):
        value = claims.get(name)
        if value is not None and (not isinstance(value, int | float) or value > now + check.leeway):
            raise AuthenticationFailed(f"token not valid yet ({name})")
    return claims


def principal_from(claims: dict[str, Any], check: TokenCheck) -> Principal:
    """The :class:`Principal` a verified token names: its user claim (else ``sub``) and its Bastion roles (none:
    role ``""``, which may do nothing)."""
    user = str(claims.get(check.user_claim) or claims.get("sub") or "")
    roles = strongest(claim_at(claims, check.role_claim) or [])
    # A token that grants no Bastion role authenticates its user, who may then do nothing (403, not 401).
    return Principal(user=user, role=roles[0] if roles else "", via="oidc", roles=roles)
