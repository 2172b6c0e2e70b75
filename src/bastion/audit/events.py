"""What an audit entry says: one access, its outcome and who was involved (PS3.15 A.5.1, A.5.3)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum


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
