"""The authenticated party of a request, and the roles Bastion grants."""

from __future__ import annotations

from dataclasses import dataclass

#: The roles, least to most privileged in what they may change: ``viewer`` queries, retrieves and views;
#: ``uploader`` stores; ``admin`` configures, deletes, reads the audit log and manages queues.
ROLES = ("viewer", "uploader", "admin")


@dataclass(frozen=True)
class Principal:
    """Who made a request: ``user`` (a token's subject, an API key's name), their ``role``, how they proved it
    (``via``: "oidc", "apikey", "emergency", or "anonymous" when authentication is off) and, for a break-glass
    token, ``emergency`` with its ``reason``."""

    user: str
    role: str
    via: str
    emergency: bool = False
    reason: str = ""


#: The party of every request while ``[auth]`` is not enabled: it may do anything, as before authentication.
ANONYMOUS = Principal(user="anonymous", role="admin", via="anonymous")
