"""The ASGI application: ``/health``, ``/api``, ``/admin``, ``/dicom-web``, ``/wado`` and the viewer at ``/``.

Request bodies have a deadline (``http_body_timeout``, :class:`~bastion.web.timeouts.BodyDeadline`); the request
head's deadline is the server protocol's (:func:`~bastion.web.timeouts.header_deadline_protocol`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from bastion import __version__
from bastion.archive import Archive
from bastion.auth.authenticator import Authenticator
from bastion.dicomweb.routes import routes as dicomweb_routes
from bastion.ingest.online_rebuild import OnlineRebuild
from bastion.web import admin, api, auth_routes, reporting_pages, viewer
from bastion.web.access import AccessControl
from bastion.web.fhir import fhir_routes
from bastion.web.reading_list import reading_list_routes
from bastion.web.reporting import ReportingApi, reporting_routes
from bastion.web.reporting_outputs import reporting_output_routes
from bastion.web.timeouts import BodyDeadline
from bastion.web.typing_queue import typing_routes


@dataclass
class ServerStatus:
    """Live facts about the running server that the archive itself does not know."""

    started: float = field(default_factory=time.time)
    dicom_listening: bool = False
    dicom_address: str = ""
    #: Every DICOM worker process has listened (``/health`` says "starting", 503, until then: a load balancer
    #: then sends a node nothing before all of it is up).
    all_workers_started: bool = False
    #: The online rebuild of the index (primary process, SQLite index: ``/api/index/rebuild``); None elsewhere.
    index_rebuild: OnlineRebuild | None = None

    def per_worker(self) -> list[int]:
        """Associations open in each DICOM worker process (replaced by the server)."""
        return [0]

    def worker_pids(self) -> list[int]:
        """The process id of each DICOM worker process; 0 for one not listening (replaced by the server)."""
        return [os.getpid()] if self.dicom_listening else [0]

    def active(self) -> int:
        """Associations open in all worker processes."""
        return sum(self.per_worker())


def create_app(archive: Archive, status: ServerStatus | None = None) -> Starlette:
    """Build the HTTP application around an open :class:`Archive`."""
    status = status or ServerStatus()

    async def health(request: Request) -> JSONResponse:
        s = archive.settings
        workers_up = all(status.worker_pids())
        status.all_workers_started = status.all_workers_started or (status.dicom_listening and workers_up)
        state = ("starting" if not status.all_workers_started else "ok" if workers_up else "degraded")
        body = {
            "status": state,
            "version": __version__,
            "aet": s.aet,
            "dicom": {"listening": status.dicom_listening, "address": status.dicom_address},
            "uptime_seconds": round(time.time() - status.started, 1),
        }
        if state == "degraded":
            body["reason"] = "a DICOM worker process is being replaced"
        elif state == "ok" and (damage := archive.index.damage()):
            body["status"], body["reason"] = "degraded", (
                f"the index is damaged ({damage}): run `bastion index rebuild` (online) or restart `bastion serve` "
                "to rebuild it from the stored objects")
        elif state == "ok" and (trouble := api.copies_trouble(api.copies_report(archive))):
            body["status"], body["reason"] = "degraded", trouble
        rebuild = archive.rebuild
        if rebuild is not None and rebuild.running:  # serving, but queries answer from what is indexed so far
            if body["status"] == "ok":
                body["status"], body["reason"] = "rebuilding", (f"the index is being rebuilt from the stored objects "
                                                                f"({rebuild.reason}); queries answer from what is "
                                                                "indexed so far")
            body["rebuild"] = {"done": rebuild.done, "total": rebuild.total}
        return JSONResponse(body, status_code=503 if state == "starting" else 200)

    routes: list[BaseRoute] = [Route("/health", health)]
    routes += _routes(archive, status)
    # Outermost but for Starlette's error handler: a stalled body is answered 408 whichever route read it.
    middleware = [Middleware(BodyDeadline, timeout=archive.settings.http_body_timeout)]
    if archive.settings.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(archive.settings.cors_origins),
                                     allow_methods=["GET", "POST", "DELETE", "OPTIONS"], allow_headers=["*"],
                                     # Content-Range: bulkdata Range answers; Warning: QIDO-RS limits.
                                     expose_headers=["Content-Type", "Content-Length", "Content-Range",
                                                     "Warning"]))
    # Inside CORS (a preflight, and a refusal's CORS headers, need no credentials): every route checked, default deny.
    authenticator = Authenticator(archive.settings) if archive.settings.auth_enabled else None
    middleware.append(Middleware(AccessControl, archive=archive, authenticator=authenticator))
    app = Starlette(routes=routes, middleware=middleware)
    app.state.archive = archive
    app.state.status = status
    return app


def _routes(archive: Archive, status: ServerStatus) -> list[BaseRoute]:
    """Every HTTP route, in match order; the viewer's catch-all comes last."""
    reporting = ReportingApi(archive)  # one report store (and its locks) for the reporting and typing routes
    return [
        *auth_routes.routes(archive),
        *api.routes(archive, status),
        *reporting_routes(archive, reporting),
        *reporting_output_routes(archive),
        *typing_routes(reporting),
        *reading_list_routes(archive),
        *reporting_pages.routes(),
        *fhir_routes(archive),
        *dicomweb_routes(archive),
        *admin.routes(),
        *viewer.routes(archive),
    ]
