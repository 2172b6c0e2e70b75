"""``POST /api/studies/{study}/export``: a study as a ZIP of DICOM Part 10 files, as stored or de-identified.

The same output as ``bastion export --zip`` (:mod:`bastion.query.export`), streamed as it is made: one instance
in memory at a time, the report (``export-report.json``) last. Admin only. Every export is audited (PS3.15
A.5.3.4), with a failure outcome when the stream did not finish (a read error, the client gone).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bastion.archive import Archive
from bastion.audit import AuditEvent, AuditKind, Outcome
from bastion.auth import Principal, principal_in
from bastion.errors import BastionError
from bastion.model.records import InstanceRecord
from bastion.query.deidentify import Deidentifier, load_secret
from bastion.query.export import Exporter, zip_stream

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no", "")


def _flag(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{name} must be true or false")


def export_route(archive: Archive) -> Route:
    """The export route of ``archive``."""

    async def export(request: Request) -> Response:
        principal = principal_in(request.scope)
        if not principal.may("admin"):
            return JSONResponse({"error": "exporting a study is for the admin role"}, status_code=403)
        try:
            deidentify = _flag(request, "deidentify")
            include_burned_in = _flag(request, "include_burned_in")
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        study = request.path_params["study"]
        try:
            secret = await asyncio.to_thread(load_secret, archive.settings.data) if deidentify else None
        except (OSError, ValueError) as exc:
            return JSONResponse({"error": f"the de-identification secret: {exc}"}, status_code=500)
        exporter = Exporter(archive.retriever, Deidentifier(secret) if secret is not None else None,
                            include_burned_in=include_burned_in)
        try:
            records = await asyncio.to_thread(exporter.study_records, study)
        except BastionError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.http_status)
        address = request.client.host if request.client else ""
        name = f"{study}{'-deidentified' if deidentify else ''}.zip"  # a UID: digits and dots only
        return StreamingResponse(_body(archive, exporter, records, study, principal, address),
                                 media_type="application/zip",
                                 headers={"Content-Disposition": f'attachment; filename="{name}"'})

    return Route("/api/studies/{study}/export", export, methods=["POST"])


def _body(archive: Archive, exporter: Exporter, records: list[InstanceRecord], study: str, principal: Principal,
          address: str) -> Iterator[bytes]:
    """The ZIP's bytes (starlette iterates a plain iterator in its thread pool); audited when done or broken."""
    outcome = Outcome.SERIOUS_FAILURE
    try:
        yield from zip_stream(exporter.entries(records), exporter.report)
        outcome = Outcome.SUCCESS
    finally:
        patient, count = exporter.report.per_study.get(study, ("", 0))
        archive.audit.record(AuditEvent(
            kind=AuditKind.EXPORT, outcome=outcome, action="R", user=principal.user, role=principal.role,
            address=address, destination="http", via="api", patient_id=patient, studies=(study,), count=count,
            detail="deidentified" if exporter.report.deidentified else "identified", emergency=principal.emergency))
