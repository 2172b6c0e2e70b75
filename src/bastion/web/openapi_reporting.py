"""The OpenAPI description of the reporting API (``/api/templates``, ``/api/reports...``) and of the FHIR search
(``/fhir/DiagnosticReport``): paths and schemas that :func:`bastion.web.openapi.openapi_document` merges in.

Request schemas say only what the server checks (a body with more is accepted); docs/reporting.md explains."""

from __future__ import annotations

from typing import Any

from bastion.reporting.report import NOT_BLANK, STATES
from bastion.web.reporting import AUDIO_TYPES


def _json(description: str, schema: str, media: str = "application/json") -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _err(description: str) -> dict[str, Any]:
    return _json(description, "Error")


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


_ID = {"name": "id", "in": "path", "required": True, "description": "The report's id (32 hex digits).",
       "schema": {"type": "string"}}
_AUDIO_ID = {"name": "audio", "in": "path", "required": True, "description": "The recording's id.",
             "schema": {"type": "string"}}
_NOT_BLANK = {"type": "string", "pattern": NOT_BLANK}
#: Report text: a NUL character is refused (``reporting.report``: it cannot go into the SR, the PDF or HL7).
_NO_NUL = {"not": {"pattern": "\\u0000"}}
_SECTIONS = {"type": "object", "additionalProperties": {"type": "string", "maxLength": 100_000, **_NO_NUL},
             "description": "Text by section name (a section not named keeps its text)."}
_DATE = {"type": "string", "pattern": "^[0-9]{4}-?[0-9]{2}-?[0-9]{2}$"}
_COMMON = {"404": _err("No such report."), "503": _err("The index or the blob store failed.")}

_SECTION = {"type": "object", "required": ["name", "title", "text", "picklist"],
            "properties": {"name": {"type": "string"}, "title": {"type": "string"}, "text": {"type": "string"},
                           "picklist": {"type": "array", "items": {"type": "string"}}}}
_TEMPLATES = {"type": "object", "required": ["templates"], "properties": {"templates": {"type": "array", "items": {
    "type": "object", "required": ["name", "title", "modality", "sections"],
    "properties": {"name": {"type": "string"}, "title": {"type": "string"}, "modality": {"type": "string"},
                   "sections": {"type": "array", "items": _SECTION}}}}}}
_AUDIO_ENTRY = {"type": "object", "required": ["id", "seconds", "content_type", "at", "user"],
                "properties": {"id": {"type": "string"}, "seconds": {"type": "number", "minimum": 0},
                               "content_type": {"type": "string"}, "at": {"type": "string"},
                               "user": {"type": "string"}, "engine": {"type": "string"},
                               "transcript": {"type": "string"},
                               "status": {"enum": ["rejected", "typed"],
                                          "description": "Absent while the transcript stands."},
                               "rejected_by": {"type": "string"}, "rejected_at": {"type": "string"},
                               "typed_by": {"type": "string"}, "typed_at": {"type": "string"}}}
_QUEUE_ITEM = {"type": "object", "required": ["report", "audio", "study", "patient_id", "patient_name", "seconds",
                                              "dictated_by", "rejected_at"],
               "properties": {k: {"type": "string"} for k in (
                   "report", "audio", "study", "patient_id", "patient_name", "accession", "modality",
                   "content_type", "dictated_by", "dictated_at", "rejected_by", "rejected_at")}
               | {"seconds": {"type": "number", "minimum": 0}}}
_REPORT_ID = {**_ID, "name": "report"}
_REPORT = {
    "type": "object",
    "description": "A report's latest version (docs/reporting.md).",
    "required": ["id", "study", "patient_id", "patient_name", "accession", "modality", "template", "state",
                 "version", "sections", "author", "signed_by", "signed_at", "sr", "audio", "history"],
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"}, "study": {"type": "string"},
        "patient_id": {"type": "string"}, "patient_name": {"type": "string"}, "accession": {"type": "string"},
        "modality": {"type": "string"}, "study_date": {"type": "string"}, "template": {"type": "string"},
        "template_title": {"type": "string"}, "state": {"enum": list(STATES)},
        "version": {"type": "integer", "minimum": 1},
        "sections": {"type": "object", "additionalProperties": {"type": "string"}},
        "section_titles": {"type": "object", "additionalProperties": {"type": "string"}},
        "author": {"type": "string"}, "signed_by": {"type": "string"}, "signed_at": {"type": "string"},
        "reason": {"type": "string"},
        "sr": {"type": "array", "items": {"type": "string"}, "description": "The SR instances' SOP Instance UIDs."},
        "audio": {"type": "array", "items": _AUDIO_ENTRY},
        "history": {"type": "array", "items": {
            "type": "object", "required": ["version", "state", "at", "user"],
            "properties": {"version": {"type": "integer"}, "state": {"enum": list(STATES)},
                           "at": {"type": "string"}, "user": {"type": "string"}}}},
    },
}
_DICTATION = {"type": "object", "required": ["audio", "transcript", "seconds"],
              "properties": {"audio": {"type": "string"}, "transcript": {"type": "string"},
                             "seconds": {"type": "number", "minimum": 0}, "engine": {"type": "string"},
                             "report": {"$ref": "#/components/schemas/Report"}}}
_BUNDLE = {"type": "object", "required": ["resourceType", "type", "total", "entry"],
           "description": "A FHIR R4 searchset Bundle of DiagnosticReport resources.",
           "properties": {"resourceType": {"const": "Bundle"}, "type": {"const": "searchset"},
                          "total": {"type": "integer", "minimum": 0},
                          "entry": {"type": "array", "items": {"type": "object", "required": ["resource"]}}}}
_OUTCOME = {"type": "object", "required": ["resourceType", "issue"],
            "properties": {"resourceType": {"const": "OperationOutcome"}, "issue": {"type": "array"}}}

SCHEMAS: dict[str, Any] = {"Templates": _TEMPLATES, "Report": _REPORT, "Dictation": _DICTATION,
                           "Reports": {"type": "object", "required": ["reports"], "properties": {
                               "reports": {"type": "array", "items": {"$ref": "#/components/schemas/Report"}}}},
                           "Recordings": {"type": "object", "required": ["audio"], "properties": {
                               "audio": {"type": "array", "items": _AUDIO_ENTRY}}},
                           "TypingQueue": {"type": "object", "required": ["queue"], "properties": {
                               "queue": {"type": "array", "items": _QUEUE_ITEM}}},
                           "FhirBundle": _BUNDLE, "FhirOutcome": _OUTCOME}

PATHS: dict[str, Any] = {
    "/api/templates": {"get": {
        "operationId": "reportTemplates",
        "summary": "The report templates: shipped ones and the site's (<data>/report-templates/).",
        "responses": {"200": _json("The templates.", "Templates")},
    }},
    "/api/reports": {
        "get": {
            "operationId": "reports",
            "summary": "The reading list: reports, most recently changed first.",
            "parameters": [
                {"name": "state", "in": "query", "required": False, "schema": {"enum": list(STATES)}},
                {"name": "modality", "in": "query", "required": False, "schema": {"type": "string"}},
                {"name": "study", "in": "query", "required": False, "schema": {"type": "string"}},
                {"name": "patient", "in": "query", "required": False, "schema": {"type": "string"},
                 "description": "The Patient ID."},
                {"name": "from", "in": "query", "required": False, "schema": _DATE,
                 "description": "Studies on or after this date."},
                {"name": "to", "in": "query", "required": False, "schema": _DATE,
                 "description": "Studies on or before this date."},
                {"name": "q", "in": "query", "required": False, "schema": {"type": "string"},
                 "description": "Text in the patient's name or id or the accession number, any case."},
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 100}},
                {"name": "offset", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 0, "maximum": 10_000_000, "default": 0}},
            ],
            "responses": {"200": _json("The reports.", "Reports"), "400": _err("A parameter is out of range."),
                          "503": _err("The index failed.")},
        },
        "post": {
            "operationId": "createReport",
            "summary": "Start a draft of a stored study from a template.",
            "requestBody": _body({"type": "object", "required": ["study", "template"], "properties": {
                "study": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)*$", "maxLength": 64},
                "template": {"type": "string"}, "user": {"type": "string"}}}),
            "responses": {"201": _json("The new draft.", "Report"), "400": _err("The body is not as described."),
                          "404": _err("No such study or template."),
                          "409": _err("The study has an open (unsigned) report."),
                          "503": _err("The index or the blob store failed.")},
        },
    },
    "/api/reports/{id}": {
        "get": {"operationId": "report", "summary": "A report's latest version.", "parameters": [_ID],
                "responses": {"200": _json("The report.", "Report"), **_COMMON}},
        "put": {
            "operationId": "editReport",
            "summary": "Change a draft's sections (optimistic: `version` must be the current one).",
            "parameters": [_ID],
            "requestBody": _body({"type": "object", "required": ["version"], "properties": {
                "version": {"type": "integer"}, "sections": _SECTIONS,
                "state": {"enum": ["draft", "preliminary"]}, "user": {"type": "string"}}}),
            "responses": {"200": _json("The new version.", "Report"), "400": _err("The body is not as described."),
                          "409": _err("The version is not current, or the report is signed."),
                          **_COMMON},
        },
    },
    "/api/reports/{id}/sign": {"post": {
        "operationId": "signReport",
        "summary": "Sign a draft: state final, a Basic Text SR stored in the study.",
        "parameters": [_ID],
        "requestBody": _body({"type": "object", "required": ["user"], "properties": {"user": {
            **_NOT_BLANK, "description": "Who signs (while authentication is on, the caller signs and this is not looked at)."}}}),
        "responses": {"200": _json("The signed report.", "Report"), "400": _err("No `user` (authentication off)."),
                      "409": _err("The report is signed already."),
                      **_COMMON},
    }},
    "/api/reports/{id}/amend": {"post": {
        "operationId": "amendReport",
        "summary": "Amend a signed report: state amended, a new SR referencing the previous one.",
        "parameters": [_ID],
        "requestBody": _body({"type": "object", "required": ["reason"], "properties": {
            "sections": _SECTIONS, "reason": _NOT_BLANK, "user": {"type": "string"}}}),
        "responses": {"200": _json("The amended report.", "Report"), "400": _err("The body is not as described."),
                      "409": _err("The report is not signed."), **_COMMON},
    }},
    "/api/reports/{id}/audio": {
        "get": {"operationId": "reportRecordings", "summary": "The report's dictated recordings.",
                "parameters": [_ID], "responses": {"200": _json("The recordings.", "Recordings"), **_COMMON}},
        "post": {
            "operationId": "dictate",
            "summary": "Dictate: the recording is kept, transcribed, and its text appended to the `dictation` "
                       "section of the draft.",
            "parameters": [_ID],
            "requestBody": {"required": True, "content": {t: {"schema": {"type": "string", "format": "binary"}}
                                                          for t in AUDIO_TYPES}},
            "responses": {"201": _json("The transcript.", "Dictation"), "400": _err("The audio is broken."),
                          "409": _err("The report is signed."), "413": _err("The recording is too long."),
                          "415": _err("The audio's type or codec is not supported."),
                          "404": _err("No such report."),
                          "503": _err("The dictation engine, the index or the blob store failed.")},
        },
    },
    "/api/reports/{id}/audio/{audio}": {"get": {
        "operationId": "reportRecording", "summary": "One recording, as it was received.",
        "parameters": [_ID, _AUDIO_ID],
        "responses": {"200": {"description": "The recording.", "content": {
            t: {"schema": {"type": "string", "format": "binary"}} for t in AUDIO_TYPES}}, **_COMMON},
    }},
    "/api/reports/{id}/audio/{audio}/reject": {"post": {
        "operationId": "rejectTranscription",
        "summary": "Reject a recording's transcription: its transcript leaves the `dictation` section (if still "
                   "there verbatim) and the recording goes to the typing queue.",
        "parameters": [_ID, _AUDIO_ID],
        "responses": {"200": _json("The report's new version.", "Report"),
                      "404": _err("No such report or recording."),
                      "409": _err("The report is signed, or the recording was rejected already."),
                      "503": _err("The index or the blob store failed.")},
    }},
    "/api/typing": {"get": {
        "operationId": "typingQueue",
        "summary": "The typing queue: the rejected recordings of open reports not typed yet, oldest rejection first.",
        "responses": {"200": _json("The queue.", "TypingQueue"), "503": _err("The index failed.")},
    }},
    "/api/typing/{report}/{audio}": {
        "get": {
            "operationId": "typingRecording", "summary": "A recording in the typing queue, as it was received.",
            "parameters": [_REPORT_ID, _AUDIO_ID],
            "responses": {"200": {"description": "The recording.", "content": {
                t: {"schema": {"type": "string", "format": "binary"}} for t in AUDIO_TYPES}},
                "404": _err("No such report, or the recording is not in the typing queue."),
                "503": _err("The index or the blob store failed.")},
        },
        "post": {
            "operationId": "typeRecording",
            "summary": "The text typed from a queued recording: appended to the draft's `dictation` section; the "
                       "recording leaves the queue (`status` typed).",
            "parameters": [_REPORT_ID, _AUDIO_ID],
            "requestBody": _body({"type": "object", "required": ["text"], "properties": {
                "text": {**_NOT_BLANK, "maxLength": 100_000, **_NO_NUL}, "user": {"type": "string"}}}),
            "responses": {"200": _json("The report's new version.", "Report"),
                          "400": _err("No `text`, or it is empty or too long."),
                          "404": _err("No such report or recording."),
                          "409": _err("The report was signed meanwhile, or the recording is not in the queue "
                                      "(typed already, or never rejected)."),
                          "503": _err("The index or the blob store failed.")},
        },
    },
    "/fhir/DiagnosticReport": {"get": {
        "operationId": "fhirDiagnosticReports",
        "summary": "FHIR R4 search: the reports as DiagnosticReport resources in a searchset Bundle.",
        "parameters": [
            {"name": "patient", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "The Patient ID (or Patient/ID)."},
            {"name": "study", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "The Study Instance UID (or urn:oid:UID)."},
            {"name": "status", "in": "query", "required": False,
             "schema": {"enum": ["registered", "preliminary", "final", "amended"]}},
            {"name": "_count", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}},
        ],
        "responses": {"200": _json("The bundle.", "FhirBundle", "application/fhir+json"),
                      "400": _json("A parameter is not as described.", "FhirOutcome", "application/fhir+json"),
                      "503": _json("The index failed.", "FhirOutcome", "application/fhir+json")},
    }},
}

# What leaves the archive from a report (bastion.web.reporting_outputs): the printable PDF and the HL7 outbox.
_HL7_COUNTS = {k: {"type": "integer", "minimum": 0} for k in ("pending", "delivered", "dead")}
SCHEMAS["Hl7Outbox"] = {"type": "object", "required": ["receivers", "messages"], "properties": {
    "receivers": {"type": "array", "items": {
        "type": "object", "required": ["receiver", "since", "pending", "delivered", "dead", "last_error", "configured"],
        "properties": {"receiver": {"type": "string"}, "since": {"type": "string"}, "last_error": {"type": "string"},
                       "configured": {"type": "boolean"}, **_HL7_COUNTS}}},
    "messages": {"type": "array", "items": {
        "type": "object", "required": ["id", "receiver", "report", "version", "control_id", "state", "attempts",
                                       "last_error"],
        "properties": {"id": {"type": "integer"}, "receiver": {"type": "string"}, "report": {"type": "string"},
                       "version": {"type": "integer"}, "control_id": {"type": "string"},
                       "state": {"enum": ["pending", "delivered", "dead"]}, "attempts": {"type": "integer"},
                       "last_error": {"type": "string"}}}}}}
PATHS.update({
    "/api/reports/{id}/pdf": {"get": {
        "operationId": "reportPdf",
        "summary": "The report as a printable A4 PDF (a DRAFT / PRELIMINARY watermark while not signed).",
        "parameters": [_ID],
        "responses": {"200": {"description": "The PDF.", "content": {
            "application/pdf": {"schema": {"type": "string", "format": "binary"}}}}, **_COMMON},
    }},
    "/api/hl7": {"get": {
        "operationId": "hl7Outbox",
        "summary": "The HL7 ORU^R01 outbox: counts per receiver, and its pending and dead messages (admin).",
        "parameters": [
            {"name": "state", "in": "query", "required": False, "schema": {"enum": ["pending", "dead", "delivered"]},
             "description": "The messages in this state (default: pending and dead)."},
            {"name": "receiver", "in": "query", "required": False, "schema": {"type": "string"}},
            {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 0, "maximum": 1000}},
        ],
        "responses": {"200": _json("The outbox.", "Hl7Outbox"), "400": _err("A parameter is not as described."),
                      "503": _err("The outbox's database failed.")},
    }},
    "/api/hl7/retry": {"post": {
        "operationId": "hl7Retry",
        "summary": "Send the dead HL7 messages (of one receiver, else all) again, their attempts reset (admin).",
        "requestBody": {"required": False, "content": {"application/json": {"schema": {
            "type": "object", "properties": {"receiver": {"type": "string", "maxLength": 300,
                                        "description": "HOST:PORT"}}}}}},
        "responses": {"200": {"description": "How many.", "content": {"application/json": {"schema": {
            "type": "object", "required": ["retried"], "properties": {"retried": {"type": "integer"}}}}}},
            "400": _err("The body is not as described."), "503": _err("The outbox's database failed.")},
    }},
})

# The reading list (bastion.web.reading_list): studies with their report state, priority and claim; the claims.
_UID = {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)*$", "maxLength": 64}
_STUDY = {"name": "study", "in": "path", "required": True, "description": "The Study Instance UID.", "schema": _UID}
_CLAIM = {"type": ["object", "null"], "required": ["user", "expires"], "description": "The live claim; null: none.",
          "properties": {"user": {"type": "string"}, "expires": {"type": "string", "format": "date-time"}}}
_PRIORITY = {"enum": ["stat", "urgent", "routine"]}
_READING_STATES = ["unreported", *STATES]
SCHEMAS["ReadingList"] = {"type": "object", "required": ["studies", "claim_minutes"], "properties": {
    "claim_minutes": {"type": "number"},
    "studies": {"type": "array", "items": {
        "type": "object",
        "required": ["study", "patient_name", "patient_id", "accession", "study_date", "study_time", "description",
                     "modalities", "instances", "state", "report", "priority", "claim"],
        "properties": {
            **{k: {"type": "string"} for k in ("study", "patient_name", "patient_id", "accession", "study_date",
                                               "study_time", "description")},
            "modalities": {"type": "array", "items": {"type": "string"}},
            "instances": {"type": "integer", "minimum": 0}, "state": {"enum": _READING_STATES},
            "report": {"type": ["object", "null"], "required": ["id", "state", "version", "updated"],
                       "description": "The study's latest report; null: unreported.",
                       "properties": {"id": {"type": "string"}, "state": {"enum": list(STATES)},
                                      "version": {"type": "integer"}, "updated": {"type": "string"}}},
            "priority": _PRIORITY, "claim": _CLAIM}}}}}
SCHEMAS["ReadingClaim"] = {"type": "object", "required": ["study", "claim", "priority"], "properties": {
    "study": {"type": "string"}, "claim": _CLAIM, "priority": _PRIORITY}}
_USER_BODY = {"type": "object", "properties": {"user": {
    **_NOT_BLANK, "description": "Who claims (required while authentication is off; the caller otherwise)."}}}
_STUDY_ERRORS = {"400": _err("Not a Study Instance UID, or the body is not as described."),
                 "404": _err("No such study."), "503": _err("The index or the claims' database failed.")}
PATHS.update({
    "/api/reading-list": {"get": {
        "operationId": "readingList",
        "summary": "The reading list: studies, newest first, with their report state, priority and claim.",
        "parameters": [
            {"name": "modality", "in": "query", "required": False,
             "schema": {"type": "string", "pattern": "^[A-Z0-9_ ]{0,16}$"}},
            {"name": "from", "in": "query", "required": False, "schema": _DATE,
             "description": "Studies on or after this date."},
            {"name": "to", "in": "query", "required": False, "schema": _DATE,
             "description": "Studies on or before this date."},
            {"name": "priority", "in": "query", "required": False, "schema": _PRIORITY},
            {"name": "state", "in": "query", "required": False, "schema": {"enum": _READING_STATES}},
            {"name": "q", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "Text in the patient's name (any case), patient id or accession number."},
            {"name": "study", "in": "query", "required": False, "schema": _UID,
             "description": "One study (its Study Instance UID)."},
            {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 0, "maximum": 500, "default": 50}},
            {"name": "offset", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 0, "maximum": 100_000, "default": 0}},
        ],
        "responses": {"200": _json("The studies.", "ReadingList"), "400": _err("A parameter is not as described."),
                      "503": _err("The index or the claims' database failed.")},
    }},
    "/api/reading-list/{study}/claim": {
        "post": {
            "operationId": "claimStudy",
            "summary": "Claim the study for `report_claim_minutes` (or renew one's own claim).",
            "parameters": [_STUDY], "requestBody": _body(_USER_BODY),
            "responses": {"200": _json("The claim.", "ReadingClaim"),
                          "409": _err("Another user holds an unexpired claim (named in the error)."),
                          **_STUDY_ERRORS},
        },
        "delete": {
            "operationId": "releaseStudy",
            "summary": "Release one's claim on the study (an admin: anyone's).",
            "parameters": [_STUDY, {"name": "user", "in": "query", "required": False, "schema": _NOT_BLANK,
                                    "description": "Who releases (required while authentication is off)."}],
            "responses": {"200": {"description": "Whether a live claim was released.", "content": {
                "application/json": {"schema": {"type": "object", "required": ["study", "released"], "properties": {
                    "study": {"type": "string"}, "released": {"type": "boolean"}}}}}},
                "409": _err("Another user holds the claim."), **_STUDY_ERRORS},
        },
    },
    "/api/reading-list/{study}/priority": {"put": {
        "operationId": "setStudyPriority",
        "summary": "Set the study's reading priority (kept beside the claims).",
        "parameters": [_STUDY],
        "requestBody": _body({"type": "object", "required": ["priority"], "properties": {"priority": _PRIORITY}}),
        "responses": {"200": _json("The study's priority and claim.", "ReadingClaim"), **_STUDY_ERRORS},
    }},
})
