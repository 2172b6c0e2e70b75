"""The JSON API under ``/api``: statistics, the change log, remotes, the forwarding queues (with an edge's backlog),
the digests of a study's instances (an edge's reconciliation), the online rebuild of the index and its OpenAPI
document.

Every response body is described in :mod:`bastion.web.openapi` (served at ``/api/openapi.json``).
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from bastion import __version__
from bastion.archive import SCRUB_FILE, Archive
from bastion.blobs.repair import ScrubState
from bastion.errors import BastionError
from bastion.forward import ForwardQueue, open_queue, queue_path
from bastion.forward.edge import open_edge_store
from bastion.forward.edge_store import EdgeStore, edge_path
from bastion.forward.reconcile import LAST_RECONCILE, dataset_digest
from bastion.index.base import is_postgresql
from bastion.ingest.online_rebuild import RebuildBusy, read_state
from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition, MatchType
from bastion.model.uids import is_identifiable_uid
from bastion.settings import UPSTREAM
from bastion.web.audit_api import audit_routes
from bastion.web.deletion import deletion_routes
from bastion.web.export import export_route
from bastion.web.openapi import openapi_document

if TYPE_CHECKING:
    from bastion.web.app import ServerStatus


_DIGITS = re.compile(r"[0-9]{1,20}")


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    """Query parameter ``name`` as an integer in ``[lo, hi]``: plain ASCII digits only.

    (Python's ``int()`` would also take ``" 5"``, ``"+5"``, ``"1_000"`` and non-ASCII digits.)
    """
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = int(raw) if _DIGITS.fullmatch(raw) else lo - 1
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer between {lo} and {hi}")
    return value


def copies_report(archive: Archive) -> dict[str, Any]:
    """The blob stores and their copies, for ``/api/statistics`` and ``/health``: each store's location, ``state``
    (``ok``; ``unreachable`` when it cannot be reached now; ``wanting`` while copies found missing, corrupt or not
    written there wait for repair), usage and landing (None without one, :func:`_landing`); the findings (:meth:`bastion.blobs.findings.FindingLog.summary`); where
    the scrub is in its cycle (``<data>/scrub.json``; None with one store or before its first start)."""
    findings = archive.blobs.findings.summary()
    wanting = findings["outstanding_by_store"]
    stores = []
    for store in archive.blobs.stores:
        try:
            used, free = store.usage()
            state = "wanting" if wanting.get(store.location) else "ok"
            reason = f"{wanting[store.location]} cop(ies) wanting repair" if state == "wanting" else ""
        except (OSError, BastionError) as exc:
            used = free = None
            state, reason = "unreachable", str(exc)
        stores.append({"location": store.location, "state": state, "reason": reason, "used_bytes": used,
                       "free_bytes": free, "wanting": wanting.get(store.location, 0), "landing": _landing(store)})
    scrub = None
    if len(archive.blobs.stores) > 1 and os.path.exists(path := str(archive.settings.data / SCRUB_FILE)):
        scrubbed = ScrubState.load(path)
        scrub = {"cycles": scrubbed.cycles, "last_cycle_finished": scrubbed.last_cycle_finished or None,
                 "cycle_started": scrubbed.cycle_started or None, "store": scrubbed.store or None,
                 "checked": scrubbed.checked, "bytes": scrubbed.bytes, "corrupt": scrubbed.corrupt,
                 "unreadable": scrubbed.unreadable, "repaired": scrubbed.repaired}
    return {"required": archive.blobs.required, "stores": stores, "findings": findings, "scrub": scrub}


def _landing(store: object) -> dict[str, Any] | None:
    """What the landing in front of ``store`` holds (:meth:`bastion.blobs.landing.LandingStore.landing_report`);
    None without one, or ``{"error": ...}`` if PostgreSQL does not answer."""
    report = getattr(store, "landing_report", None)
    if report is None:
        return None
    try:
        return dict(report())
    except BastionError as exc:
        return {"error": str(exc)}


def copies_trouble(report: dict[str, Any]) -> str | None:
    """Why the copies make the archive ``degraded`` (:func:`copies_report`), or None."""
    troubled = [f"{s['location']}: {s['state']} ({s['reason']})" for s in report["stores"] if s["state"] != "ok"]
    return "blob store " + "; ".join(troubled) if troubled else None


def routes(archive: Archive, status: ServerStatus) -> list[BaseRoute]:
    """The ``/api`` routes."""

    async def statistics(request: Request) -> JSONResponse:
        st = archive.index.statistics()
        used, free = archive.blobs.usage()
        parts = archive.capabilities()
        body: dict[str, Any] = {
            "node_id": archive.node_id,
            "patients": st.patients, "studies": st.studies, "series": st.series,
            "instances": st.instances, "versions": st.versions, "stored_bytes": st.stored_bytes,
            "last_change": st.last_change,
            "storage": {"location": archive.blobs.location, "used_bytes": used, "free_bytes": free,
                        "set_aside": archive.blobs.set_aside_count(),
                        "file_write": parts.blob_write},
            "copies": copies_report(archive),
            "ingest": {"last_minute_instances": st.stored_last_minute,
                       "rejected": archive.ingest.rejections.count(),
                       "warned": archive.ingest.warnings.count(),
                       "header_scan": parts.header_scan,
                       "index_record": parts.index_record},
            "last_errors": archive.ingest.rejections.tail(20),
            "last_warnings": archive.ingest.warnings.tail(20),
            "associations": status.active(),
            "associations_per_worker": status.per_worker(),
            "worker_pids": status.worker_pids(),
        }
        return JSONResponse(body)

    async def changes(request: Request) -> JSONResponse:
        try:
            since = _int_param(request, "since", 0, 0, 2**62)
            limit = _int_param(request, "limit", 100, 1, 10_000)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        rows = archive.index.changes(since, limit)
        return JSONResponse({"changes": [c.__dict__ for c in rows],
                             "last": rows[-1].seq if rows else since})

    async def remotes(request: Request) -> JSONResponse:
        return JSONResponse({"remotes": [{"aet": r.aet, "host": r.host, "port": r.port, "tls": r.tls}
                                         for r in archive.settings.remotes]})

    opened: list[ForwardQueue] = []

    def forward_queue() -> ForwardQueue | None:
        """The node's forwarding queue, opened at the first request that needs it (None: forwarding never ran)."""
        if not opened and (archive.settings.forward or queue_path(archive.settings).exists()):
            opened.append(open_queue(archive.settings))
        return opened[0] if opened else None

    edge_opened: list[EdgeStore] = []

    def edge_report(upstream: dict[str, Any] | None) -> dict[str, Any] | None:
        """Edge mode's part of ``/api/queues``: the backlog to upstream and the age of its oldest unsent instance
        (from the ``upstream`` queue), what the edge state counts, the last reconciliation."""
        if not archive.settings.upstream_rule:
            return None
        if not edge_opened and edge_path(archive.settings).exists():
            edge_opened.append(open_edge_store(archive.settings))
        store = edge_opened[0] if edge_opened else None
        up = upstream or {}
        return {"upstream": archive.settings.upstream,
                "backlog": up.get("pending", 0) + up.get("in_flight", 0),
                "oldest_unsent_age_s": up.get("oldest_pending_age_s"), "dead": up.get("dead", 0),
                **(store.counts() if store else {"held_upstream": 0, "prefetch_jobs": 0, "prefetched_studies": 0}),
                "last_reconcile": store.meta(LAST_RECONCILE) if store else None}

    async def queues(request: Request) -> JSONResponse:
        queue = forward_queue()
        targets = {r.name: r.to for r in archive.settings.forward}
        stats = [] if queue is None else await asyncio.to_thread(queue.stats, list(targets))
        rows = [
            {"name": s.destination, "to": targets.get(s.destination), "pending": s.pending, "in_flight": s.in_flight,
             "delivered": s.delivered, "dead": s.dead, "oldest_pending_age_s": s.oldest_pending_age_s,
             "last_error": s.last_error or None, "last_error_at": s.last_error_at,
             "last_delivered_at": s.last_delivered_at} for s in stats]
        upstream = next((r for r in rows if r["name"] == UPSTREAM), None)
        return JSONResponse({"queues": rows, "edge": await asyncio.to_thread(edge_report, upstream)})

    def study_digests(study_uid: str) -> list[dict[str, str]]:
        records = archive.index.instances(QueryLevel.STUDY, [
            Condition("StudyInstanceUID", 0x0020000D, "UI", MatchType.SINGLE, (study_uid,))])
        return [{"sop_uid": r.sop_uid, "transfer_syntax": r.transfer_syntax, "digest": r.digest,
                 "dataset_digest": dataset_digest(archive.retriever.read(r))} for r in records]

    async def digests(request: Request) -> JSONResponse:
        """What this node stores of each current instance of a study, for an edge's reconciliation."""
        study_uid = request.path_params["study"]
        try:
            found = await asyncio.to_thread(study_digests, study_uid) if is_identifiable_uid(study_uid) else []
        except BastionError as exc:
            return JSONResponse({"error": exc.message}, status_code=503)
        if not found:
            return JSONResponse({"error": f"no study {study_uid[:70]!r} here"}, status_code=404)
        return JSONResponse({"study_uid": study_uid, "instances": found})

    async def retry_queue(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        queue = forward_queue()
        names = set() if queue is None else {s.destination for s in await asyncio.to_thread(queue.stats)}
        if queue is None or name not in names | {r.name for r in archive.settings.forward}:
            return JSONResponse({"error": f"no forwarding queue named {name!r}"}, status_code=404)
        return JSONResponse({"name": name, "retried": await asyncio.to_thread(queue.retry, name)})

    async def index_rebuild(request: Request) -> JSONResponse:
        online = status.index_rebuild
        if request.method == "GET":
            state = read_state(archive.settings.data) if online is None else online.state()
            return JSONResponse(state.to_json())
        if is_postgresql(archive.settings.index_location):
            return JSONResponse({"error": "rebuilding the index while the server runs is for a SQLite index only, "
                                          "for now: stop the server and run `bastion index rebuild`"},
                                status_code=409)  # the server's state, not the request, stands in the way
        if online is None:
            return JSONResponse({"error": "this server does not rebuild its index online (not the primary "
                                          "process)"}, status_code=409)
        if archive.rebuild is not None and archive.rebuild.running:
            return JSONResponse({"error": "the index is rebuilding itself from the stored objects already (see "
                                          "/health)"}, status_code=409)
        try:
            state = await asyncio.to_thread(online.begin)
        except RebuildBusy as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        return JSONResponse(state.to_json(), status_code=202)

    document = openapi_document(__version__)

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(document)

    retry = Route("/api/queues/{name:path}/retry", retry_queue, methods=["POST"])
    # A queue's name is any text (a DICOMweb destination's default name holds slashes): its part of the path
    # matches every character, line breaks too, so that no name falls through to the plain-text 404.
    retry.path_regex = re.compile(r"^/api/queues/(?P<name>[\s\S]+)/retry$")
    return [Route("/api/statistics", statistics), Route("/api/changes", changes),
            Route("/api/remotes", remotes), Route("/api/queues", queues), retry,
            Route("/api/studies/{study}/digests", digests), export_route(archive),
            *deletion_routes(archive), Route("/api/index/rebuild", index_rebuild, methods=["GET", "POST"]),
            *audit_routes(archive), Route("/api/openapi.json", openapi)]
