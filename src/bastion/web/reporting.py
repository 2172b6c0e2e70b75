"""The reporting JSON API under ``/api/templates`` and ``/api/reports`` (docs/reporting.md).

Drafts are kept by :class:`bastion.reporting.store.ReportStore`; signing and amending build a Basic Text SR
(:mod:`bastion.reporting.sr`) and store it through the one ingest path (``archive.ingest``, as STOW-RS does), so
QIDO-RS, C-FIND, WADO and the viewer show it and forwarding carries it; both are audited. Dictated audio is kept
beside the report and transcribed by the configured engine (:mod:`bastion.reporting.dictation`) in a thread.
Every error is a JSON ``{"error": ...}`` with its HTTP status.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from pydicom.datadict import tag_for_keyword
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from bastion.archive import Archive
from bastion.audit import AuditEvent, AuditKind, Outcome
from bastion.auth import ANONYMOUS, Principal, principal_in
from bastion.errors import BastionError, NotFound
from bastion.index.reports import ReportQuery
from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition, MatchType
from bastion.model.uids import is_identifiable_uid
from bastion.reporting import report as rpt
from bastion.reporting.dictation import Transcriber, open_transcriber
from bastion.reporting.intake import ReportIntake
from bastion.reporting.pdf import report_pdf
from bastion.reporting.seal import ReportKey
from bastion.reporting.signing import Signing
from bastion.reporting.sr import STUDY_KEYWORDS
from bastion.reporting.store import ReportStore
from bastion.reporting.templates import Template, load_templates

#: The ingest origin of a signed report's SR.
ORIGIN = "reporting"
#: The largest JSON body (bytes) and recording (bytes) a request may send.
MAX_JSON, MAX_AUDIO = 1 << 20, 64 << 20
AUDIO_TYPES = ("audio/wav", "audio/x-wav", "audio/wave", "audio/webm", "audio/ogg")
_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")
NOT_BLANK = rpt.NOT_BLANK
Handler = Callable[[Request], Awaitable[Response]]


class BodyTooLarge(BastionError):
    http_status = 413


def _text(value: dict[str, Any] | None) -> str:
    """A DICOM JSON attribute's first value as text (a person name's alphabetic form)."""
    values = (value or {}).get("Value") or [""]
    first = values[0]
    return str(first.get("Alphabetic", "") if isinstance(first, dict) else first)


def study_facts(archive: Archive, study_uid: str) -> dict[str, str]:
    """The study's attributes by keyword as the index answers a study query (PS3.4 C.6.2.1.2); NotFound if the
    archive holds no such study."""
    if not is_identifiable_uid(study_uid):
        raise rpt.ReportInvalid(f"{study_uid[:70]!r} is not a Study Instance UID")
    found = archive.index.find(QueryLevel.STUDY, [
        Condition("StudyInstanceUID", 0x0020000D, "UI", MatchType.SINGLE, (study_uid,))], limit=1)
    if not found:
        raise NotFound(f"no study {study_uid}")
    facts = {kw: _text(found[0].get(f"{tag_for_keyword(kw):08X}")) for kw in (*STUDY_KEYWORDS, "ModalitiesInStudy")}
    values = (found[0].get("00080061") or {}).get("Value") or []
    facts["ModalitiesInStudy"] = next((str(m) for m in values if m != "SR"), "")
    return facts


def _summary(facts: dict[str, str]) -> dict[str, str]:
    return {"study": facts["StudyInstanceUID"], "patient_id": facts["PatientID"],
            "patient_name": facts["PatientName"], "accession": facts["AccessionNumber"],
            "modality": facts["ModalitiesInStudy"], "study_date": facts["StudyDate"]}


def _principal(request: Request) -> Principal:
    return principal_in(request.scope)


async def _body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _json(request: Request) -> dict[str, Any]:
    try:
        raw = await _body(request, MAX_JSON)
    except BodyTooLarge:
        raise rpt.ReportInvalid(f"the JSON body is larger than {MAX_JSON} bytes") from None
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise rpt.ReportInvalid("the body is not JSON") from None
    if not isinstance(data, dict):
        raise rpt.ReportInvalid("the body must be a JSON object")
    return data


def _date(text: str, name: str) -> str:
    m = _DATE.fullmatch(text)
    if not m:
        raise rpt.ReportInvalid(f"{name} must be a date, YYYY-MM-DD or YYYYMMDD")
    return "".join(m.groups())


def _int(request: Request, name: str, default: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", raw) or int(raw) > hi:
        raise rpt.ReportInvalid(f"{name} must be an integer between 0 and {hi}")
    return int(raw)


def _errors(handler: Handler) -> Handler:
    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except BastionError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.http_status)
    return run


class ReportingApi:
    """The routes' state: the archive, its reports, the templates and the dictation engine (built on first use)."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.store = ReportStore(archive.blobs, archive.index)
        key = ReportKey(archive.blobs, archive.settings.report_key_file)
        settings = archive.settings
        printable = None
        if settings.report_encapsulated_pdf:
            def printable(doc: dict[str, Any], facts: dict[str, str]) -> bytes:
                return report_pdf(doc, facts, settings.site_name, settings.report_font)
        self.signing = Signing(self.store, ReportIntake(archive.blobs, archive.index, key),
                               lambda study: study_facts(archive, study),
                               lambda data: archive.ingest.store_bytes(data, ORIGIN), printable)
        self.templates: dict[str, Template] = load_templates(archive.settings.data)
        self._transcriber: Transcriber | None = None
        self._transcriber_lock = threading.Lock()

    def transcriber(self) -> Transcriber:
        with self._transcriber_lock:
            if self._transcriber is None:
                self._transcriber = open_transcriber(self.archive.settings)
            return self._transcriber

    def user(self, request: Request, body: dict[str, Any], required: bool = False) -> str:
        """Who acts: the principal when authentication is on; else the body's ``user`` (required to sign)."""
        if self.archive.settings.auth_enabled:
            return _principal(request).user
        user = body.get("user")
        if required and (not isinstance(user, str) or not re.search(NOT_BLANK, user)):
            raise rpt.ReportInvalid('"user" (who signs; authentication is off) is required and must not be empty')
        if isinstance(user, str) and re.search(NOT_BLANK, user):
            return (user.strip() or user)[:64]
        return ANONYMOUS.user

    def audit(self, request: Request, doc: dict[str, Any], action: str, detail: str,
              outcome: Outcome = Outcome.SUCCESS) -> None:
        principal = _principal(request)
        self.archive.audit.record(AuditEvent(
            kind=AuditKind.STORE, outcome=outcome, action=action, user=principal.user, role=principal.role,
            address=request.client.host if request.client else "", via="api", patient_id=str(doc.get("patient_id", "")),
            studies=(str(doc.get("study", "")),), count=1, detail=detail, emergency=principal.emergency))

    def sign(self, report_id: str, user: str) -> dict[str, Any]:
        """Sign: the SR carrying the signed version is stored, then the version kept (reporting/signing.py)."""
        return self.signing.sign(report_id, user)

    def amend(self, report_id: str, sections: object, reason: object, user: str) -> dict[str, Any]:
        return self.signing.amend(report_id, sections, reason, user)

    def dictate(self, report_id: str, audio: bytes, content_type: str, user: str) -> dict[str, Any]:
        rpt.check_signable(self.store.get(report_id))
        transcript = self.transcriber().transcribe(audio, content_type)
        audio_id = self.store.put_audio(report_id, audio)
        entry = {"id": audio_id, "seconds": round(transcript.seconds, 3), "content_type": content_type,
                 "engine": transcript.engine, "transcript": transcript.text, "at": rpt.now_iso(), "user": user}
        doc = self.store.change(report_id, lambda d: rpt.with_dictation(d, transcript.text, entry, user))
        return {"audio": audio_id, "transcript": transcript.text, "seconds": entry["seconds"],
                "engine": transcript.engine, "report": doc}


def reporting_routes(archive: Archive, api: ReportingApi | None = None) -> list[BaseRoute]:
    """The routes of the reporting API (``api``: the state they share with other routes, made if not given)."""
    api = api or ReportingApi(archive)

    @_errors
    async def templates(request: Request) -> Response:
        return JSONResponse({"templates": [t.to_json() for t in api.templates.values()]})

    @_errors
    async def reports(request: Request) -> Response:
        if request.method == "POST":
            body = await _json(request)
            study, name = body.get("study"), body.get("template")
            if not isinstance(study, str) or not isinstance(name, str):
                raise rpt.ReportInvalid('{"study": Study Instance UID, "template": name} is required')
            template = api.templates.get(name)
            if template is None:
                raise NotFound(f"no template {name!r}: GET /api/templates lists them")
            facts = await asyncio.to_thread(study_facts, archive, study)
            doc = await asyncio.to_thread(api.store.create, _summary(facts), template, api.user(request, body))
            return JSONResponse(doc, status_code=201)
        params = request.query_params
        state = params.get("state", "")
        if "state" in params and state not in rpt.STATES:
            raise rpt.ReportInvalid(f"state must be one of {', '.join(rpt.STATES)}")
        query = ReportQuery(state=state, modality=params.get("modality", "")[:16], study=params.get("study", "")[:64],
                            patient_id=params.get("patient", "")[:64],
                            date_from=_date(params["from"], "from") if "from" in params else "",
                            date_to=_date(params["to"], "to") if "to" in params else "",
                            text=params.get("q", "")[:64], limit=_int(request, "limit", 100, 1000),
                            offset=_int(request, "offset", 0, 10_000_000))
        return JSONResponse({"reports": await asyncio.to_thread(api.store.search, query)})

    @_errors
    async def one(request: Request) -> Response:
        report_id = request.path_params["id"]
        if request.method == "PUT":
            body = await _json(request)
            user = api.user(request, body)
            doc = await asyncio.to_thread(api.store.change, report_id, lambda d: rpt.edited(
                d, body.get("sections", {}), body.get("version"), user, body.get("state")))
            return JSONResponse(doc)
        return JSONResponse(await asyncio.to_thread(api.store.get, report_id))

    @_errors
    async def sign(request: Request) -> Response:
        body = await _json(request)
        report_id = request.path_params["id"]
        await asyncio.to_thread(api.store.get, report_id)  # an unknown report: 404 whatever the body
        user = api.user(request, body, required=True)
        try:
            doc = await asyncio.to_thread(api.sign, report_id, user)
        except BastionError as exc:
            if not isinstance(exc, NotFound | rpt.ReportInvalid):
                api.audit(request, {"study": ""}, "C", f"report {report_id} not signed: {exc.message}",
                          Outcome.MINOR_FAILURE)
            raise
        api.audit(request, doc, "C", f"report {doc['id']} signed by {user} (version {doc['version']}), "
                                     f"SR {doc['sr'][-1]}")
        return JSONResponse(doc)

    @_errors
    async def amend(request: Request) -> Response:
        body = await _json(request)
        user = api.user(request, body)
        report_id = request.path_params["id"]
        doc = await asyncio.to_thread(api.amend, report_id, body.get("sections", {}), body.get("reason"), user)
        api.audit(request, doc, "U", f"report {doc['id']} amended by {user} (version {doc['version']}): "
                                     f"{doc['reason']}; SR {doc['sr'][-1]} replaces {doc['sr'][-2]}")
        return JSONResponse(doc)

    @_errors
    async def audio(request: Request) -> Response:
        report_id = request.path_params["id"]
        if request.method == "GET":
            doc = await asyncio.to_thread(api.store.get, report_id)
            return JSONResponse({"audio": doc.get("audio", [])})
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in AUDIO_TYPES:
            return JSONResponse({"error": f"Content-Type must be one of {', '.join(AUDIO_TYPES)}"}, status_code=415)
        data = await _body(request, MAX_AUDIO)
        await asyncio.to_thread(api.store.get, report_id)  # 404 first
        if not data:
            raise rpt.ReportInvalid("the body (the recording) is empty")
        user = api.user(request, {})
        answer = await asyncio.to_thread(api.dictate, report_id, data, content_type, user)
        return JSONResponse(answer, status_code=201)

    @_errors
    async def recording(request: Request) -> Response:
        report_id, audio_id = request.path_params["id"], request.path_params["audio"]
        data = await asyncio.to_thread(api.store.audio, report_id, audio_id)
        doc = await asyncio.to_thread(api.store.get, report_id)
        kind = next((str(a.get("content_type")) for a in doc["audio"] if a.get("id") == audio_id), "audio/wav")
        return Response(data, media_type=kind)

    return [Route("/api/templates", templates), Route("/api/reports", reports, methods=["GET", "POST"]),
            Route("/api/reports/{id}", one, methods=["GET", "PUT"]),
            Route("/api/reports/{id}/sign", sign, methods=["POST"]),
            Route("/api/reports/{id}/amend", amend, methods=["POST"]),
            Route("/api/reports/{id}/audio", audio, methods=["GET", "POST"]),
            Route("/api/reports/{id}/audio/{audio}", recording)]
