"""What leaves the archive from a report: the printable PDF (``GET /api/reports/{id}/pdf``) and the HL7 outbox's
state (``GET /api/hl7``, ``POST /api/hl7/retry``), and the node's HL7 sender (:func:`start_hl7`, run by
``bastion serve``). docs/reporting.md, sections "HL7" and "Printable report".
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from bastion.archive import Archive
from bastion.errors import NotFound
from bastion.reporting import report as rpt
from bastion.reporting.hl7_outbox import DEAD, DELIVERED, PENDING, Outbox, open_outbox
from bastion.reporting.hl7_sender import Hl7Sender
from bastion.reporting.pdf import report_pdf
from bastion.reporting.store import ReportStore
from bastion.web.reporting import _errors, _int, _json, study_facts


def _facts(archive: Archive, study_uid: str) -> dict[str, str]:
    """The study's attributes, or none when the archive no longer holds it (the report's own fields stand)."""
    try:
        return study_facts(archive, study_uid)
    except (NotFound, rpt.ReportInvalid):
        return {}


async def start_hl7(archive: Archive) -> Hl7Sender | None:
    """The node's HL7 sender, started when ``hl7_receivers`` are configured (in the primary process only)."""
    settings = archive.settings
    if not settings.hl7_receivers:
        return None
    outbox = await asyncio.to_thread(open_outbox, settings.index_location, settings.data)
    sender = Hl7Sender(settings, archive.index, archive.blobs, outbox, lambda uid: study_facts(archive, uid))
    return await sender.start()


class _Outbox:
    """The outbox, opened on first use."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self._outbox: Outbox | None = None
        self._lock = threading.Lock()

    def get(self) -> Outbox:
        with self._lock:
            if self._outbox is None:
                self._outbox = open_outbox(self.archive.settings.index_location, self.archive.settings.data)
            return self._outbox


async def _post_only(request: Request) -> Response:
    return JSONResponse({"error": "POST only"}, status_code=405, headers={"Allow": "POST"})


def reporting_output_routes(archive: Archive) -> list[BaseRoute]:
    """The routes of the printable report and the HL7 outbox."""
    store = ReportStore(archive.blobs, archive.index)
    outbox = _Outbox(archive)
    settings = archive.settings

    def pdf_of(report_id: str) -> tuple[dict[str, Any], bytes]:
        doc = store.get(report_id)
        return doc, report_pdf(doc, _facts(archive, str(doc.get("study", ""))), settings.site_name,
                               settings.report_font)

    @_errors
    async def pdf(request: Request) -> Response:
        doc, data = await asyncio.to_thread(pdf_of, request.path_params["id"])
        name = f"report-{doc['id']}-v{doc['version']}.pdf"
        return Response(data, media_type="application/pdf",
                        headers={"Content-Disposition": f'inline; filename="{name}"'})

    @_errors
    async def hl7(request: Request) -> Response:
        state = request.query_params.get("state", "")
        if "state" in request.query_params and state not in (PENDING, DEAD, DELIVERED):  # given: one of them
            raise rpt.ReportInvalid(f"state must be one of {PENDING}, {DEAD}, {DELIVERED}")
        receiver = request.query_params.get("receiver", "")[:300]
        limit = _int(request, "limit", 100, 1000)

        def read() -> dict[str, Any]:
            box = outbox.get()
            stats = {s["receiver"]: s for s in box.stats()}
            for name in settings.hl7_receivers:
                stats.setdefault(name, {"receiver": name, "since": "", PENDING: 0, DELIVERED: 0, DEAD: 0,
                                        "last_error": ""})
            for name, entry in stats.items():
                entry["configured"] = name in settings.hl7_receivers
            return {"receivers": sorted(stats.values(), key=lambda s: str(s["receiver"])),
                    "messages": [m.to_json() for m in box.messages(state, receiver, limit)]}

        return JSONResponse(await asyncio.to_thread(read))

    @_errors
    async def retry(request: Request) -> Response:
        body = await _json(request)
        receiver = body.get("receiver", "")
        if not isinstance(receiver, str) or len(receiver) > 300:
            raise rpt.ReportInvalid('"receiver" must be a receiver (HOST:PORT), or absent for all')
        retried = await asyncio.to_thread(lambda: outbox.get().retry(receiver))
        return JSONResponse({"retried": retried})

    return [Route("/api/reports/{id}/pdf", pdf), Route("/api/hl7", hl7),
            Route("/api/hl7/retry", retry, methods=["POST"]),
            # A GET would otherwise reach the viewer's catch-all (404): it is 405, as for any other method.
            Route("/api/hl7/retry", _post_only, methods=["GET"])]
