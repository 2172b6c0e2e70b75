"""The OpenAPI description of the security routes (docs/authentication.md, docs/audit.md, docs/deletion.md,
docs/export.md): login settings, the principal, break-glass overrides, the audit log, deleted studies, deleting and
undeleting a study, and export: paths and schemas that :func:`bastion.web.openapi.openapi_document` merges in."""

from __future__ import annotations

from typing import Any

from bastion.audit.chain import SINCE_PATTERN

_INT = {"type": "integer", "minimum": 0}
_NUMBER_OR_NULL = {"type": ["number", "null"], "minimum": 0}


def _json(description: str, schema: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


_TOMBSTONE = {
    "type": "object",
    "description": "A deleted study (docs/deletion.md): who deleted it, why, when, and how many instances it held.",
    "required": ["study", "patient_id", "user", "role", "via", "address", "reason", "at", "time_ns", "count", "state"],
    "properties": {
        "study": {"type": "string", "description": "The Study Instance UID."},
        "patient_id": {"type": "string"},
        "user": {"type": "string", "description": "Who deleted it."},
        "role": {"type": "string"},
        "via": {"type": "string", "description": "How: dicomweb, api, admin or cli."},
        "address": {"type": "string", "description": "The client's address."},
        "reason": {"type": "string"},
        "at": {"type": "string", "description": "When it was deleted (ISO 8601 UTC)."},
        "time_ns": {**_INT, "description": "The same, in nanoseconds since the epoch."},
        "count": {**_INT, "description": "Its instances when it was deleted."},
        "state": {"type": "string", "enum": ["deleted", "purging", "purged"],
                  "description": "deleted: hidden, undeletable; purging: a purge began; purged: its bytes are gone."},
    },
}
_DELETED = {
    "type": "object",
    "required": ["deletion_delay_days", "studies"],
    "properties": {
        "deletion_delay_days": {"type": "number", "minimum": 0,
                                "description": "Days a deleted study is kept before `bastion purge` may remove it."},
        "studies": {"type": "array", "items": {"$ref": "#/components/schemas/Tombstone"},
                    "description": "The tombstones, oldest deletion first."},
    },
}
#: A Study Instance UID in a route's path (digits and dots; any other text is answered 400).
_STUDY_UID = {"name": "study", "in": "path", "required": True,
              "description": "The Study Instance UID (digits and dots; any other text is answered 400).",
              "schema": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)*$", "maxLength": 128}}
_REASON_BODY = {"required": False, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"reason": {"type": "string", "maxLength": 1000}}}}}}
_AUTH_CONFIG = {
    "type": "object",
    "description": "How to log in (docs/authentication.md): public, also while authentication is off.",
    "additionalProperties": False,
    "required": ["enabled", "issuer", "client_id", "scope"],
    "properties": {
        "enabled": {"type": "boolean", "description": "`auth_enabled`: every route checked, default deny."},
        "issuer": {"type": ["string", "null"], "description": "The OpenID Connect issuer (`auth_issuer`)."},
        "client_id": {"type": ["string", "null"], "description": "The public client of the viewer and admin page."},
        "scope": {"type": "string"},
    },
}
_WHOAMI = {
    "type": "object",
    "description": "The party the request's credentials stand for (anonymous, an admin, while authentication is off).",
    "additionalProperties": False,
    "required": ["user", "role", "roles", "via", "emergency", "reason"],
    "properties": {
        "user": {"type": "string"}, "role": {"type": "string", "description": "The most privileged role held."},
        "roles": {"type": "array", "items": {"type": "string"}},
        "via": {"type": "string", "enum": ["oidc", "apikey", "emergency", "anonymous"]},
        "emergency": {"type": "boolean", "description": "A break-glass token."},
        "reason": {"type": ["string", "null"], "description": "The break-glass reason."},
    },
}
_EMERGENCY = {
    "type": "object",
    "description": "Break-glass tokens minted (`bastion emergency-token`) or used, newest first, for review.",
    "additionalProperties": False,
    "required": ["overrides", "active"],
    "properties": {
        "active": {**_INT, "description": "Tokens not expired yet."},
        "overrides": {"type": "array", "items": {
            "type": "object",
            "required": ["jti", "user", "role", "reason", "issued", "expires", "uses", "last_use", "active"],
            "properties": {
                "jti": {"type": "string"}, "user": {"type": "string"}, "role": {"type": "string"},
                "reason": {"type": "string"}, "minted_by": {"type": "string"},
                "issued": {"type": "number", "description": "Unix time, seconds."},
                "expires": {"type": "number", "description": "Unix time, seconds."},
                "uses": {**_INT, "description": "Requests made with it."},
                "first_use": _NUMBER_OR_NULL, "last_use": _NUMBER_OR_NULL,
                "last_address": {"type": "string"}, "active": {"type": "boolean"},
                "revoked": {**_NUMBER_OR_NULL, "description": "When it was revoked (Unix time); null: not revoked."},
            },
        }},
    },
}
#: ``since`` of ``/api/audit``: empty, or a UTC time in ISO 8601 (:func:`bastion.audit.chain.since_key`).
_SINCE = f"^({SINCE_PATTERN})?$"
_AUDIT_KINDS = ["association", "store", "query", "retrieve", "view", "export", "delete", "login", "emergency", "config"]
_AUDIT_ENTRY = {
    "type": "object",
    "description": "One audit log entry (docs/audit.md): the chain's fields and the event's; fields left at their "
                   "default are omitted.",
    "required": ["seq", "time", "kind", "outcome", "action", "prev", "hash"],
    "properties": {
        "seq": {"type": "integer", "minimum": 1}, "time": {"type": "string", "description": "UTC, ISO 8601, ms."},
        "kind": {"type": "string", "enum": _AUDIT_KINDS},
        "outcome": {"type": "integer", "enum": [0, 4, 8, 12],
                    "description": "PS3.15 EventOutcomeIndicator."},
        "action": {"type": "string", "enum": ["C", "R", "U", "D", "E"]},
        "user": {"type": "string"}, "role": {"type": "string"}, "address": {"type": "string"},
        "destination": {"type": "string"}, "via": {"type": "string"}, "patient_id": {"type": "string"},
        "studies": {"type": "array", "items": {"type": "string"}}, "count": _INT, "detail": {"type": "string"},
        "emergency": {"type": "boolean"}, "event_type": {"type": "string"}, "level": {"type": "string"},
        "recovered": {**_INT, "description": "The length of a torn line a crash left before this entry."},
        "prev": {"type": "string", "pattern": "^[0-9a-f]{64}$"}, "hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    },
}
_AUDIT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["entries", "count", "limit"],
    "properties": {"entries": {"type": "array", "items": _AUDIT_ENTRY, "description": "Newest first."},
                   "count": _INT, "limit": _INT},
}
_AUDIT_VERIFY = {
    "type": "object",
    "description": "The audit chain's check, as `bastion audit verify --json` prints it.",
    "additionalProperties": False,
    "required": ["ok", "entries", "last_seq", "crashes", "torn_tail", "problem", "file", "line", "seq", "message"],
    "properties": {
        "ok": {"type": "boolean"}, "entries": _INT, "last_seq": _INT,
        "crashes": {**_INT, "description": "Torn lines left by crashes, each accounted for."},
        "torn_tail": {"type": "boolean", "description": "The last line is torn (a crash, or a write under way)."},
        "problem": {"type": "string", "description": "Empty if ok."},
        "file": {"type": "string"}, "line": _INT, "seq": {"type": ["integer", "null"]},
        "message": {"type": "string"},
    },
}



SCHEMAS: dict[str, Any] = {"AuthConfig": _AUTH_CONFIG, "Whoami": _WHOAMI, "Emergency": _EMERGENCY,
                           "Tombstone": _TOMBSTONE, "Deleted": _DELETED, "Audit": _AUDIT, "AuditVerify": _AUDIT_VERIFY}

PATHS: dict[str, Any] = {
    "/api/studies/{study}/export": {"post": {
        "operationId": "exportStudy",
        "summary": "A study's current instances as a ZIP of DICOM files (as stored, or de-identified per "
                   "PS3.15 Annex E), streamed; admin only (docs/export.md).",
        "parameters": [
            {"name": "study", "in": "path", "required": True, "description": "The Study Instance UID "
             "(digits and dots; any other text is answered 400).",
             "schema": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)*$", "maxLength": 128}},
            {"name": "deidentify", "in": "query", "required": False,
             "description": "De-identify (Basic Application Level Confidentiality Profile, modified dates, "
                            "consistent UIDs).",
             "schema": {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"],
                        "default": "false"}},
            {"name": "include_burned_in", "in": "query", "required": False,
             "description": "De-identified: export instances that may carry burned-in text too.",
             "schema": {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"],
                        "default": "false"}},
        ],
        "responses": {
            "200": {"description": "The ZIP: <patient>/<study>/<series>/<instance>.dcm and "
                                   "export-report.json (last).",
                    "content": {"application/zip": {"schema": {"type": "string",
                                                               "contentMediaType": "application/zip"}}}},
            "400": _json("The study is not a UID, or a flag is not true or false.", "Error"),
            "403": _json("The caller's role is not admin.", "Error"),
            "404": _json("No such study here.", "Error"),
            "500": _json("The de-identification secret cannot be read.", "Error"),
            "503": _json("The index could not be read.", "Error"),
        },
    }},
    "/api/audit": {"get": {
        "operationId": "audit",
        "summary": "The newest audit log entries, newest first; admin only (docs/audit.md).",
        "parameters": [
            {"name": "since", "in": "query", "required": False,
             "description": "Only entries at or after this time (UTC, ISO 8601, e.g. 2026-12-07T06:00).",
             "schema": {"type": "string", "pattern": _SINCE}},
            {"name": "kind", "in": "query", "required": False, "description": "Only entries of this kind.",
             "schema": {"type": "string", "enum": _AUDIT_KINDS}},
            {"name": "limit", "in": "query", "required": False, "description": "At most this many entries.",
             "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
        ],
        "responses": {"200": _json("The entries.", "Audit"),
                      "400": _json("`since`, `kind` or `limit` is not valid.", "Error"),
                      "403": _json("The caller's role is not admin.", "Error")},
    }},
    "/api/audit/verify": {"get": {
        "operationId": "auditVerify",
        "summary": "Walk the audit log's hash chain and check it against its anchor; admin only.",
        "responses": {"200": _json("The result (`ok` false names the first bad entry).", "AuditVerify"),
                      "403": _json("The caller's role is not admin.", "Error")},
    }},
    "/api/deleted": {"get": {
        "operationId": "deletedStudies",
        "summary": "The deleted studies' tombstones (docs/deletion.md); admin only.",
        "responses": {"200": _json("The tombstones.", "Deleted"),
                      "403": _json("The caller's role is not admin.", "Error"),
                      "503": _json("The index could not be read.", "Error")},
    }},
    "/api/studies/{study}/undelete": {"post": {
        "operationId": "undeleteStudy",
        "summary": "Restore a deleted study that is not purged yet, exactly as it was; admin only.",
        "parameters": [_STUDY_UID],
        "requestBody": _REASON_BODY,
        "responses": {"200": _json("Undeleted: the tombstone it had.", "Tombstone"),
                      "400": _json("The study is not a UID, or the body is not {\"reason\": ...}.", "Error"),
                      "403": _json("The caller's role is not admin.", "Error"),
                      "404": _json("The study is not deleted.", "Error"),
                      "409": _json("Its purge has begun: it cannot be undeleted.", "Error"),
                      "503": _json("The index or the blob store failed.", "Error")},
    }},
    "/dicom-web/studies/{study}": {"delete": {
        "operationId": "deleteStudy",
        "summary": "Delete a study: tombstone it and hide it from every search and retrieval (its bytes are "
                   "kept until `bastion purge`, after deletion_delay_days); admin only (docs/deletion.md).",
        "parameters": [_STUDY_UID,
                       {"name": "reason", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "Why (else the body's `reason`)."}],
        "requestBody": _REASON_BODY,
        "responses": {"200": _json("Deleted: its tombstone.", "Tombstone"),
                      "400": _json("The study is not a UID, or the body is not {\"reason\": ...}.", "Error"),
                      "403": _json("The caller's role is not admin.", "Error"),
                      "404": _json("No such study here.", "Error"),
                      "409": _json("The study is deleted already.", "Error"),
                      "503": _json("The index or the blob store failed.", "Error")},
    }},
    "/api/auth/config": {"get": {
        "operationId": "authConfig",
        "summary": "How the viewer and the admin page log in (public).",
        "responses": {"200": _json("The login settings.", "AuthConfig")},
    }},
    "/api/whoami": {"get": {
        "operationId": "whoami",
        "summary": "Who the request's credentials stand for (any authenticated party).",
        "responses": {"200": _json("The principal.", "Whoami"),
                      "401": _json("No or bad credentials.", "Error")},
    }},
    "/api/emergency": {"get": {
        "operationId": "emergencyOverrides",
        "summary": "Break-glass tokens minted and used, for review (admin).",
        "responses": {"200": _json("The overrides.", "Emergency"),
                      "401": _json("No or bad credentials.", "Error"),
                      "403": _json("The caller's role is not admin.", "Error")},
    }},
}
