"""``DELETE /dicom-web/studies/{study}``: delete (tombstone and hide) a study (:mod:`bastion.ingest.deletion`).

Not part of PS3.18's DICOMweb services: Bastion's own, beside them (admin only once ``[auth]`` is on). The reason
comes from the ``reason`` query parameter or a JSON body ``{"reason": "..."}``. Answers 200 with the tombstone as
JSON, 404 for a study the archive does not hold, 409 for one deleted already; the deletion is audited (PS3.15
A.5.3.5 DICOM Instances Accessed, action D).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bastion.archive import Archive
from bastion.audit import AuditEvent, AuditKind, Outcome
from bastion.auth import Principal, principal_in
from bastion.errors import BastionError, InvalidQuery
from bastion.ingest.deletion import Tombstone
from bastion.model.uids import is_identifiable_uid

#: The longest reason kept (longer ones are cut).
MAX_REASON = 1000


def principal(request: Request) -> Principal:
    """The party that made ``request`` (ANONYMOUS while authentication is off)."""
    return principal_in(request.scope)


async def reason_of(request: Request) -> str:
    """The ``reason`` query parameter, else the ``reason`` of a JSON body, else ``""``; InvalidQuery for a body
    that is not a JSON object with a text reason."""
    reason = request.query_params.get("reason")
    if reason is None:
        body = await request.body()
        if body.strip():
            try:
                parsed = json.loads(body)
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
                raise InvalidQuery("the body must be JSON: {\"reason\": \"...\"}") from exc
            if not isinstance(parsed, dict) or not isinstance(parsed.get("reason", ""), str):
                raise InvalidQuery("the body must be a JSON object with a text \"reason\"")
            reason = parsed.get("reason", "")
    return (reason or "").strip()[:MAX_REASON]


def audited(archive: Archive, request: Request, action: str, study: str, *, patient_id: str = "", count: int = 0,
            reason: str = "", outcome: Outcome = Outcome.SUCCESS, via: str = "dicomweb") -> None:
    """Record a deletion step (``action`` D or U) in the audit trail."""
    who = principal(request)
    archive.audit.record(AuditEvent(kind=AuditKind.DELETE, outcome=outcome, action=action, user=who.user,
                                    role=who.role, address=request.client.host if request.client else "", via=via,
                                    patient_id=patient_id, studies=(study,), count=count, detail=reason,
                                    emergency=who.emergency))


async def tombstone_step(archive: Archive, request: Request, action: str,
                         step: Callable[..., Tombstone], via: str) -> JSONResponse:
    """One step of a study's deletion over HTTP (``step``: delete, action D, or undelete, action U): the study UID
    checked (400), the reason read, the step run in a thread, audited whether it succeeds or not; the tombstone as
    JSON, or the error's status with its message."""
    study = request.path_params["study"]
    if not is_identifiable_uid(study):
        return JSONResponse({"error": f"{study[:70]!r} is not a Study Instance UID"}, status_code=400)
    try:
        reason = await reason_of(request)
        who = principal(request)
        tombstone = await asyncio.to_thread(step, study, reason=reason, user=who.user, role=who.role, via=via,
                                            address=request.client.host if request.client else "")
    except BastionError as exc:
        audited(archive, request, action, study, reason=exc.message, outcome=Outcome.MINOR_FAILURE, via=via)
        return JSONResponse({"error": exc.message}, status_code=exc.http_status)
    audited(archive, request, action, study, patient_id=tombstone.patient_id, count=tombstone.count, reason=reason,
            via=via)
    return JSONResponse(tombstone.to_json())


async def delete_study(archive: Archive, request: Request) -> Response:
    """The handler (see the module docstring)."""
    return await tombstone_step(archive, request, "D", archive.deletions.delete, "dicomweb")
