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
from bastion.audit import Outcome
from bastion.dicomweb.deletion import audited, principal, reason_of
from bastion.errors import BastionError
from bastion.model.uids import is_identifiable_uid


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
        study = request.path_params["study"]
        if not is_identifiable_uid(study):
            return JSONResponse({"error": f"{study[:70]!r} is not a Study Instance UID"}, status_code=400)
        try:
            reason = await reason_of(request)
            who = principal(request)
            tombstone = await asyncio.to_thread(
                archive.deletions.undelete, study, reason=reason, user=who.user, role=who.role, via="api",
                address=request.client.host if request.client else "")
        except BastionError as exc:
            audited(archive, request, "U", study, reason=exc.message, outcome=Outcome.MINOR_FAILURE, via="api")
            return JSONResponse({"error": exc.message}, status_code=exc.http_status)
        audited(archive, request, "U", study, patient_id=tombstone.patient_id, count=tombstone.count,
                reason=reason, via="api")
        return JSONResponse(tombstone.to_json())

    return [Route("/api/deleted", deleted), Route("/api/studies/{study}/undelete", undelete, methods=["POST"])]
