"""A radiology report and its life: draft → preliminary → final (signed) → amended (addenda), every version kept.

A report is a JSON object (the API's and the blob store's form)::

    {"id", "study", "patient_id", "patient_name", "accession", "modality", "study_date", "template",
     "template_title", "state", "version", "sections": {name: text}, "section_titles": {name: title}, "author",
     "signed_by", "signed_at", "sr": [SOP Instance UIDs, oldest first], "audio": [{"id", "seconds",
     "content_type", "at", "user", "engine", "transcript", "status"?: "rejected"|"typed", "rejected_by", "rejected_at",
     "typed_by", "typed_at"}], "reason" (the last amendment's), "history": [{"version", "state", "at", "user"}]}

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

from bastion.errors import BastionError, NotFound
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


def _appended(doc: dict[str, Any], text: str) -> dict[str, Any]:
    """The changes that append ``text`` (a line of its own) to the ``dictation`` section, titled if it was not."""
    sections = dict(doc["sections"])
    before = sections.get(DICTATION, "")
    sections[DICTATION] = f"{before}\n{text}".strip() if before.strip() else text
    titles = {**doc.get("section_titles", {}), DICTATION: doc.get("section_titles", {}).get(DICTATION, "Dictation")}
    return {"sections": sections, "section_titles": titles}


def with_dictation(doc: dict[str, Any], text: str, audio: dict[str, Any], user: str) -> dict[str, Any]:
    """The draft with ``text`` appended to its ``dictation`` section and the recording ``audio`` listed."""
    if doc["state"] not in OPEN:
        raise ReportConflict(f"report {doc['id']} is {doc['state']}: dictation goes into a draft")
    return next_version(doc, doc["state"], user, **_appended(doc, text), audio=[*doc["audio"], audio])


#: A recording's ``status``: its transcript stands (no ``status``), the radiologist rejected it (it waits in the
#: typing queue), or a typist typed it from the audio.
REJECTED, TYPED = "rejected", "typed"


def _recording(doc: dict[str, Any], audio_id: str) -> tuple[int, dict[str, Any]]:
    """The place and entry of recording ``audio_id`` in the report's ``audio`` list; NotFound if it has none."""
    for n, entry in enumerate(doc.get("audio", [])):
        if entry.get("id") == audio_id:
            return n, entry
    raise NotFound(f"no recording {audio_id} of report {doc['id']}")


def _without(section: str, transcript: str) -> str:
    """``section`` without ``transcript``: its last line equal to it, else its last occurrence; as it was if the
    transcript is not there verbatim (edited since) or empty."""
    if not transcript:
        return section
    lines = section.split("\n")
    for n in range(len(lines) - 1, -1, -1):
        if lines[n].strip() == transcript:
            return "\n".join(lines[:n] + lines[n + 1:]).strip()
    head, found, tail = section.rpartition(transcript)
    return re.sub(r"[ \t]{2,}", " ", f"{head}{tail}").strip() if found else section


def rejected(doc: dict[str, Any], audio_id: str, user: str) -> dict[str, Any]:
    """The draft with recording ``audio_id``'s transcription rejected by ``user``: the entry's ``status``
    ``rejected`` (so it is in the typing queue) and its transcript taken out of the ``dictation`` section if it is
    still there verbatim."""
    if doc["state"] not in OPEN:
        raise ReportConflict(f"report {doc['id']} is {doc['state']}: a signed report's dictation is not rejected")
    n, entry = _recording(doc, audio_id)
    if entry.get("status") in (REJECTED, TYPED):
        raise ReportConflict(f"recording {audio_id} is {entry['status']} already")
    sections = dict(doc["sections"])
    sections[DICTATION] = _without(sections.get(DICTATION, ""), str(entry.get("transcript", "")))
    audio = list(doc["audio"])
    audio[n] = {**entry, "status": REJECTED, "rejected_by": user, "rejected_at": now_iso()}
    return next_version(doc, doc["state"], user, sections=sections, audio=audio)


def checked_typing(text: object) -> str:
    """A typist's text from a request; ReportInvalid unless it is non-empty text within a section's size."""
    if not isinstance(text, str) or not re.search(NOT_BLANK, text) or len(text) > MAX_SECTION or "\x00" in text:
        raise ReportInvalid(f'"text" (what was typed from the recording) is required: non-empty text of at most '
                            f"{MAX_SECTION} characters")
    return text.strip()


def typed(doc: dict[str, Any], audio_id: str, text: str, user: str) -> dict[str, Any]:
    """The draft with ``text``, typed by ``user`` from rejected recording ``audio_id``, appended to its
    ``dictation`` section; the entry's ``status`` ``typed`` (it leaves the typing queue)."""
    n, entry = _recording(doc, audio_id)
    if doc["state"] not in OPEN:
        raise ReportConflict(f"report {doc['id']} was signed meanwhile ({doc['state']}, by "
                             f"{doc.get('signed_by') or 'someone'}): the typed text was not added; the radiologist "
                             "may add it by amending the report")
    if entry.get("status") == TYPED:
        raise ReportConflict(f"recording {audio_id} was typed already, by {entry.get('typed_by')}")
    if entry.get("status") != REJECTED:
        raise ReportConflict(f"recording {audio_id} is not in the typing queue: its transcription was not rejected")
    audio = list(doc["audio"])
    audio[n] = {**entry, "status": TYPED, "typed_by": user, "typed_at": now_iso()}
    return next_version(doc, doc["state"], user, **_appended(doc, text), audio=audio)


def typing_queue(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The typing queue of reports ``docs``: the rejected, not yet typed recordings of the open ones, oldest
    rejection first, each with its report, study, patient, length and who dictated it."""
    items = [{"report": doc["id"], "audio": entry["id"], "study": doc.get("study", ""),
              "patient_id": doc.get("patient_id", ""), "patient_name": doc.get("patient_name", ""),
              "accession": doc.get("accession", ""), "modality": doc.get("modality", ""),
              "seconds": entry.get("seconds", 0), "content_type": entry.get("content_type", ""),
              "dictated_by": entry.get("user", ""), "dictated_at": entry.get("at", ""),
              "rejected_by": entry.get("rejected_by", ""), "rejected_at": entry.get("rejected_at", "")}
             for doc in docs if doc.get("state") in OPEN
             for entry in doc.get("audio", []) if entry.get("status") == REJECTED]
    return sorted(items, key=lambda i: (str(i["rejected_at"]), str(i["dictated_at"]), str(i["audio"])))
