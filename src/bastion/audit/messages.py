"""The DICOM audit message of a logged event (PS3.15 A.5): its fields as a dict, and as the A.5.1 schema's XML.

The log keeps the compact event (:func:`bastion.audit.log.compact`); the full message is made on export. Each
:class:`~bastion.audit.events.AuditKind` maps to one of PS3.15 A.5.3's messages:

============  =========================================  ===================  ==================================
kind          EventID                                    EventActionCode      EventTypeCode
============  =========================================  ===================  ==================================
association   110113 Security Alert                      E                    110126 Node Authentication
store         110104 DICOM Instances Transferred         C                    -
query         110112 Query                               E                    -
retrieve      110104 DICOM Instances Transferred         R                    -
view          110103 DICOM Instances Accessed            R                    -
export        110106 Export                              R                    -
delete        110105 DICOM Study Deleted                 D                    -
              110103 DICOM Instances Accessed (undelete) U                    -
login         110114 User Authentication                 E                    110122 Login (110123 Logout)
emergency     110113 Security Alert                      E                    110127 Emergency Override Started
              (revoked, action D)                                             110138 Emergency Override Stopped
config        110100 Application Activity (start, stop)  E                    110120 / 110121
              110113 Security Alert (other changes)      E                    110129 Security Configuration
============  =========================================  ===================  ==================================

An event whose ``event_type`` is 110132 (Use of Restricted Function: a refused service) is a Security Alert
whatever its kind. ActiveParticipants (A.5.2.2): the requestor (``user``, ``address`` as its network access
point, ``UserIsRequestor`` true) and this archive (``UserIsRequestor`` false), each with the RoleIDCode A.5.3 asks
for (110153 Source, 110152 Destination, 110150 Application, 110154 Destination Media); ParticipantObjects
(A.5.2.5): the patient (type 1 Person, role 1 Patient, ID type 2 Patient Number) and each study (type 2 System
Object, role 3 Report, ID type 110180 Study Instance UID), and for a query the query itself (role 24 Query, ID
type 110181 SOP Class UID, the keys in ParticipantObjectQuery, base64).
"""

from __future__ import annotations

import base64
import ipaddress
from typing import Any
from xml.sax.saxutils import quoteattr

#: A DICOM code (PS3.16 CID 400-404): code value, coding scheme, meaning.
Code = tuple[str, str, str]

APPLICATION_ACTIVITY: Code = ("110100", "DCM", "Application Activity")
INSTANCES_ACCESSED: Code = ("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED: Code = ("110104", "DCM", "DICOM Instances Transferred")
STUDY_DELETED: Code = ("110105", "DCM", "DICOM Study Deleted")
EXPORT: Code = ("110106", "DCM", "Export")
QUERY: Code = ("110112", "DCM", "Query")
SECURITY_ALERT: Code = ("110113", "DCM", "Security Alert")
USER_AUTHENTICATION: Code = ("110114", "DCM", "User Authentication")

#: EventTypeCode values (PS3.16 CID 401, 402, 403).
EVENT_TYPES: dict[str, Code] = {c[0]: c for c in (
    ("110120", "DCM", "Application Start"), ("110121", "DCM", "Application Stop"),
    ("110122", "DCM", "Login"), ("110123", "DCM", "Logout"),
    ("110126", "DCM", "Node Authentication"), ("110127", "DCM", "Emergency Override Started"),
    ("110128", "DCM", "Network Configuration"), ("110129", "DCM", "Security Configuration"),
    ("110131", "DCM", "Software Configuration"), ("110132", "DCM", "Use of Restricted Function"),
    ("110138", "DCM", "Emergency Override Stopped"))}

#: RoleIDCode values (PS3.16 CID 402).
APPLICATION_ROLE: Code = ("110150", "DCM", "Application")
LAUNCHER_ROLE: Code = ("110151", "DCM", "Application Launcher")
DESTINATION_ROLE: Code = ("110152", "DCM", "Destination Role ID")
SOURCE_ROLE: Code = ("110153", "DCM", "Source Role ID")
DESTINATION_MEDIA: Code = ("110154", "DCM", "Destination Media")

PATIENT_NUMBER: Code = ("2", "RFC-3881", "Patient Number")
STUDY_UID: Code = ("110180", "DCM", "Study Instance UID")
SOP_CLASS_UID: Code = ("110181", "DCM", "SOP Class UID")
#: The query's SOP class, for a query object: Study Root Query/Retrieve Information Model - FIND.
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
#: AuditSourceTypeCode 4: Application Server process tier in a multi-tier system (RFC 3881 5.4).
APPLICATION_SERVER: Code = ("4", "DCM", "Application Server")

#: Restricted Function: the EventTypeCode that makes any event a Security Alert (a refused service).
RESTRICTED_FUNCTION = "110132"


def _code(code: Code) -> dict[str, str]:
    return {"csd-code": code[0], "codeSystemName": code[1], "originalText": code[2]}


def event_identity(entry: dict[str, Any]) -> tuple[Code, str, Code | None]:
    """EventID, EventActionCode and EventTypeCode (or None) of a logged entry (the table in the module docstring)."""
    kind, action, typed = entry["kind"], entry.get("action", "E"), entry.get("event_type", "")
    given = EVENT_TYPES.get(typed) if typed else None
    if typed == RESTRICTED_FUNCTION:
        return SECURITY_ALERT, "E", given
    if kind == "association":
        return SECURITY_ALERT, "E", given or EVENT_TYPES["110126"]
    if kind == "store":
        return INSTANCES_TRANSFERRED, "C", given
    if kind == "query":
        return QUERY, "E", given
    if kind == "retrieve":
        return INSTANCES_TRANSFERRED, "R", given
    if kind == "view":
        return INSTANCES_ACCESSED, action if action in ("C", "R", "U", "D") else "R", given
    if kind == "export":
        return EXPORT, "R", given
    if kind == "delete":  # an undelete (U) is no deletion: the study's instances accessed for update
        return (INSTANCES_ACCESSED, "U", given) if action == "U" else (STUDY_DELETED, "D", given)
    if kind == "login":
        return USER_AUTHENTICATION, "E", given or EVENT_TYPES["110122"]
    if kind == "emergency":  # a break-glass token minted or used (started), or revoked (D: stopped)
        return SECURITY_ALERT, "E", given or EVENT_TYPES["110138" if action == "D" else "110127"]
    if typed in ("110120", "110121"):
        return APPLICATION_ACTIVITY, "E", given
    return SECURITY_ALERT, "E", given or EVENT_TYPES["110129"]


def _access_point(address: str) -> dict[str, Any]:
    """NetworkAccessPointID and its type: 2 for an IP address, 1 for a machine name (A.5.2.2)."""
    if not address:
        return {}
    try:
        ipaddress.ip_address(address)
        kind = 2
    except ValueError:
        kind = 1
    return {"NetworkAccessPointID": address, "NetworkAccessPointTypeCode": kind}


def audit_message(entry: dict[str, Any], source: str) -> dict[str, Any]:
    """The PS3.15 A.5 audit message of a logged entry, as a dict shaped like the A.5.1 schema. ``source`` is this
    archive's AuditSourceID and its ActiveParticipant UserID (its AE title, or node id)."""
    event_id, action, event_type = event_identity(entry)
    kind = entry["kind"]
    ident: dict[str, Any] = {"EventID": _code(event_id), "EventActionCode": action, "EventDateTime": entry["time"],
                             "EventOutcomeIndicator": int(entry.get("outcome", 0))}
    if event_type is not None:
        ident["EventTypeCode"] = [_code(event_type)]
    if entry.get("detail"):
        ident["EventOutcomeDescription"] = entry["detail"]
    user = entry.get("user", "") or "unknown"
    requestor: dict[str, Any] = {"UserID": user, "UserIsRequestor": True, **_access_point(entry.get("address", ""))}
    if entry.get("role"):
        requestor["UserName"] = f"{user} ({entry['role']})"
    archive: dict[str, Any] = {"UserID": source, "UserIsRequestor": False}
    participants = [requestor, archive]
    if kind == "store":
        requestor["RoleIDCode"], archive["RoleIDCode"] = _code(SOURCE_ROLE), _code(DESTINATION_ROLE)
    elif kind in ("query", "view"):
        requestor["RoleIDCode"], archive["RoleIDCode"] = _code(DESTINATION_ROLE), _code(SOURCE_ROLE)
    elif kind == "retrieve":
        archive["RoleIDCode"] = _code(SOURCE_ROLE)
        destination = entry.get("destination", "")
        if destination and destination != user:
            participants.append({"UserID": destination, "UserIsRequestor": False,
                                 "RoleIDCode": _code(DESTINATION_ROLE)})
        else:
            requestor["RoleIDCode"] = _code(DESTINATION_ROLE)
    elif kind == "export":
        archive["RoleIDCode"] = _code(SOURCE_ROLE)
        participants.append({"UserID": entry.get("destination", "") or "media", "UserIsRequestor": False,
                             "RoleIDCode": _code(DESTINATION_MEDIA)})
    elif event_id == APPLICATION_ACTIVITY:
        archive["RoleIDCode"] = _code(APPLICATION_ROLE)
        requestor["RoleIDCode"] = _code(LAUNCHER_ROLE)
    message: dict[str, Any] = {
        "EventIdentification": ident, "ActiveParticipant": participants,
        "AuditSourceIdentification": {"AuditSourceID": source, "AuditSourceTypeCode": [_code(APPLICATION_SERVER)]}}
    objects: list[dict[str, Any]] = []
    if entry.get("patient_id"):
        objects.append({"ParticipantObjectID": entry["patient_id"], "ParticipantObjectTypeCode": 1,
                        "ParticipantObjectTypeCodeRole": 1, "ParticipantObjectIDTypeCode": _code(PATIENT_NUMBER)})
    for study in entry.get("studies", []):
        objects.append({"ParticipantObjectID": study, "ParticipantObjectTypeCode": 2,
                        "ParticipantObjectTypeCodeRole": 3, "ParticipantObjectIDTypeCode": _code(STUDY_UID),
                        **({"ParticipantObjectDataLifeCycle": 14} if kind == "delete" else {})})
    if kind == "query":
        query = f"level={entry.get('level', '')} {entry.get('detail', '')}".strip()
        objects.append({"ParticipantObjectID": STUDY_ROOT_FIND, "ParticipantObjectTypeCode": 2,
                        "ParticipantObjectTypeCodeRole": 24, "ParticipantObjectIDTypeCode": _code(SOP_CLASS_UID),
                        "ParticipantObjectQuery": base64.b64encode(query.encode()).decode("ascii"),
                        "ParticipantObjectDetail": [{"type": "QueryLevel", "value": entry.get("level", "")},
                                                    {"type": "NumberOfMatches", "value": str(entry.get("count", 0))}]})
    if objects:
        message["ParticipantObjectIdentification"] = objects
    return message


def _coded(name: str, code: dict[str, str]) -> str:
    return f"<{name}" + "".join(f" {k}={quoteattr(v)}" for k, v in code.items()) + "/>"


def _attributes(fields: dict[str, Any], names: tuple[str, ...]) -> str:
    out = ""
    for name in names:
        if name in fields:
            value = fields[name]
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            out += f" {name}={quoteattr(text)}"
    return out


def to_xml(message: dict[str, Any]) -> str:
    """The message as one line of XML, following the PS3.15 A.5.1 schema (``AuditMessage``)."""
    ident = message["EventIdentification"]
    parts = ["<AuditMessage>", "<EventIdentification" + _attributes(
        ident, ("EventActionCode", "EventDateTime", "EventOutcomeIndicator")) + ">", _coded("EventID", ident["EventID"])]
    parts += [_coded("EventTypeCode", c) for c in ident.get("EventTypeCode", [])]
    if "EventOutcomeDescription" in ident:
        parts.append(f"<EventOutcomeDescription>{_text(ident['EventOutcomeDescription'])}</EventOutcomeDescription>")
    parts.append("</EventIdentification>")
    for p in message["ActiveParticipant"]:
        inner = _coded("RoleIDCode", p["RoleIDCode"]) if "RoleIDCode" in p else ""
        parts.append("<ActiveParticipant" + _attributes(p, (
            "UserID", "AlternativeUserID", "UserName", "UserIsRequestor", "NetworkAccessPointID",
            "NetworkAccessPointTypeCode")) + (f">{inner}</ActiveParticipant>" if inner else "/>"))
    source = message["AuditSourceIdentification"]
    parts.append("<AuditSourceIdentification" + _attributes(source, ("AuditEnterpriseSiteID", "AuditSourceID")) + ">"
                 + "".join(_coded("AuditSourceTypeCode", c) for c in source["AuditSourceTypeCode"])
                 + "</AuditSourceIdentification>")
    for o in message.get("ParticipantObjectIdentification", []):
        inner = _coded("ParticipantObjectIDTypeCode", o["ParticipantObjectIDTypeCode"])
        if "ParticipantObjectQuery" in o:
            inner += f"<ParticipantObjectQuery>{o['ParticipantObjectQuery']}</ParticipantObjectQuery>"
        for d in o.get("ParticipantObjectDetail", []):
            value = base64.b64encode(d["value"].encode()).decode("ascii")
            inner += f"<ParticipantObjectDetail type={quoteattr(d['type'])} value={quoteattr(value)}/>"
        parts.append("<ParticipantObjectIdentification" + _attributes(o, (
            "ParticipantObjectID", "ParticipantObjectTypeCode", "ParticipantObjectTypeCodeRole",
            "ParticipantObjectDataLifeCycle")) + f">{inner}</ParticipantObjectIdentification>")
    parts.append("</AuditMessage>")
    return "".join(parts)


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")
