"""The typing queue (docs/reporting.md, "Typing queue"): rejected transcriptions that a typist types from the audio.

``POST /api/reports/{id}/audio/{audio}/reject`` (radiologist) marks a recording's transcription rejected;
``GET /api/typing`` lists the rejected recordings of open reports, oldest first; ``GET /api/typing/{report}/{audio}``
plays one of them; ``POST /api/typing/{report}/{audio}`` appends the typed text to the draft's ``dictation``
section. The queue is derived from the reports' latest versions (:func:`bastion.reporting.report.typing_queue`), so
it has no store of its own and comes back with the reports after an index rebuild.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from bastion.errors import NotFound
from bastion.index.reports import ReportQuery
from bastion.reporting import report as rpt
from bastion.reporting.store import ReportStore
from bastion.web.reporting import ReportingApi, _errors, _json

#: Reports read from the index per page while the queue is gathered.
PAGE = 1000


def queued(store: ReportStore) -> list[dict[str, Any]]:
    """The typing queue: every open report read from the index, its rejected, untyped recordings."""
    docs: list[dict[str, Any]] = []
    for state in rpt.OPEN:
        offset = 0
        while True:
            page = store.search(ReportQuery(state=state, limit=PAGE, offset=offset))
            docs += page
            if len(page) < PAGE:
                break
            offset += PAGE
    unique = {str(d["id"]): d for d in docs}  # a report that moved between pages while they were read
    return rpt.typing_queue(list(unique.values()))


def _in_queue(store: ReportStore, report_id: str, audio_id: str) -> dict[str, Any]:
    """The queue's item for ``audio_id`` of ``report_id``; NotFound if it is not waiting to be typed."""
    for item in rpt.typing_queue([store.get(report_id)]):
        if item["audio"] == audio_id:
            return item
    raise NotFound(f"recording {audio_id} of report {report_id} is not in the typing queue")


def typing_routes(api: ReportingApi) -> list[BaseRoute]:
    """The routes of rejecting a transcription and of the typing queue."""
    store = api.store

    @_errors
    async def reject(request: Request) -> Response:
        report_id, audio_id = request.path_params["id"], request.path_params["audio"]
        user = api.user(request, await _json(request))
        doc = await asyncio.to_thread(store.change, report_id, lambda d: rpt.rejected(d, audio_id, user))
        api.audit(request, doc, "U", f"report {report_id}: the transcription of recording {audio_id} rejected by "
                                     f"{user} (version {doc['version']}); it goes to the typing queue")
        return JSONResponse(doc)

    @_errors
    async def queue(request: Request) -> Response:
        return JSONResponse({"queue": await asyncio.to_thread(queued, store)})

    @_errors
    async def item(request: Request) -> Response:
        report_id, audio_id = request.path_params["report"], request.path_params["audio"]
        if request.method == "GET":
            found = await asyncio.to_thread(_in_queue, store, report_id, audio_id)
            data = await asyncio.to_thread(store.audio, report_id, audio_id)
            return Response(data, media_type=str(found["content_type"]) or "application/octet-stream")
        body = await _json(request)
        text, user = rpt.checked_typing(body.get("text")), api.user(request, body)
        doc = await asyncio.to_thread(store.change, report_id, lambda d: rpt.typed(d, audio_id, text, user))
        api.audit(request, doc, "U", f"report {report_id}: recording {audio_id} typed by {user} "
                                     f"(version {doc['version']})")
        return JSONResponse(doc)

    return [Route("/api/reports/{id}/audio/{audio}/reject", reject, methods=["POST"]),
            Route("/api/typing", queue),
            Route("/api/typing/{report}/{audio}", item, methods=["GET", "POST"])]
