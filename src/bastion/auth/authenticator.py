"""From presented credentials to a :class:`~bastion.auth.principal.Principal`: OIDC bearer tokens
(:mod:`bastion.auth.tokens`), API keys (:mod:`bastion.auth.apikeys`), break-glass tokens
(:mod:`bastion.auth.emergency`) and node-local command tokens (:mod:`bastion.auth.local`).

A verified token is remembered by its SHA-256 until it expires, so a request whose token was seen before costs a
hash and a dictionary look-up (:meth:`Authenticator.cached`); the first sight of a token verifies its signature
and may fetch the issuer's keys (:meth:`Authenticator.authenticate`, blocking: call it off the event loop).
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bastion.auth.apikeys import PREFIX, ApiKeyStore
from bastion.auth.emergency import EMERGENCY_ISSUER, EmergencyTokens
from bastion.auth.jwks import JwksSource
from bastion.auth.local import LOCAL_ISSUER, LocalTokens
from bastion.auth.principal import Principal
from bastion.auth.tokens import AuthenticationFailed, TokenCheck, principal_from, unverified_parts, verify_jwt
from bastion.settings import Settings

#: Verified tokens remembered at most (past it, expired ones are dropped, then the oldest).
MAX_CACHED = 20_000
#: An API key is looked up again after this many seconds (a revocation takes effect within it).
KEY_CACHE_SECONDS = 1.0


@dataclass(frozen=True)
class Verified:
    """A credential found good: who it is, until when, and (break-glass) its claims."""

    principal: Principal
    expires: float
    digest: str
    claims: dict[str, Any] = field(default_factory=dict)


class Authenticator:
    """Checks credentials for one server, with the settings' issuer, keys, API keys and break-glass key."""

    def __init__(self, settings: Settings) -> None:
        auth_dir = settings.data / "auth"
        self.check = TokenCheck(settings.auth_issuer, settings.auth_audience, settings.auth_algorithms,
                                settings.auth_leeway, settings.auth_role_claim, settings.auth_user_claim)
        self.jwks = JwksSource(settings.auth_jwks_url, settings.auth_jwks_file, auth_dir / "jwks.json",
                               settings.auth_jwks_refresh)
        self.keys = ApiKeyStore(settings.data)
        self.emergency = EmergencyTokens(settings.data, settings.auth_emergency_max_hours, settings.auth_leeway)
        self.local = LocalTokens(settings.data, settings.auth_leeway)
        self._cache: dict[str, Verified] = {}
        self._lock = threading.Lock()

    @staticmethod
    def digest(credential: str) -> str:
        """The SHA-256 a credential is remembered by."""
        return hashlib.sha256(credential.encode()).hexdigest()

    def cached(self, credential: str, now: float | None = None) -> Verified | None:
        """The credential's earlier verification, if it still holds (no signature check, no I/O)."""
        found = self._cache.get(self.digest(credential))
        if found is None:
            return None
        if found.expires <= (time.time() if now is None else now):
            self._cache.pop(found.digest, None)
            return None
        return found

    def authenticate(self, credential: str) -> Verified:
        """Verify a credential (an API key, a break-glass token or an OIDC token); raises
        :class:`~bastion.auth.tokens.AuthenticationFailed`. May block on the issuer's JWKS."""
        digest = self.digest(credential)
        now = time.time()
        if credential.startswith(PREFIX):
            principal = self.keys.principal(credential)
            if principal is None:
                raise AuthenticationFailed("unknown or revoked API key")
            return self._remember(Verified(principal, now + KEY_CACHE_SECONDS, digest))
        header, claims = unverified_parts(credential)
        if claims.get("iss") == LOCAL_ISSUER:
            principal, verified = self.local.verify(credential)
            return self._remember(Verified(principal, float(verified["exp"]), digest))
        if claims.get("iss") == EMERGENCY_ISSUER:
            principal, verified = self.emergency.verify(credential)
            return self._remember(Verified(principal, float(verified["exp"]), digest, verified))
        if not self.check.issuer:
            raise AuthenticationFailed("no identity provider is configured")
        kid = header.get("kid")
        keys = self.jwks.current(kid if isinstance(kid, str) else None)
        if not keys.keys:
            raise AuthenticationFailed("the identity provider's keys are not available")
        verified = verify_jwt(credential, keys, self.check, now)
        principal = principal_from(verified, self.check)
        return self._remember(Verified(principal, float(verified["exp"]) + self.check.leeway, digest))

    def forget(self, verified: Verified) -> None:
        """Drop a credential's verification (a revoked break-glass token)."""
        self._cache.pop(verified.digest, None)

    def _remember(self, verified: Verified) -> Verified:
        with self._lock:
            if len(self._cache) >= MAX_CACHED:
                now = time.time()
                for key in [k for k, v in self._cache.items() if v.expires <= now]:
                    del self._cache[key]
                while len(self._cache) >= MAX_CACHED:
                    del self._cache[next(iter(self._cache))]
            self._cache[verified.digest] = verified
        return verified
