"""A radiology report and its life: draft → preliminary → final (signed) → amended (addenda), every version kept.

A report is a JSON object (the API's and the blob store's form)::

    {"id", "study", "patient_id", "patient_name", "accession", "modality", "study_date", "template",
     "template_title", "state", "version", "sections": {name: text}, "section_titles": {name: title}, "author",
     "signed_by", "signed_at", "sr": [SOP Instance UIDs, oldest first], "audio": [{"id", "seconds",
     "content_type", "at", "user"}], "reason" (the last amendment's), "history": [{"version", "state", "at", "user"}]}

Each change makes the next version: a new object (:func:`next_version`); nothing here does I/O
(:mod:`bastion.reporting.store` keeps them). A signed report (``final`` or ``amended``) never changes its
sections but through an amendment, which makes a new SR instance (:mod:`bastion.reporting.sr`).
"""

from __future__ import annotations

import copy
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from bastion.errors import BastionError
from bastion.reporting.templates import DICTATION, Template

DRAFT, PRELIMINARY, FINAL, AMENDED = "draft", "preliminary", "final", "amended"
STATES = (DRAFT, PRELIMINARY, FINAL, AMENDED)
#: The states in which the report is still edited (at most one such report per study).
OPEN = (DRAFT, PRELIMINARY)
SIGNED = (FINAL, AMENDED)
#: A character that is not white space as JSON Schema's (ECMA-262's) ``\s`` has it (the OpenAPI document's
#: pattern for a signer's name and an amendment's reason).
NOT_BLANK = "[^\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
#: The longest text a section may hold (characters).
MAX_SECTION = 100_000


class ReportConflict(BastionError):
    """The report is not in a state that allows the change, or was changed meanwhile (HTTP 409)."""

    http_status = 409


class ReportInvalid(BastionError):
    """The request's content cannot make a report (HTTP 400)."""

    http_status = 400


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_report(study: dict[str, str], template: Template, user: str) -> dict[str, Any]:
    """Version 1 of a new draft of ``study`` (its ``study``, ``patient_id``, ``patient_name``, ``accession``,
    ``modality``, ``study_date``) from ``template``, its sections holding the template's default text."""
    return {
        "id": uuid.uuid4().hex, **{k: study.get(k, "") for k in ("study", "patient_id", "patient_name",
                                                                   "accession", "modality", "study_date")},
        "template": template.name, "template_title": template.title, "state": DRAFT, "version": 1,
        "sections": {s.name: s.text for s in template.sections},
        "section_titles": {s.name: s.title for s in template.sections},
        "author": user, "signed_by": "", "signed_at": "", "sr": [], "audio": [], "reason": "",
        "history": [{"version": 1, "state": DRAFT, "at": now_iso(), "user": user}],
    }


def checked_sections(sections: object, known: dict[str, Any]) -> dict[str, str]:
    """``sections`` from a request: a JSON object of text by the report's section names; ReportInvalid if not."""
    if not isinstance(sections, dict):
        raise ReportInvalid('"sections" must be an object of section name to text')
    for name, text in sections.items():
        if name not in known:
            raise ReportInvalid(f"unknown section {name!r}: the report has {', '.join(known)}")
        if not isinstance(text, str) or len(text) > MAX_SECTION or "\x00" in text:
            raise ReportInvalid(f"section {name!r} must be text of at most {MAX_SECTION} characters")
    return dict(sections)


def next_version(doc: dict[str, Any], state: str, user: str, **changes: Any) -> dict[str, Any]:
    """The version after ``doc``: ``changes`` applied, in ``state``, the history appended."""
    out = copy.deepcopy(doc)
    out.update(changes)
    out["state"] = state
    out["version"] = int(doc["version"]) + 1
    out["history"].append({"version": out["version"], "state": state, "at": now_iso(), "user": user})
    return out


def edited(doc: dict[str, Any], sections: object, version: object, user: str, state: object = None
           ) -> dict[str, Any]:
    """The draft with ``sections`` changed (PUT): optimistic, ``version`` must be the current one; ``state``
    (optional) ``draft`` or ``preliminary``."""
    if not isinstance(version, int) or isinstance(version, bool):
        raise ReportInvalid('"version" (an integer, the version edited) is required')
    if doc["state"] not in OPEN:
        raise ReportConflict(f"report {doc['id']} is {doc['state']}: a signed report is changed by an amendment "
                             "(POST .../amend)")
    if version != doc["version"]:
        raise ReportConflict(f"report {doc['id']} is at version {doc['version']}, not {version}: it was changed "
                             "meanwhile; read it again")
    target = doc["state"] if state is None else state
    if target not in OPEN:
        raise ReportInvalid(f'"state" may be {" or ".join(OPEN)} here (signing is POST .../sign)')
    merged = {**doc["sections"], **checked_sections(sections, doc["sections"])}
    return next_version(doc, str(target), user, sections=merged)


def check_signable(doc: dict[str, Any]) -> None:
    if doc["state"] not in OPEN:
        raise ReportConflict(f"report {doc['id']} is {doc['state']} already: amend it instead")


def signed(doc: dict[str, Any], user: str, at: str, sr_uid: str) -> dict[str, Any]:
    """The report signed by ``user`` at ``at``, its SR instance ``sr_uid``."""
    check_signable(doc)
    return next_version(doc, FINAL, user, signed_by=user, signed_at=at, sr=[*doc["sr"], sr_uid])


def check_amendable(doc: dict[str, Any], sections: object, reason: object) -> dict[str, str]:
    """The amended sections (the current ones with ``sections`` changed); ReportConflict unless signed."""
    if doc["state"] not in SIGNED:
        raise ReportConflict(f"report {doc['id']} is {doc['state']}: only a signed report is amended (sign it)")
    if not isinstance(reason, str) or not re.search(NOT_BLANK, reason):
        raise ReportInvalid('"reason" (why the signed report is amended) is required')
    return {**doc["sections"], **checked_sections(sections, doc["sections"])}


def amended(doc: dict[str, Any], sections: dict[str, str], reason: str, user: str, at: str, sr_uid: str
            ) -> dict[str, Any]:
    """The signed report amended by ``user`` at ``at``: its new sections, the reason, its new SR ``sr_uid``."""
    return next_version(doc, AMENDED, user, sections=sections, reason=reason.strip(), signed_by=user,
                        signed_at=at, sr=[*doc["sr"], sr_uid])


def with_dictation(doc: dict[str, Any], text: str, audio: dict[str, Any], user: str) -> dict[str, Any]:
    """The draft with ``text`` appended to its ``dictation`` section and the recording ``audio`` listed."""
    if doc["state"] not in OPEN:
        raise ReportConflict(f"report {doc['id']} is {doc['state']}: dictation goes into a draft")
    sections = dict(doc["sections"])
    before = sections.get(DICTATION, "")
    sections[DICTATION] = f"{before}\n{text}".strip() if before.strip() else text
    titles = {**doc.get("section_titles", {}), DICTATION: doc.get("section_titles", {}).get(DICTATION, "Dictation")}
    return next_version(doc, doc["state"], user, sections=sections, section_titles=titles,
                        audio=[*doc["audio"], audio])
