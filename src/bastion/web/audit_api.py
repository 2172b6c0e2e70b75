"""``GET /api/audit`` (the newest audit entries) and ``GET /api/audit/verify`` (the chain's check), admin only.

Reading the audit log is itself an access to patient data; it is for the ``admin`` role (the access middleware
enforces it when ``[auth]`` is on; these handlers check it again).
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.archive import Archive
from bastion.audit import AuditKind
from bastion.audit.chain import Verdict, consistent, since_key, verify
from bastion.auth import principal_in

#: The most entries one request returns.
MAX_LIMIT = 1000


def _admin(request: Request) -> bool:
    return principal_in(request.scope).may("admin")


def audit_routes(archive: Archive) -> list[Route]:
    """The audit routes of ``archive``."""

    async def entries(request: Request) -> JSONResponse:
        if not _admin(request):
            return JSONResponse({"error": "the audit log is for the admin role"}, status_code=403)
        params = request.query_params
        kind = params.get("kind")
        if kind is not None and kind not in {k.value for k in AuditKind}:  # absent: every kind; empty: not a kind
            return JSONResponse({"error": f"kind must be one of {', '.join(k.value for k in AuditKind)}"},
                                status_code=400)
        try:
            limit = int(params.get("limit", "100"))
        except ValueError:
            limit = -1
        if not 1 <= limit <= MAX_LIMIT:
            return JSONResponse({"error": f"limit must be an integer between 1 and {MAX_LIMIT}"}, status_code=400)
        try:
            since = since_key(params.get("since", ""))
        except ValueError as exc:
            return JSONResponse({"error": f"since: {exc}"}, status_code=400)
        found = await asyncio.to_thread(archive.audit.recent, limit, kind=kind or "", since=since)
        return JSONResponse({"entries": found, "count": len(found), "limit": limit})

    async def check(request: Request) -> JSONResponse:
        if not _admin(request):
            return JSONResponse({"error": "the audit log is for the admin role"}, status_code=403)
        directory = archive.audit.directory
        if directory is None:  # kept in memory: sealed as it was made
            n = len(archive.audit.memory)
            return JSONResponse(Verdict(entries=n, last_seq=n).as_json())

        def run() -> Verdict:
            with consistent(directory):
                return verify(directory)

        return JSONResponse((await asyncio.to_thread(run)).as_json())

    return [Route("/api/audit", entries), Route("/api/audit/verify", check)]
