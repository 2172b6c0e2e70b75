"""What an audit entry says: one access, its outcome and who was involved (PS3.15 A.5.1, A.5.3)."""

from __future__ import annotations

import getpass
import os
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

from bastion.model.matching import Condition, MatchType


class AuditKind(StrEnum):
    """The accesses Bastion audits; each maps to a PS3.15 A.5.3 event (see :mod:`bastion.audit.log`)."""

    #: A DICOM association accepted or rejected.
    ASSOCIATION = "association"
    #: Instances stored (C-STORE, STOW-RS, import).
    STORE = "store"
    #: A query (C-FIND, QIDO-RS).
    QUERY = "query"
    #: Instances sent to another application (C-MOVE, C-GET).
    RETRIEVE = "retrieve"
    #: Instances read over HTTP (WADO-RS, WADO-URI, the viewer's data).
    VIEW = "view"
    #: Instances written out of the archive (export, de-identified or not).
    EXPORT = "export"
    #: A study deleted (tombstoned), undeleted or purged.
    DELETE = "delete"
    #: An HTTP authentication, successful or not.
    LOGIN = "login"
    #: A break-glass (emergency) token minted or used.
    EMERGENCY = "emergency"
    #: The archive started or stopped, or its configuration changed.
    CONFIG = "config"


class Outcome(IntEnum):
    """EventOutcomeIndicator (PS3.15 A.5.1)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


@dataclass(frozen=True)
class AuditEvent:
    """One audited access.

    ``user`` is who asked: the authenticated user, an API key's name, or the calling AE title; ``address`` is
    where from (the client's IP address). ``destination`` is the other party where there is one (the called or
    move-destination AE title, an export directory). ``studies`` and ``patient_id`` name the data involved;
    ``count`` is the number of instances. ``detail`` says why, in words (a rejection's reason, a deletion's
    reason, the query keys). ``action`` is PS3.15's EventActionCode: C(reate), R(ead), U(pdate), D(elete),
    E(xecute).
    """

    kind: AuditKind
    outcome: Outcome = Outcome.SUCCESS
    action: str = "E"
    user: str = ""
    role: str = ""
    address: str = ""
    destination: str = ""
    #: "dimse", "dicomweb", "api", "admin", "viewer" or "cli".
    via: str = ""
    patient_id: str = ""
    studies: tuple[str, ...] = ()
    count: int = 0
    detail: str = ""
    #: The access was made with a break-glass token.
    emergency: bool = False
    #: PS3.15 A.5.3 EventTypeCode (a DCM code, e.g. ``110120`` Application Start, ``110132`` Use of Restricted
    #: Function for a refused service); empty: the kind's usual one (:mod:`bastion.audit.messages`).
    event_type: str = ""
    #: The query's level (PATIENT, STUDY, SERIES, IMAGE) for a query.
    level: str = ""


def local_user() -> str:
    """Who runs this process (a command, the server): the login name of its user."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def lifecycle_event(started: bool, aet: str, detail: str = "") -> AuditEvent:
    """The archive started or stopped (PS3.15 A.5.3.1 Application Activity, 110120 / 110121)."""
    return AuditEvent(AuditKind.CONFIG, action="E", user=local_user(), destination=aet, via="cli",
                      event_type="110120" if started else "110121", detail=detail)


def query_event(conditions: Iterable[Condition], level: str, count: int, **who: Any) -> AuditEvent:
    """The ``query`` event of a C-FIND or QIDO-RS query (PS3.15 A.5.3.11): its level, its matching keys in
    ``detail`` (``keyword=value``, a range as ``low-high``, a list joined by ``\\``), the number of matches,
    and the patient and studies it names, if any. ``who`` gives the other fields (user, address, via, ...)."""
    keys: list[str] = []
    patient = ""
    studies: tuple[str, ...] = ()
    for c in conditions:
        if c.kind is MatchType.UNIVERSAL:
            continue
        value = "-".join(c.values) if c.kind is MatchType.RANGE else "\\".join(c.values)
        keys.append(f"{c.keyword}={value}")
        if c.keyword == "PatientID" and c.kind is MatchType.SINGLE:
            patient = c.values[0]
        elif c.keyword == "StudyInstanceUID" and c.kind in (MatchType.SINGLE, MatchType.LIST):
            studies = tuple(c.values)
    return AuditEvent(AuditKind.QUERY, action="E", level=level, count=count, detail=" ".join(keys)[:1024],
                      patient_id=patient, studies=studies, **who)
