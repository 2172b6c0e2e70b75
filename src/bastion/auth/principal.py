"""The authenticated party of a request, and the roles Bastion grants."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The roles, least to most privileged in what they may change: ``viewer`` queries, retrieves and views;
#: ``uploader`` stores; ``typist`` types rejected dictation from the typing queue (its recordings only);
#: ``radiologist`` writes, signs and amends reports (and reads them; images need ``viewer`` too); ``admin``
#: configures, deletes, reads the audit log and manages queues. ``uploader`` does not include ``viewer`` (a
#: modality may store but not read); ``admin`` may do everything.
ROLES = ("viewer", "uploader", "typist", "radiologist", "admin")


@dataclass(frozen=True)
class Principal:
    """Who made a request: ``user`` (a token's subject, an API key's name), their ``role``, how they proved it
    (``via``: "oidc", "apikey", "emergency", or "anonymous" when authentication is off) and, for a break-glass
    token, ``emergency`` with its ``reason``.

    ``role`` is the most privileged role held; ``roles`` all of them (a token may grant ``viewer`` and
    ``uploader``); it defaults to ``(role,)``.
    """

    user: str
    role: str
    via: str
    emergency: bool = False
    reason: str = ""
    roles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.roles:
            object.__setattr__(self, "roles", (self.role,))

    def may(self, role: str) -> bool:
        """Whether this party may do what ``role`` may: an admin may do everything, others what their roles grant."""
        return "admin" in self.roles or role in self.roles


def strongest(roles: object) -> tuple[str, ...]:
    """The Bastion roles among ``roles`` (a list, or a space- or comma-separated string), most privileged first."""
    if isinstance(roles, str):
        roles = roles.replace(",", " ").split()
    held = {str(r) for r in roles} if isinstance(roles, list | tuple | set | frozenset) else set()
    return tuple(r for r in reversed(ROLES) if r in held)


#: The party of every request while ``[auth]`` is not enabled: it may do anything, as before authentication.
ANONYMOUS = Principal(user="anonymous", role="admin", via="anonymous")


#: Where the HTTP authentication middleware (:mod:`bastion.web.access`) keeps a request's principal in its ASGI
#: scope.
SCOPE_KEY = "bastion.principal"


def principal_in(scope: Mapping[str, Any]) -> Principal:
    """The principal of the request whose ASGI ``scope`` this is (:data:`ANONYMOUS` while authentication is off)."""
    found = scope.get(SCOPE_KEY, ANONYMOUS)
    return found if isinstance(found, Principal) else ANONYMOUS
