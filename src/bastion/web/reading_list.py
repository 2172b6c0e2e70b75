"""The reading list's JSON API (docs/reporting.md, "Pages and the reading list"): studies with their report state,
reading priority and claim, and the claims themselves.

- ``GET /api/reading-list``: the archive's studies as the index answers a study query (PS3.4 C.6.2.1.2, as QIDO-RS
  does), newest study first, each with its latest report (``unreported`` when it has none), its priority and its
  live claim; filtered by modality, study date, priority, report state and text (patient name, patient id or
  accession number);
- ``POST``/``DELETE /api/reading-list/{study}/claim``: take or renew / release a claim (:mod:`bastion.jobs.claims`);
- ``PUT /api/reading-list/{study}/priority``: set the study's reading priority.

A filter on report state reads, a page at a time, the studies the index finds in that state (a join of its
``studies`` and ``reports`` tables: :meth:`Index.studies_in_report_state`), asks ``find`` about them with the other
filters and checks each one's latest report. A filter on priority is applied while the studies are read newest
first (priorities live beside the claims, not in the index). A page's reports are looked up in one search.
"""

from __future__ import annotations

import asyncio
import heapq
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from bastion.archive import Archive
from bastion.auth import principal_in
from bastion.index.base import Index
from bastion.index.reports import MAX_STUDIES, ReportQuery
from bastion.jobs.claims import PRIORITIES, ROUTINE, Claim, Claims
from bastion.jobs.sql import SqlJobs
from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition, MatchType, parse_condition
from bastion.model.uids import is_identifiable_uid
from bastion.reporting import report as rpt
from bastion.web.reporting import NOT_BLANK, _date, _errors, _int, _json, study_facts

#: A study without a report.
UNREPORTED = "unreported"
STATES = (UNREPORTED, *rpt.STATES)
#: Studies read from the index at a time while a filter on state or priority is applied.
PAGE = 500
#: The text search's attributes: a study matches when any of them holds the text (any case for the name).
TEXT_KEYWORDS = ("PatientName", "PatientID", "AccessionNumber")
Dataset = dict[str, Any]


@dataclass(frozen=True)
class ReadingQuery:
    """A reading-list request: each filter set narrows it."""

    modality: str = ""
    date_from: str = ""  # YYYYMMDD, inclusive
    date_to: str = ""
    priority: str = ""
    state: str = ""
    text: str = ""
    study: str = ""
    limit: int = 50
    offset: int = 0


def _condition(keyword: str, value: str) -> Condition:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    return parse_condition(keyword, tag, dictionary_VR(tag), value)


def _value(ds: Dataset, keyword: str) -> Any:
    tag = tag_for_keyword(keyword)
    values = (ds.get(f"{tag:08X}") or {}).get("Value") or []
    return values


def _text(ds: Dataset, keyword: str) -> str:
    values = _value(ds, keyword)
    first = values[0] if values else ""
    return str(first.get("Alphabetic", "") if isinstance(first, dict) else first)


def _order(ds: Dataset) -> tuple[str, str]:
    """A study's place in the list, newest first (the index's study order: date, time)."""
    return _text(ds, "StudyDate"), _text(ds, "StudyTime")


def _pages(index: Index, conditions: list[Condition], batch: int) -> Iterator[Dataset]:
    """The studies matching ``conditions``, newest first, read ``batch`` at a time."""
    offset = 0
    while True:
        found = index.find(QueryLevel.STUDY, conditions, limit=batch, offset=offset)
        yield from found
        if len(found) < batch:
            return
        offset += batch


def _studies(index: Index, query: ReadingQuery, batch: int, only: list[str] | None) -> Iterator[Dataset]:
    """The studies the query's index filters match, newest first (a text search: the union of three searches)."""
    base: list[Condition] = []
    if query.modality:
        base.append(_condition("ModalitiesInStudy", query.modality))
    if query.date_from or query.date_to:
        base.append(Condition("StudyDate", 0x00080020, "DA", MatchType.RANGE, (query.date_from, query.date_to)))
    uids = only
    if query.study:
        uids = [query.study] if uids is None or query.study in uids else []
    if uids is not None:
        if not uids:
            return
        base.append(_condition("StudyInstanceUID", "\\".join(uids)))
    text = re.sub(r"[*?\\]", "", query.text).strip()
    if not text:
        yield from _pages(index, base, batch)
        return
    streams = [_pages(index, [*base, _condition(k, f"*{text}*")], batch) for k in TEXT_KEYWORDS]
    seen: set[str] = set()
    for ds in heapq.merge(*streams, key=_order, reverse=True):
        uid = _text(ds, "StudyInstanceUID")
        if uid not in seen:
            seen.add(uid)
            yield ds


def _reports_of(index: Index, studies: list[str]) -> dict[str, dict[str, Any]]:
    """Each study's latest report (the one changed last) by study: its id, state, version and time; one search per
    :data:`~bastion.index.reports.MAX_STUDIES` studies."""
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(studies), MAX_STUDIES):
        part = tuple(studies[start:start + MAX_STUDIES])
        for row in index.reports(ReportQuery(studies=part, limit=10 * len(part))):  # newest change first
            found.setdefault(row.study_uid, {"id": row.id, "state": row.state, "version": row.version,
                                             "updated": row.updated})
    return found


def _with_reports(index: Index, studies: Iterator[Dataset], batch: int
                  ) -> Iterator[tuple[Dataset, dict[str, Any] | None]]:
    """``studies`` each with its latest report (or None), their reports looked up ``batch`` studies at a time."""
    while chunk := list(islice(studies, batch)):
        reports = _reports_of(index, [_text(ds, "StudyInstanceUID") for ds in chunk])
        for ds in chunk:
            yield ds, reports.get(_text(ds, "StudyInstanceUID"))


def _in_state(index: Index, query: ReadingQuery, only: list[str] | None, batch: int
              ) -> Iterator[tuple[Dataset, dict[str, Any] | None]]:
    """The studies whose latest report is in ``query.state`` (or that have none), newest first, with that report:
    candidates from the index a page at a time (:meth:`Index.studies_in_report_state`), asked of ``find`` with the
    query's other filters, checked against their latest report; ``batch`` candidates at a time."""
    allowed = None if only is None else set(only)
    offset = 0
    while True:
        candidates = index.studies_in_report_state(query.state, batch, offset)
        uids = [uid for uid in candidates if allowed is None or uid in allowed]
        if uids:
            for ds, report in _with_reports(index, _studies(index, query, batch, uids), batch):
                if query.state == (report["state"] if report else UNREPORTED):
                    yield ds, report
        if len(candidates) < batch:
            return
        offset += batch


def _entry(ds: Dataset, report: dict[str, Any] | None, claim: Claim | None) -> dict[str, Any]:
    modalities = [str(m) for m in _value(ds, "ModalitiesInStudy")]
    count = _value(ds, "NumberOfStudyRelatedInstances")
    return {
        "study": _text(ds, "StudyInstanceUID"), "patient_name": _text(ds, "PatientName"),
        "patient_id": _text(ds, "PatientID"), "accession": _text(ds, "AccessionNumber"),
        "study_date": _text(ds, "StudyDate"), "study_time": _text(ds, "StudyTime"),
        "description": _text(ds, "StudyDescription"), "modalities": modalities,
        "instances": int(count[0]) if count else 0,
        "state": report["state"] if report else UNREPORTED, "report": report,
        "priority": claim.priority if claim else ROUTINE, "claim": claim.to_json() if claim else None,
    }


def reading_list(index: Index, claims: Claims, query: ReadingQuery) -> list[dict[str, Any]]:
    """The page of the reading list that ``query`` asks for."""
    only: list[str] | None = None
    keep: Callable[[str], bool] = lambda uid: True  # noqa: E731
    if query.priority and query.priority != ROUTINE:
        only = claims.with_priority(query.priority)
    elif query.priority == ROUTINE:
        pressing = {uid for p in PRIORITIES if p != ROUTINE for uid in claims.with_priority(p)}
        keep = lambda uid: uid not in pressing  # noqa: E731
    need = query.offset + query.limit
    if query.state:
        batch = min(PAGE, max(2 * need, 100))  # most candidates match: a page and some to spare
        chosen = ((ds, report) for ds, report in _in_state(index, query, only, batch)
                  if keep(_text(ds, "StudyInstanceUID")))
        page = list(islice(chosen, query.offset, need))
    elif query.priority == ROUTINE:
        kept = (ds for ds in _studies(index, query, PAGE, only) if keep(_text(ds, "StudyInstanceUID")))
        page = list(islice(_with_reports(index, kept, PAGE), query.offset, need))
    else:
        found = islice(_studies(index, query, min(max(need, 20), 1000), only), query.offset, need)
        page = list(_with_reports(index, found, need))
    held = claims.of([_text(ds, "StudyInstanceUID") for ds, _ in page])
    return [_entry(ds, report, held.get(_text(ds, "StudyInstanceUID"))) for ds, report in page]


def _choice(params: Any, name: str, allowed: tuple[str, ...]) -> str:
    value = str(params.get(name, ""))
    if name in params and value not in allowed:  # given (even empty): one of them
        raise rpt.ReportInvalid(f"{name} must be one of {', '.join(allowed)}")
    return value


def reading_list_routes(archive: Archive) -> list[BaseRoute]:
    """The routes of the reading list's API."""
    jobs = archive.jobs
    assert isinstance(jobs, SqlJobs), "claims are kept in the jobs' database"
    claims = Claims(jobs, archive.settings.report_claim_minutes)
    auth_on = archive.settings.auth_enabled

    def who(request: Request, given: object) -> str:
        """Who claims: the principal when authentication is on; else the ``user`` given (required)."""
        if auth_on:
            return principal_in(request.scope).user
        if not isinstance(given, str) or not re.search(NOT_BLANK, given):
            raise rpt.ReportInvalid('"user" (who claims; authentication is off) is required and must not be empty')
        return given.strip()[:64]

    async def stored_study(request: Request) -> str:
        """The path's study; 400 if it is not a UID, 404 if the archive holds no such study."""
        uid = str(request.path_params["study"])
        await asyncio.to_thread(study_facts, archive, uid)
        return uid

    @_errors
    async def listing(request: Request) -> Response:
        params = request.query_params
        study = params.get("study", "")
        if "study" in params and (len(study) > 64 or not is_identifiable_uid(study)):
            raise rpt.ReportInvalid("study must be a Study Instance UID")
        modality = params.get("modality", "").strip()
        if modality and not re.fullmatch(r"[A-Z0-9_ ]{1,16}", modality):
            raise rpt.ReportInvalid("modality must be a DICOM modality code (CT, MR, ...)")
        query = ReadingQuery(modality=modality, date_from=_date(params["from"], "from") if "from" in params else "",
                             date_to=_date(params["to"], "to") if "to" in params else "",
                             priority=_choice(params, "priority", PRIORITIES), state=_choice(params, "state", STATES),
                             text=params.get("q", "")[:64], study=study, limit=_int(request, "limit", 50, 500),
                             offset=_int(request, "offset", 0, 100_000))
        studies = await asyncio.to_thread(reading_list, archive.index, claims, query)
        return JSONResponse({"studies": studies, "claim_minutes": claims.minutes})

    @_errors
    async def claim(request: Request) -> Response:
        study = await stored_study(request)
        if request.method == "DELETE":
            user = who(request, request.query_params.get("user"))
            anyone = auth_on and principal_in(request.scope).may("admin")
            released = await asyncio.to_thread(claims.release, study, user, anyone)
            return JSONResponse({"study": study, "released": released})
        body = await _json(request)
        user = who(request, body.get("user"))
        taken = await asyncio.to_thread(claims.take, study, user)
        return JSONResponse({"study": study, "claim": taken.to_json(), "priority": taken.priority})

    @_errors
    async def priority(request: Request) -> Response:
        study = await stored_study(request)
        body = await _json(request)
        value = body.get("priority")
        if value not in PRIORITIES:
            raise rpt.ReportInvalid(f'"priority" must be one of {", ".join(PRIORITIES)}')
        row = await asyncio.to_thread(claims.set_priority, study, str(value))
        return JSONResponse({"study": study, "claim": row.to_json(), "priority": row.priority})

    return [Route("/api/reading-list", listing),
            Route("/api/reading-list/{study}/claim", claim, methods=["POST", "DELETE"]),
            Route("/api/reading-list/{study}/priority", priority, methods=["PUT"])]
