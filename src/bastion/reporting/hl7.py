"""A signed report as an HL7 v2.5.1 ORU^R01 message (unsolicited observation result), built with hl7apy.

One message per signed version of a report (HL7 v2.5.1 chapter 7.3.1), segments::

    MSH  sending / receiving application and facility, ORU^R01^ORU_R01, control id, P, 2.5.1, UNICODE UTF-8
    PID  PID-3 the Patient ID, PID-5 the name (DICOM PN → XPN), PID-7 birth date, PID-8 sex
    ORC  RE, ORC-3 the report id (filler order number), ORC-5 CM
    OBR  OBR-3 the report id, OBR-4 the template (name^title^99BASTION), OBR-7 the study date, OBR-18 the
         accession number (placer field 1, as IHE Radiology carries it), OBR-22 the signing time, OBR-24 RAD,
         OBR-25 the result status (F signed, C amended), OBR-32 the signer (principal result interpreter)
    OBX  one per non-empty section, value type FT, OBX-3 the section (name^title^99BASTION), OBX-5 its text,
         OBX-11 the status; an amendment adds the reason (``amendment^Reason for amendment^99BASTION``)
    ZDS  ZDS-1 the Study Instance UID (``UID^Bastion^Application^DICOM``, IHE Radiology TF-2 4.4.4.1.2.1.1)

Text is escaped per HL7 v2.5.1 2.7 (:func:`escape`): the delimiters ``| ^ ~ \\ &`` become ``\\F\\ \\S\\ \\R\\
\\E\\ \\T\\`` and a line break ``\\.br\\`` (the FT formatting command, 2.7.6); :func:`unescape` reverses it.
Segments end with a carriage return (2.5.4).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from hl7apy.core import Message  # type: ignore[import-untyped]
from hl7apy.parser import parse_message  # type: ignore[import-untyped]

from bastion.reporting.report import AMENDED

#: The coding system of the template and section codes.
LOCAL_CODES = "99BASTION"
_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))
_UNESCAPES = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\", ".br": "\n"}
#: Stands for a line break while hl7apy writes the message (it would escape the backslashes of ``\.br\``).
_BREAK = "\ue000"


@dataclass(frozen=True)
class Parties:
    """The applications and facilities named in MSH-3 to MSH-6."""

    sending_application: str = "BASTION"
    sending_facility: str = "BASTION"
    receiving_application: str = ""
    receiving_facility: str = ""


def escape(text: str) -> str:
    """``text`` as an HL7 v2 text value (2.7): delimiters escaped, line breaks as ``\\.br\\``, other control
    characters dropped."""
    return _escaped(text).replace(_BREAK, "\\.br\\")


def _escaped(text: str) -> str:
    for raw, escaped in _ESCAPES:
        text = text.replace(raw, escaped)
    text = text.replace(_BREAK, "").replace("\r\n", "\n").replace("\r", "\n").replace("\n", _BREAK)
    return "".join(c for c in text if c >= " " or c in ("\t", _BREAK))


def unescape(value: str) -> str:
    """The text of an escaped HL7 v2 value (the reverse of :func:`escape`)."""
    out, i = [], 0
    while i < len(value):
        end = value.find("\\", i + 1) if value[i] == "\\" else -1
        if end > i and value[i + 1:end] in _UNESCAPES:
            out.append(_UNESCAPES[value[i + 1:end]])
            i = end + 1
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def control_id(report_id: str, version: int) -> str:
    """MSH-10 of the message of a report's version: the same on every retry (20 characters, ST's limit)."""
    return hashlib.sha256(f"{report_id}:{version}".encode()).hexdigest()[:20]


def _person(pn: str) -> str:
    """A DICOM person name (family^given^middle^prefix^suffix) as an HL7 XPN (family^given^middle^suffix^prefix)."""
    parts = [*pn.split("=")[0].split("^"), "", "", "", "", ""][:5]
    family, given, middle, prefix, suffix = (_escaped(p.strip()) for p in parts)
    return "^".join((family, given, middle, suffix, prefix)).rstrip("^")


def _timestamp(iso: str) -> str:
    """An ISO 8601 UTC time (``2026-12-07T07:14:07.123Z``) as HL7 TS (``20261207071407+0000``)."""
    digits = "".join(c for c in iso.split(".")[0] if c.isdigit())
    return f"{digits[:14]}+0000" if len(digits) >= 14 else ""


def oru_r01(doc: dict[str, Any], study: dict[str, str], parties: Parties, sent_at: str) -> str:
    """The ORU^R01 message (ER7, segments ending in CR) of signed report version ``doc``. ``study``: the study's
    attributes by DICOM keyword (PatientBirthDate, PatientSex; the report's own fields win for the rest);
    ``sent_at``: the message time, ISO 8601 UTC."""
    status = "C" if doc.get("state") == AMENDED else "F"
    msg = Message("ORU_R01", version="2.5.1")
    msh = msg.msh
    msh.msh_3, msh.msh_4 = _escaped(parties.sending_application), _escaped(parties.sending_facility)
    msh.msh_5, msh.msh_6 = _escaped(parties.receiving_application), _escaped(parties.receiving_facility)
    msh.msh_7 = _timestamp(sent_at)
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = control_id(str(doc["id"]), int(doc["version"]))
    msh.msh_11, msh.msh_15, msh.msh_16, msh.msh_18 = "P", "AL", "NE", "UNICODE UTF-8"
    result = msg.add_group("ORU_R01_PATIENT_RESULT")
    pid = result.add_group("ORU_R01_PATIENT").pid
    pid.pid_1 = "1"
    pid.pid_3 = _escaped(str(doc.get("patient_id") or study.get("PatientID", "")))
    pid.pid_5 = _person(str(doc.get("patient_name") or study.get("PatientName", "")))
    pid.pid_7 = _escaped(study.get("PatientBirthDate", ""))
    sex = study.get("PatientSex", "").strip().upper()
    pid.pid_8 = sex if sex in ("M", "F", "O") else ("U" if sex else "")
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    report_id = _escaped(str(doc["id"]))
    order.orc.orc_1, order.orc.orc_3, order.orc.orc_5 = "RE", report_id, "CM"
    obr = order.obr
    obr.obr_1, obr.obr_3 = "1", report_id
    obr.obr_4 = (f"{_escaped(str(doc.get('template', '')))}^{_escaped(str(doc.get('template_title', '')))}"
                 f"^{LOCAL_CODES}")
    obr.obr_7 = _escaped(str(doc.get("study_date") or study.get("StudyDate", "")))
    obr.obr_18 = _escaped(str(doc.get("accession") or study.get("AccessionNumber", "")))
    obr.obr_22 = _timestamp(str(doc.get("signed_at", "")))
    obr.obr_24, obr.obr_25 = "RAD", status
    obr.obr_32 = _escaped(str(doc.get("signed_by", "")))
    titles = doc.get("section_titles", {})
    sections = [(name, str(titles.get(name, name)), str(text)) for name, text in doc.get("sections", {}).items()
                if str(text).strip()]
    if doc.get("state") == AMENDED and doc.get("reason"):
        sections.append(("amendment", "Reason for amendment", str(doc["reason"])))
    for n, (name, title, text) in enumerate(sections, 1):
        obx = order.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1, obx.obx_2 = str(n), "FT"
        obx.obx_3 = f"{_escaped(name)}^{_escaped(title)}^{LOCAL_CODES}"
        obx.obx_5 = _escaped(text)
        obx.obx_11 = status
    zds = msg.add_segment("ZDS")
    zds.zds_1 = f"{_escaped(str(doc.get('study', '')))}^Bastion^Application^DICOM"
    return str(msg.to_er7()).replace(_BREAK, "\\.br\\") + "\r"


def parse(er7: str, groups: bool = True) -> Message:
    """An HL7 v2 message (ER7) as hl7apy's tree (for tests and tools): its groups found, or with ``groups`` false
    its segments in a flat list (hl7apy leaves a Z segment such as ZDS out of a tree of groups)."""
    return parse_message(er7.replace("\n", "\r").strip("\r"), find_groups=groups)


def ack_code(er7: str) -> tuple[str, str, str]:
    """MSA-1 (the acknowledgment code), MSA-2 (the control id acknowledged) and MSA-3 / ERR text of an ACK."""
    msg = parse_message(er7.replace("\n", "\r").strip("\r"), find_groups=False)
    msa = msg.msa
    return text_of(msa.msa_1), text_of(msa.msa_2), text_of(msa.msa_3)


def text_of(element: Any) -> str:
    """The text of a parsed field or component (its first subcomponent) with the escapes undone: hl7apy's own
    ``value`` escapes again what it read."""
    while getattr(element, "children", None):
        element = element.children[0]
    raw = getattr(element, "value", "")
    inner = getattr(raw, "value", raw)
    if inner is None or isinstance(inner, str):
        return unescape(inner or "")
    to_er7 = getattr(raw, "to_er7", None)  # a date or a number: as it was written
    return str(to_er7() if callable(to_er7) else inner)
