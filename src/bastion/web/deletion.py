"""The deleted studies in the JSON API: ``GET /api/deleted`` lists the tombstones, ``POST
/api/studies/{study}/undelete`` restores a deleted study (admin only once ``[auth]`` is on;
:mod:`bastion.ingest.deletion`). Deleting is ``DELETE /dicom-web/studies/{study}``
(:mod:`bastion.dicomweb.deletion`); purging is ``bastion purge``, never the network.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from bastion.archive import Archive
from bastion.dicomweb.deletion import tombstone_step
from bastion.errors import BastionError


def deletion_routes(archive: Archive) -> list[BaseRoute]:
    """``GET /api/deleted`` and ``POST /api/studies/{study}/undelete``."""

    async def deleted(request: Request) -> JSONResponse:
        try:
            found = await asyncio.to_thread(archive.deletions.tombstones)
        except BastionError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.http_status)
        return JSONResponse({"deletion_delay_days": archive.settings.deletion_delay_days,
                             "studies": [t.to_json() for t in found]})

    async def undelete(request: Request) -> JSONResponse:
        return await tombstone_step(archive, request, "U", archive.deletions.undelete, "api")

    return [Route("/api/deleted", deleted), Route("/api/studies/{study}/undelete", undelete, methods=["POST"])]
