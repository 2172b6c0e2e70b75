"""The DICOMweb routes: ``/dicom-web/...`` (QIDO-RS, WADO-RS, STOW-RS) and ``/wado`` (WADO-URI).

Handlers only translate HTTP to the core services and back; every
:class:`~bastion.errors.BastionError` becomes its ``http_status`` with a JSON message
(``{"error": ...}``), so a client's mistake is a 4xx, never a 500. Blocking work (index,
blob reads, pixel decoding, ingest) runs in the thread pool.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route

from bastion.archive import Archive
from bastion.dicomweb import audit, multipart, pixels, qido, rendered, stow, wado, wado_uri
from bastion.dicomweb.deletion import delete_study
from bastion.dicomweb.metadata import MetadataCache, cache_directory
from bastion.dicomweb.negotiation import (
    DICOM,
    DICOM_JSON,
    MULTIPART,
    OCTET_STREAM,
    NotAcceptable,
    parse_accept,
    require_multipart_related,
)
from bastion.errors import BastionError, NotFound
from bastion.model.dicom_json import dumps as encode_dicom_json
from bastion.model.levels import QueryLevel
from bastion.model.records import InstanceRecord
from bastion.query.find import MAX_LIMIT

log = logging.getLogger("bastion.dicomweb")
Handler = Callable[[Request], Awaitable[Response]]


def _error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def guarded(handler: Handler) -> Handler:
    """Map Bastion errors to their HTTP status with a message (PS3.18 8.6.3)."""

    @functools.wraps(handler)
    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except BastionError as exc:
            if exc.http_status >= 500:
                log.error("%s %s: %s", request.method, request.url.path, exc.message)
            return _error(exc.http_status, exc.message, exc.retry_after)

    return run


def _accepts_json(request: Request) -> bool:
    """True if the Accept header allows application/dicom+json (or plain JSON)."""
    return any(r.matches(DICOM_JSON) or r.media_type == "application/json"
               for r in parse_accept(request.headers.get("accept")))


def base_url(request: Request) -> str:
    """The absolute URL of the DICOMweb root, for RetrieveURL and BulkDataURI values."""
    root = request.scope.get("app_root_path", request.scope.get("root_path", ""))
    return f"{request.url.scheme}://{request.url.netloc}{root}/dicom-web"


def dicom_json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A DICOM JSON response (PS3.18 F.2); ``body`` is a value, or its text already encoded."""
    content = body if isinstance(body, (str, bytes)) else encode_dicom_json(body)
    return Response(content, status_code=status, media_type=DICOM_JSON, headers=headers)


class DicomWeb:
    """The DICOMweb service over one archive."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.metadata = MetadataCache(archive.retriever, cache_directory(archive.settings.data))

    # -- helpers ---------------------------------------------------------------------------------------------
    async def _select(self, request: Request, what: str, *, with_instance: bool = True) -> list[InstanceRecord]:
        """The instances a retrieve request names, audited as one view of ``what`` (:mod:`bastion.dicomweb.audit`)."""
        p = request.path_params
        records: list[InstanceRecord] = await run_in_threadpool(
            wado.select, self.archive.retriever, p["study"], p.get("series"),
            p.get("instance") if with_instance else None)
        audit.record_view(self.archive, request, records, what)
        return records

    # -- QIDO-RS ---------------------------------------------------------------------------------------------
    def search(self, level: QueryLevel) -> Handler:
        """A QIDO-RS handler for ``level`` (PS3.18 10.6)."""

        async def handler(request: Request) -> Response:
            if not _accepts_json(request):
                raise NotAcceptable("search results are available as application/dicom+json")
            p = request.path_params
            path_uids = {k: wado.check_uid(p[n], k) for n, k in
                         (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID")) if n in p}
            query = qido.parse_search(level, request.query_params.multi_items(), path_uids)
            # Search and encode in the thread pool: encoding 100 results must not hold up the event loop.
            body, count = await run_in_threadpool(qido.search_json, self.archive.finder, query, base_url(request))
            audit.record_search(self.archive, request, query, count)
            headers = {}
            if count == query.limit and query.limit == MAX_LIMIT:
                headers["Warning"] = f'299 bastion "results limited to {MAX_LIMIT}"'
            return dicom_json(body, headers=headers)

        return guarded(handler)

    # -- WADO-RS ---------------------------------------------------------------------------------------------
    @staticmethod
    def _accept(request: Request) -> list[Any]:
        return parse_accept(request.headers.get("accept"))

    async def retrieve(self, request: Request) -> Response:
        """Study, series or instance as multipart/related application/dicom (PS3.18 10.4.1.1.1)."""
        records = await self._select(request, "instances")
        plan = wado.plan_instances(records, self._accept(request))
        boundary = multipart.new_boundary()
        body = wado.stream_instances(self.archive.retriever, plan, boundary)
        # The first piece is read before the answer starts, so that an instance in it that cannot be served (no
        # copy matches its digest) is answered with its status; past it, the stream is cut short.
        first = await run_in_threadpool(next, body, None)
        return StreamingResponse(itertools.chain([first] if first is not None else [], body),
                                 media_type=multipart.content_type(boundary, DICOM))

    async def metadata_(self, request: Request) -> Response:
        """Metadata of a study, series or instance (PS3.18 10.4.1.1.2)."""
        if not _accepts_json(request):
            raise NotAcceptable("metadata is available as application/dicom+json")
        records = await self._select(request, "metadata")
        text = await run_in_threadpool(self.metadata.response_text, records, base_url(request))
        return dicom_json(text)

    async def frames(self, request: Request) -> Response:
        """Frames of an instance as multipart/related (PS3.18 10.4.1.1.3)."""
        numbers = pixels.parse_frame_list(request.path_params["frames"])
        records = await self._select(request, "frames")
        choice = wado.choose_frames(records[0].transfer_syntax, self._accept(request))
        boundary = multipart.new_boundary()
        body = await run_in_threadpool(wado.frames_body, self.archive.retriever, records[0], numbers,
                                       choice, boundary)
        return Response(body, media_type=multipart.content_type(boundary, choice.media_type))

    async def bulkdata(self, request: Request) -> Response:
        """A bulk data value, whole or an HTTP byte range (PS3.18 10.4.1.1.5, RFC 9110 14)."""
        accept = self._accept(request)
        single = any(r.media_type == OCTET_STREAM for r in accept) and not any(
            r.media_type == MULTIPART for r in accept)
        if not single and not any(r.matches(MULTIPART) or r.media_type == "multipart/*" for r in accept):
            raise NotAcceptable("bulk data is available as application/octet-stream or multipart/related")
        records = await self._select(request, "bulkdata")
        value = await run_in_threadpool(wado.bulk_data, self.archive.retriever, records[0],
                                        request.path_params["path"])
        try:
            span = wado.parse_range(request.headers.get("range"), len(value))
        except ValueError:
            return Response(status_code=416, headers={"Content-Range": f"bytes */{len(value)}"})
        status, headers = 200, {"Accept-Ranges": "bytes"}
        if span is not None:
            status = 206
            headers["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{len(value)}"
            value = value[span[0]: span[1]]
        if single:
            return Response(value, status_code=status, media_type=OCTET_STREAM, headers=headers)
        boundary = multipart.new_boundary()
        body = multipart.encode_multipart([(OCTET_STREAM, value)], boundary)
        return Response(body, status_code=status, headers=headers,
                        media_type=multipart.content_type(boundary, OCTET_STREAM))

    def render(self, *, thumbnail: bool) -> Handler:
        """A rendered / thumbnail handler at any level (PS3.18 10.4.1.1.4, 10.7)."""

        async def handler(request: Request) -> Response:
            options = rendered.parse_options(request.query_params, self._accept(request), thumbnail=thumbnail)
            frame = 0
            if "frames" in request.path_params:
                numbers = pixels.parse_frame_list(request.path_params["frames"])
                frame = numbers[0] - 1
            records = await self._select(request, "thumbnail" if thumbnail else "rendered")
            image = await run_in_threadpool(self._render_one, records, frame, options)
            return Response(image, media_type=options.media_type)

        return guarded(handler)

    def _render_one(self, records: list[InstanceRecord], frame: int, options: rendered.RenderOptions) -> bytes:
        """Render the middle instance of ``records`` that has pixel data (the first few tried)."""
        middle = len(records) // 2
        order = sorted(range(len(records)), key=lambda i: abs(i - middle))[:8]
        for i in order:
            ds = pixels.load_dataset(self.archive.retriever, records[i])
            count = pixels.number_of_frames(ds)
            if count == 0:
                continue
            if frame >= count:
                raise NotFound(f"frame {frame + 1} does not exist (the instance has {count})")
            return rendered.render(ds, frame, options)
        raise NotAcceptable("no instance here has pixel data to render")

    # -- STOW-RS ---------------------------------------------------------------------------------------------
    async def store(self, request: Request) -> Response:
        """Store instances (PS3.18 10.5)."""
        study = request.path_params.get("study")
        body = _Body(request)
        try:
            if study is not None:
                wado.check_uid(study, "StudyInstanceUID")
            ct = require_multipart_related(request.headers.get("content-type"), DICOM)
        except BastionError:
            await body.discard()
            raise
        base = base_url(request)
        outcome = stow.StowOutcome()
        try:
            await stow.store_stream(self.archive, body, ct.params["boundary"], study, base, outcome)
        except BastionError as exc:
            if exc.http_status != 408:  # a stalled body (http_body_timeout) is not waited for again
                await body.discard()
            raise
        finally:  # the parts stored before a body that failed are audited too
            audit.record_stores(self.archive, request, outcome.tally)
        for _cls, sop, reason, why in outcome.failed:
            log.info("STOW-RS rejected %s (0x%04X): %s", sop or "a part", reason, why)
        study_url = f"{base}/studies/{study}" if study else None
        return dicom_json(outcome.response(study_url), status=outcome.http_status)

    # -- WADO-URI --------------------------------------------------------------------------------------------
    async def wado_uri(self, request: Request) -> Response:
        """WADO-URI (PS3.18 9)."""
        req = wado_uri.parse_request(request.query_params)
        records = await run_in_threadpool(wado.select, self.archive.retriever, req.study, req.series, req.sop)
        record = records[0]
        audit.record_view(self.archive, request, [record], "wado-uri")
        if req.media_type == DICOM:
            ts = wado.choose_syntax(record.transfer_syntax, [req.transfer_syntax])
            if ts is None:
                raise NotAcceptable(f"the object is stored in {record.transfer_syntax} and cannot be sent "
                                    f"in {req.transfer_syntax}")
            data = await run_in_threadpool(self.archive.retriever.part10_bytes, record, ts)
            return Response(data, media_type=DICOM)
        image = await run_in_threadpool(self._render_one, [record], req.frame, req.render)
        return Response(image, media_type=req.render.media_type)

    # -- table -----------------------------------------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        """The routes under ``/dicom-web``."""
        s, se, i = "/studies/{study}", "/studies/{study}/series/{series}", \
            "/studies/{study}/series/{series}/instances/{instance}"
        g = guarded
        return [
            Route("/studies", self.search(QueryLevel.STUDY), methods=["GET"]),
            Route("/studies", g(self.store), methods=["POST"]),
            Route("/series", self.search(QueryLevel.SERIES), methods=["GET"]),
            Route("/instances", self.search(QueryLevel.IMAGE), methods=["GET"]),
            Route(s, g(self.retrieve), methods=["GET"]),
            Route(s, g(self.store), methods=["POST"]),
            Route(f"{s}/metadata", g(self.metadata_)),
            Route(f"{s}/rendered", self.render(thumbnail=False)),
            Route(f"{s}/thumbnail", self.render(thumbnail=True)),
            Route(f"{s}/series", self.search(QueryLevel.SERIES)),
            Route(f"{s}/instances", self.search(QueryLevel.IMAGE)),
            Route(se, g(self.retrieve)),
            Route(f"{se}/metadata", g(self.metadata_)),
            Route(f"{se}/rendered", self.render(thumbnail=False)),
            Route(f"{se}/thumbnail", self.render(thumbnail=True)),
            Route(f"{se}/instances", self.search(QueryLevel.IMAGE)),
            Route(i, g(self.retrieve)),
            Route(f"{i}/metadata", g(self.metadata_)),
            Route(f"{i}/rendered", self.render(thumbnail=False)),
            Route(f"{i}/thumbnail", self.render(thumbnail=True)),
            Route(f"{i}/frames/{{frames}}", g(self.frames)),
            Route(f"{i}/frames/{{frames}}/rendered", self.render(thumbnail=False)),
            Route(f"{i}/frames/{{frames}}/thumbnail", self.render(thumbnail=True)),
            Route(f"{i}/bulkdata/{{path:path}}", g(self.bulkdata)),
            Route(s, functools.partial(delete_study, self.archive), methods=["DELETE"]),
        ]


#: How much of a refused request's body is read and dropped before the answer (:meth:`_Body.discard`).
DISCARD_LIMIT = 16 * 1024 * 1024


class _Body:
    """A STOW-RS request's body as it is read, and what is left of it dropped when the request is refused."""

    def __init__(self, request: Request) -> None:
        self._chunks = request.stream()

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        return await self._chunks.__anext__()

    async def discard(self, limit: int = DISCARD_LIMIT) -> None:
        """Read and drop what is left of the body (up to ``limit`` bytes), so that the refusal reaches the client:
        a server that closes a connection with unread data in it makes the kernel reset the connection, and the
        client may lose the answer it was sent (RFC 9112 9.6). A client that sends more than ``limit`` after the
        refusal may still meet that reset."""
        seen = 0
        try:
            async for chunk in self._chunks:
                seen += len(chunk)
                if seen > limit:
                    break
        except Exception:  # noqa: BLE001 - gone, or too slow (the body deadline): the answer goes out anyway
            pass


def routes(archive: Archive) -> list[BaseRoute]:
    """The DICOMweb routes for ``create_app``: ``/dicom-web`` and ``/wado``."""
    service = DicomWeb(archive)
    return [Mount("/dicom-web", routes=service.routes()), Route("/wado", guarded(service.wado_uri))]
