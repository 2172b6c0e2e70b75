"""FHIR R4 read access to the reports: ``GET /fhir/DiagnosticReport`` (search by ``patient``, ``study``, ``status``,
``_count``) and ``GET /fhir/DiagnosticReport/{id}`` (:mod:`bastion.reporting.fhir`)."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from bastion.archive import Archive
from bastion.errors import BastionError
from bastion.index.base import Index
from bastion.index.reports import ReportQuery
from bastion.reporting.fhir import STATUS, diagnostic_report, searchset
from bastion.reporting.store import ReportStore

FHIR_JSON = "application/fhir+json"
_STATE_OF = {status: state for state, status in STATUS.items()}


def _outcome(status: int, message: str, code: str = "invalid") -> Response:
    """A FHIR OperationOutcome (https://hl7.org/fhir/R4/operationoutcome.html)."""
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": message}]}
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


def _search(index: Index, params: dict[str, str]) -> list[dict[str, Any]]:
    patient = params.get("patient", "")
    patient = patient.split("/", 1)[1] if patient.startswith("Patient/") else patient
    study = params.get("study", "").removeprefix("urn:oid:")
    state = _STATE_OF.get(params.get("status", ""), "")
    count = int(params["_count"][:9]) if params.get("_count") else 100
    rows = index.reports(ReportQuery(patient_id=patient[:64], study=study[:64], state=state, limit=min(count, 1000)))
    return [row.document() for row in rows]


def fhir_routes(archive: Archive) -> list[BaseRoute]:
    store = ReportStore(archive.blobs, archive.index)

    async def search(request: Request) -> Response:
        params = dict(request.query_params)
        if "status" in params and params["status"] not in _STATE_OF:
            return _outcome(400, f"status must be one of {', '.join(_STATE_OF)}")
        if "_count" in params and not (params["_count"].isascii() and params["_count"].isdigit()):
            return _outcome(400, "_count must be a non-negative integer")
        try:
            docs = await asyncio.to_thread(_search, archive.index, params)
        except BastionError as exc:
            return _outcome(exc.http_status, exc.message, "exception")
        base = str(request.base_url).rstrip("/") + "/fhir"
        return JSONResponse(searchset(docs, base), media_type=FHIR_JSON)

    async def read(request: Request) -> Response:
        try:
            doc = await asyncio.to_thread(store.get, request.path_params["id"])
        except BastionError as exc:
            return _outcome(exc.http_status, exc.message, "not-found" if exc.http_status == 404 else "exception")
        return JSONResponse(diagnostic_report(doc), media_type=FHIR_JSON)

    return [Route("/fhir/DiagnosticReport", search), Route("/fhir/DiagnosticReport/{id}", read)]
