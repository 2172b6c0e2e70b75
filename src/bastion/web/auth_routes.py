"""The authentication routes of ``/api``: how to log in (``/api/auth/config``), who am I (``/api/whoami``) and the
break-glass overrides for review (``/api/emergency``, admin)."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from bastion.archive import Archive
from bastion.auth.emergency import overrides
from bastion.web.access import principal_of

#: What the viewer and the admin page ask for at login (OpenID Connect Core 1.0, section 3.1.2.1).
LOGIN_SCOPE = "openid profile"


def routes(archive: Archive) -> list[BaseRoute]:
    """``/api/auth/config``, ``/api/whoami`` and ``/api/emergency``."""
    s = archive.settings

    async def config(request: Request) -> JSONResponse:
        return JSONResponse({"enabled": s.auth_enabled, "issuer": s.auth_issuer or None,
                             "client_id": s.auth_client_id or None, "scope": LOGIN_SCOPE})

    async def whoami(request: Request) -> JSONResponse:
        p = principal_of(request)
        return JSONResponse({"user": p.user, "role": p.role, "roles": list(p.roles), "via": p.via,
                             "emergency": p.emergency, "reason": p.reason or None})

    async def emergency(request: Request) -> JSONResponse:
        rows = await asyncio.to_thread(overrides, s.data)
        return JSONResponse({"overrides": rows, "active": sum(1 for r in rows if r["active"])})

    return [Route("/api/auth/config", config), Route("/api/whoami", whoami), Route("/api/emergency", emergency)]
