"""The audit events of DICOMweb requests: who asked (the request's principal and address), what they read, searched
or stored (PS3.15 A.5.3; :mod:`bastion.audit.messages` makes the full messages).

One event per request: a WADO-RS, WADO-URI, metadata, rendered, frames or bulk data request is one ``view`` of the
instances it selected; a QIDO-RS search one ``query``; a STOW-RS request one ``store`` per study it stored into.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from bastion.archive import Archive
from bastion.audit import AuditEvent, AuditKind, StoreTally
from bastion.audit.events import query_event
from bastion.auth import principal_in
from bastion.dicomweb.qido import Search
from bastion.model.records import InstanceRecord
from bastion.query.find import conditions_for


def who(request: Request) -> dict[str, Any]:
    """The audit fields naming who made ``request``: its principal (set by the auth middleware; anonymous while
    authentication is off) and the client's address."""
    principal = principal_in(request.scope)
    return {"user": principal.user, "role": principal.role, "emergency": principal.emergency,
            "address": request.client.host if request.client else "", "via": "dicomweb"}


def record_view(archive: Archive, request: Request, records: list[InstanceRecord], what: str) -> None:
    """One ``view`` event (PS3.15 A.5.3.4, DICOM Instances Accessed, action Read) for the instances a retrieve
    request selected; ``what`` names the resource (``instances``, ``metadata``, ``rendered``, ...)."""
    studies = tuple(dict.fromkeys(r.study_uid for r in records))
    archive.audit.record(AuditEvent(AuditKind.VIEW, action="R", **who(request), studies=studies[:100],
                                    count=len(records), detail=what))


def record_search(archive: Archive, request: Request, search: Search, count: int) -> None:
    """One ``query`` event (PS3.15 A.5.3.11) for a QIDO-RS search: its level, keys and number of results."""
    conditions = conditions_for(search.keys, fuzzy=search.fuzzy, comma_lists=True)
    archive.audit.record(query_event(conditions, search.level.value, count, **who(request)))


def record_stores(archive: Archive, request: Request, tally: StoreTally) -> None:
    """The ``store`` events of a STOW-RS request: one per study (PS3.15 A.5.3.2)."""
    for event in tally.events(AuditEvent(AuditKind.STORE, **who(request))):
        archive.audit.record(event)
