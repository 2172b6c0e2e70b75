"""Node-local credentials: how a ``bastion`` command asks the server of the same data directory over HTTP
(``bastion index rebuild`` while the server runs) once ``[auth]`` is on.

Whoever can read the data directory can already do anything to the archive, so a command that can read
``<data>/auth/local-key.jwk`` (Ed25519, mode 0600, made on first use) signs itself a five-minute admin token with it
(``iss`` :data:`LOCAL_ISSUER`); the server checks it with the same key, offline. It is not a break-glass token:
it is not listed among the overrides, but its use is audited like any login (user ``<login name> (local)``).
"""

from __future__ import annotations

import getpass
import secrets
import time
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.jwk import KeySet, OKPKey

from bastion.auth.emergency import ALGORITHM, signing_key
from bastion.auth.principal import Principal
from bastion.auth.tokens import AuthenticationFailed, TokenCheck, verify_jwt

LOCAL_ISSUER = "urn:bastion:local"
#: The lifetime of a node-local token, seconds.
LIFETIME = 300


def local_key_file(data: Path) -> Path:
    """The key node-local tokens are signed with."""
    return data / "auth" / "local-key.jwk"


def local_token(data: Path, user: str | None = None) -> str:
    """A five-minute admin token for the server of the archive at ``data`` (its key made if needed)."""
    key = signing_key(data, create=True, path=local_key_file(data))
    assert key is not None
    now = int(time.time())
    claims = {"iss": LOCAL_ISSUER, "aud": LOCAL_ISSUER, "sub": f"{user or getpass.getuser()} (local)",
              "role": "admin", "jti": secrets.token_urlsafe(9), "iat": now, "nbf": now, "exp": now + LIFETIME}
    return jwt.encode({"alg": ALGORITHM, "kid": key.kid}, claims, key, algorithms=[ALGORITHM])


class LocalTokens:
    """The server's side: verifies node-local tokens with the archive's local key."""

    def __init__(self, data: Path, leeway: float) -> None:
        self.data, self.leeway = data, leeway
        self._key: OKPKey | None = None

    def verify(self, token: str) -> tuple[Principal, dict[str, Any]]:
        """The admin :class:`Principal` of a valid node-local token, and its claims."""
        if self._key is None:
            self._key = signing_key(self.data, create=False, path=local_key_file(self.data))
        if self._key is None:
            raise AuthenticationFailed("no node-local key on this archive")
        claims = verify_jwt(token, KeySet([self._key]), TokenCheck(LOCAL_ISSUER, LOCAL_ISSUER, (ALGORITHM,),
                                                                   self.leeway))
        if float(claims["exp"]) - float(claims.get("iat", 0)) > LIFETIME + 1:
            raise AuthenticationFailed("node-local token lives too long")
        return Principal(user=str(claims.get("sub", "")), role="admin", via="local"), claims
