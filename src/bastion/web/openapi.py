"""The OpenAPI 3.1 description of Bastion's own JSON endpoints: ``/health`` and ``/api/*``.

Hand-written so it says exactly what the handlers in :mod:`bastion.web.app` and :mod:`bastion.web.api`
answer; ``tests/integration/test_api_fuzz.py`` checks every response against it with schemathesis.
DICOMweb (``/dicom-web``, ``/wado``) is described by PS3.18, not here. Served at ``/api/openapi.json``.
"""

from __future__ import annotations

from typing import Any

from bastion.web import openapi_reporting as reporting
from bastion.web import openapi_security as security

__all__ = ["openapi_document"]

_INT = {"type": "integer", "minimum": 0}
_NUMBER_OR_NULL = {"type": ["number", "null"], "minimum": 0}
_QUEUES = {
    "type": "object",
    "additionalProperties": False,
    "required": ["queues", "edge"],
    "properties": {"edge": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/Edge"}]},
                   "queues": {"type": "array", "items": {
        "type": "object",
        "description": "One destination's forwarding queue (`bastion queue list`).",
        "additionalProperties": False,
        "required": ["name", "to", "pending", "in_flight", "delivered", "dead", "oldest_pending_age_s",
                     "last_error", "last_error_at", "last_delivered_at"],
        "properties": {
            "name": {"type": "string", "description": "The rule's `name`, else its `to`."},
            "to": {"type": ["string", "null"], "description": "`AET@HOST:PORT` or a DICOMweb URL; null for a "
                                                             "queue whose rule is no longer configured."},
            "pending": _INT, "in_flight": _INT,
            "delivered": {**_INT, "description": "Instances delivered since the queue was made."},
            "dead": {**_INT, "description": "Dead letters: failed `forward_max_attempts` times."},
            "oldest_pending_age_s": {**_NUMBER_OR_NULL,
                                     "description": "Seconds the oldest waiting instance has waited; null: none."},
            "last_error": {"type": ["string", "null"]},
            "last_error_at": {**_NUMBER_OR_NULL, "description": "Unix time, seconds."},
            "last_delivered_at": {**_NUMBER_OR_NULL, "description": "Unix time, seconds."},
        },
    }}},
}
_EDGE = {
    "type": "object",
    "description": "Edge mode (`upstream` set): the backlog to upstream (the `upstream` queue) and what the edge "
                   "state holds; null on a node that is not an edge.",
    "additionalProperties": False,
    "required": ["upstream", "backlog", "oldest_unsent_age_s", "dead", "held_upstream", "prefetch_jobs",
                 "prefetched_studies", "last_reconcile"],
    "properties": {
        "upstream": {"type": "string"},
        "backlog": {**_INT, "description": "Instances not yet delivered upstream (pending and in flight)."},
        "oldest_unsent_age_s": {**_NUMBER_OR_NULL, "description": "Seconds the oldest unsent instance has waited."},
        "dead": {**_INT, "description": "Dead letters to upstream: pending again at the next reconciliation."},
        "held_upstream": {**_INT, "description": "Instances upstream holds (delivered there, or came from it)."},
        "prefetch_jobs": {**_INT, "description": "Prefetch jobs (priors, the prefetch query) waiting."},
        "prefetched_studies": {**_INT, "description": "Studies prefetched from upstream, evicted later."},
        "last_reconcile": {"type": ["object", "null"], "description": "The last reconciliation's counts."},
    },
}
_DIGESTS = {
    "type": "object",
    "additionalProperties": False,
    "required": ["study_uid", "instances"],
    "properties": {"study_uid": {"type": "string"}, "instances": {"type": "array", "items": {
        "type": "object", "additionalProperties": False,
        "required": ["sop_uid", "transfer_syntax", "digest", "dataset_digest"],
        "properties": {"sop_uid": {"type": "string"}, "transfer_syntax": {"type": "string"},
                       "digest": {"type": "string", "description": "The stored file's digest (its blob key's)."},
                       "dataset_digest": {"type": "string", "description": "BLAKE3 of the data set after the File "
                                          "Meta Information, which each receiver writes anew."}}}}},
}
_QUEUE_RETRY = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "retried"],
    "properties": {"name": {"type": "string"}, "retried": _INT},
}
_INDEX_REBUILD = {
    "type": "object",
    "description": "The online rebuild of the index (`bastion index rebuild` against a running server, SQLite "
                   "index): a new index is built beside the live one from the stored objects while the server "
                   "serves, then switched in during a short pause of every server process (connections wait).",
    "additionalProperties": False,
    "required": ["state", "done", "total", "started", "finished", "error", "report", "skipped", "switch_began",
                 "pause_s"],
    "properties": {
        "state": {"type": "string", "enum": ["idle", "building", "switching", "done", "failed"],
                  "description": "`idle`: none was asked for; `building`: the new index is built; `switching`: "
                                 "it is switched in (the server pauses); `done`; `failed` (see `error`: the live "
                                 "index stays)."},
        "done": {**_INT, "description": "Stored objects replayed into the new index."},
        "total": {"type": ["integer", "null"], "minimum": 0,
                  "description": "Stored objects to replay; null while they are listed."},
        "started": {"type": ["string", "null"], "description": "When it was asked for (ISO 8601, UTC)."},
        "finished": {"type": ["string", "null"], "description": "When it was switched in or failed."},
        "error": {"type": ["string", "null"], "description": "Why it failed."},
        "report": {"type": "object", "additionalProperties": _INT,
                   "description": "Once built: `indexed`, `superseded`, `duplicates`, `skipped`, `warned`, "
                                  "`set_aside`, and `caught_up` (objects stored during the rebuild, indexed too)."},
        "skipped": {"type": "array", "items": {"type": "array", "items": {"type": "string"}},
                    "description": "The first objects skipped: [key, why]."},
        "switch_began": {**_NUMBER_OR_NULL, "description": "When the server began stopping for the switch "
                                                           "(Unix time, seconds)."},
        "pause_s": {**_NUMBER_OR_NULL, "description": "Seconds from the stop to serving again on the new index."},
    },
}
_ERROR = {
    "type": "object",
    "description": "A client mistake: what was wrong with the request.",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}
_HEALTH = {
    "type": "object",
    "additionalProperties": False,
    "required": ["status", "version", "aet", "dicom", "uptime_seconds"],
    "properties": {
        "status": {"type": "string", "enum": ["ok", "starting", "degraded", "rebuilding"],
                   "description": "`starting` (HTTP 503) until every DICOM worker process has listened; then `ok`, "
                                  "or `degraded` (HTTP 200, with `reason`) while one is being replaced or while a "
                                  "blob store is unreachable or holds copies waiting for repair, or "
                                  "`rebuilding` (HTTP 200, with `reason` and `rebuild`) while the index is rebuilt "
                                  "from the stored objects at start (it was missing, empty or corrupt): stores are "
                                  "accepted, queries answer from what is indexed so far."},
        "reason": {"type": "string", "description": "Why the status is `degraded` or `rebuilding`."},
        "rebuild": {
            "type": "object",
            "description": "How far the index rebuild at start is, while it runs.",
            "additionalProperties": False,
            "required": ["done", "total"],
            "properties": {"done": {"type": "integer", "minimum": 0, "description": "Stored objects replayed."},
                           "total": {"type": ["integer", "null"], "minimum": 0,
                                     "description": "Stored objects to replay; null while they are listed."}},
        },
        "version": {"type": "string", "examples": ["0.1.0"]},
        "aet": {"type": "string", "description": "Bastion's AE title.", "examples": ["BASTION"]},
        "dicom": {
            "type": "object",
            "additionalProperties": False,
            "required": ["listening", "address"],
            "properties": {"listening": {"type": "boolean"},
                           "address": {"type": "string", "description": "`host:port`, empty until listening.",
                                       "examples": ["127.0.0.1:11112"]}},
        },
        "uptime_seconds": {"type": "number", "minimum": 0},
    },
}
_REJECTION = {
    "type": "object",
    "description": "One object Bastion refused (the rejection log).",
    "required": ["time", "origin", "message"],
    "properties": {
        "time": {"type": "number", "description": "Unix time, seconds."},
        "origin": {"type": "string", "description": "`stow`, `import` or `dimse:<calling AE>`.",
                   "examples": ["stow", "dimse:MODALITY"]},
        "message": {"type": "string"},
    },
}
_INGEST_WARNING = {
    "type": "object",
    "description": "One object Bastion stored with warnings (the ingest warnings log, `warnings.jsonl` in the data "
                   "directory): identifiable, but breaking a rule of the standard. Derived from the stored bytes.",
    "required": ["time", "origin", "status", "sop_instance_uid", "sop_class_uid", "study_instance_uid", "blob_key",
                 "warnings"],
    "properties": {
        "time": {"type": "number", "description": "Unix time, seconds."},
        "origin": {"type": "string", "description": "`stow`, `import` or `dimse:<calling AE>`."},
        "status": {"type": "string", "enum": ["stored", "duplicate", "superseded"]},
        "sop_instance_uid": {"type": "string"}, "sop_class_uid": {"type": "string"},
        "study_instance_uid": {"type": "string"}, "blob_key": {"type": "string"},
        "warnings": {"type": "array", "items": {"type": "string"},
                     "examples": [["SOPInstanceUID has a component with a leading zero (PS3.5 9.1)"]]},
    },
}
_STATISTICS = {
    "type": "object",
    "additionalProperties": False,
    "required": ["node_id", "patients", "studies", "series", "instances", "versions", "stored_bytes",
                 "last_change", "storage", "copies", "ingest", "last_errors", "last_warnings", "associations",
                 "associations_per_worker", "worker_pids"],
    "properties": {
        "node_id": {"type": "string", "pattern": "^[A-Za-z0-9-]{1,32}$",
                    "description": "This node's id among the nodes sharing the blob store (the `node_id` setting, "
                                   "or the one generated and kept in `<data>/node-id`)."},
        "patients": _INT, "studies": _INT, "series": _INT, "instances": _INT,
        "versions": {**_INT, "description": "Superseded versions kept besides the current instances."},
        "stored_bytes": {**_INT, "description": "Bytes of the current instances."},
        "last_change": {**_INT, "description": "Sequence number of the newest change-log entry (0: none)."},
        "storage": {
            "type": "object",
            "additionalProperties": False,
            "required": ["location", "used_bytes", "free_bytes", "set_aside", "file_write"],
            "properties": {"location": {"type": "string"},
                           "used_bytes": {"type": ["integer", "null"], "minimum": 0,
                                          "description": "null where the store cannot tell (S3)."},
                           "free_bytes": {"type": ["integer", "null"], "minimum": 0,
                                          "description": "null where the store cannot tell (S3)."},
                           "set_aside": {**_INT, "description": "Torn writes that crash recovery set aside (never "
                                                                 "acknowledged), in blobs/.quarantine for an "
                                                                 "operator to look at."},
                           "file_write": {"type": "string", "enum": ["compiled", "python", "none"],
                                          "description": "Whether objects of 128 KB and more are written by the C "
                                                         "extension built at install, which runs beside the index "
                                                         "statements without Python's lock, or in Python; `none` for a store that writes no files (S3)."}},
        },
        "copies": {
            "type": "object",
            "description": "The blob stores, each holding a copy of every object, and what was found wanting in "
                           "them (docs/configuration.md, \"Several copies\").",
            "additionalProperties": False,
            "required": ["required", "stores", "findings", "scrub"],
            "properties": {
                "required": {**_INT, "description": "Durable copies a store needs before it is answered success."},
                "stores": {"type": "array", "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["location", "state", "reason", "used_bytes", "free_bytes", "wanting", "landing"],
                    "properties": {
                        "location": {"type": "string"},
                        "state": {"type": "string", "enum": ["ok", "wanting", "unreachable"],
                                  "description": "`unreachable`: the store cannot be reached now; `wanting`: "
                                                 "copies found missing, corrupt or not written there wait for "
                                                 "repair."},
                        "reason": {"type": "string"},
                        "used_bytes": {"type": ["integer", "null"], "minimum": 0},
                        "free_bytes": {"type": ["integer", "null"], "minimum": 0},
                        "wanting": {**_INT, "description": "Copies in this store waiting for repair."},
                        "landing": {
                            "type": ["object", "null"],
                            "description": "The landing in front of an S3 store (docs/deployment.md): objects durable "
                                           "in PostgreSQL that wait to be moved into the bucket, looked up at most "
                                           "every 5 s; null without one; `error` alone if PostgreSQL did not answer.",
                            "additionalProperties": False,
                            "properties": {
                                "objects": _INT, "bytes": _INT,
                                "oldest_s": {**_NUMBER_OR_NULL, "description": "Seconds since the oldest landed."},
                                "max_bytes": {**_INT, "description": "`[landing] max_kb` in bytes (0: none lands)."},
                                "total_bytes": {**_INT, "description": "`[landing] total_mb` in bytes."},
                                "error": {"type": "string"}}}}}},
                "scrub": {
                    "type": ["object", "null"],
                    "description": "Where the scrub (every copy re-hashed, within `scrub_days`) is: null with one "
                                   "store, or before it first ran. `checked` ... `repaired` count the cycle under "
                                   "way (the last one's, between cycles).",
                    "additionalProperties": False,
                    "required": ["cycles", "last_cycle_finished", "cycle_started", "store", "checked", "bytes",
                                 "corrupt", "unreadable", "repaired"],
                    "properties": {
                        "cycles": {**_INT, "description": "Cycles completed."},
                        "last_cycle_finished": {"type": ["number", "null"], "description": "Unix time."},
                        "cycle_started": {"type": ["number", "null"],
                                          "description": "Unix time; null between cycles."},
                        "store": {"type": ["string", "null"], "description": "The store being re-hashed."},
                        "checked": _INT, "bytes": _INT, "corrupt": _INT, "unreadable": _INT, "repaired": _INT}},
                "findings": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["found", "repaired", "outstanding", "outstanding_by_store", "recent"],
                    "properties": {
                        "found": {**_INT, "description": "Copies found missing, corrupt, unreadable or not written."},
                        "repaired": {**_INT, "description": "Copies made good again."},
                        "outstanding": {**_INT, "description": "Copies found wanting and not repaired since."},
                        "outstanding_by_store": {"type": "object", "additionalProperties": _INT},
                        "recent": {"type": "array", "maxItems": 20, "items": {
                            "type": "object",
                            "required": ["key", "store", "problem", "detail", "time", "repaired"],
                            "properties": {"key": {"type": "string"}, "store": {"type": "string"},
                                           "problem": {"type": "string",
                                                       "enum": ["", "missing", "corrupt", "unreadable",
                                                                "not written"]},
                                           "detail": {"type": "string"}, "time": {"type": "number"},
                                           "repaired": {"type": "boolean"}}}}}},
            },
        },
        "ingest": {
            "type": "object",
            "additionalProperties": False,
            "required": ["last_minute_instances", "rejected", "warned", "header_scan", "index_record"],
            "properties": {"last_minute_instances": _INT,
                           "rejected": {**_INT, "description": "Objects refused since the data directory was made."},
                           "warned": {**_INT, "description": "Objects stored with warnings since the data directory "
                                                             "was made (a UID breaking PS3.5 9.1, a File Meta "
                                                             "naming another SOP instance)."},
                           "header_scan": {"type": "string", "enum": ["compiled", "python"],
                                           "description": "Whether the store path's header scan runs as the C "
                                                          "extension built at install, or as its slower Python "
                                                          "twin (no C compiler at install)."},
                           "index_record": {"type": "string", "enum": ["compiled", "python"],
                                            "description": "Whether the index records an instance that changes no "
                                                           "level row in C, or all in Python (no C compiler or "
                                                           "SQLite headers at install)."}},
        },
        "last_errors": {"type": "array", "maxItems": 20, "items": {"$ref": "#/components/schemas/Rejection"},
                        "description": "The newest rejections, oldest first."},
        "last_warnings": {"type": "array", "maxItems": 20, "items": {"$ref": "#/components/schemas/IngestWarning"},
                          "description": "The newest objects stored with warnings, oldest first."},
        "associations": {**_INT, "description": "DICOM associations open now, in all worker processes."},
        "associations_per_worker": {"type": "array", "items": _INT,
                                    "description": "DICOM associations open now in each worker process."},
        "worker_pids": {"type": "array", "items": _INT,
                        "description": "Process id of each DICOM worker process; 0 while one is not listening "
                                       "(starting, or replaced after it died)."},
    },
}
_CHANGE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["seq", "kind", "sop_uid", "series_uid", "study_uid", "blob_key", "at"],
    "properties": {
        "seq": {"type": "integer", "minimum": 1},
        "kind": {"type": "string", "enum": ["stored", "superseded", "deleted", "copy-wanting", "copy-repaired"],
                 "description": "`stored`: a new instance; `superseded`: new bytes for a known SOP Instance UID; "
                                "`deleted`: an instance removed; `copy-wanting`: a copy of the version `blob_key` "
                                "found missing, corrupt, unreadable or not written in one blob store; "
                                "`copy-repaired`: such a copy made good again (which store and what was wrong: "
                                "`/api/statistics` `copies.findings`). Series and study UIDs are empty for a "
                                "version not indexed yet."},
        "sop_uid": {"type": "string"}, "series_uid": {"type": "string"}, "study_uid": {"type": "string"},
        "blob_key": {"type": "string", "description": "Where the stored version lives in the blob store."},
        "at": {"type": "string", "description": "When it was indexed (ISO 8601, UTC)."},
    },
}
_CHANGES = {
    "type": "object",
    "additionalProperties": False,
    "required": ["changes", "last"],
    "properties": {
        "changes": {"type": "array", "items": {"$ref": "#/components/schemas/Change"}},
        "last": {**_INT, "description": "`seq` of the last entry returned (else `since`): the next `since`."},
    },
}
_REMOTES = {
    "type": "object",
    "additionalProperties": False,
    "required": ["remotes"],
    "properties": {"remotes": {"type": "array", "items": {
        "type": "object",
        "additionalProperties": False,
        "required": ["aet", "host", "port", "tls"],
        "properties": {"aet": {"type": "string", "maxLength": 16}, "host": {"type": "string"},
                       "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                       "tls": {"type": "boolean", "description": "reached over DICOM TLS (a tls:// remote)"}},
    }}},
}

def _json(description: str, schema: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _path_parameter(name: str, description: str) -> dict[str, Any]:
    """A required text parameter of a route's path."""
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}, "description": description}


def openapi_document(version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``/health`` and ``/api/*`` (Bastion ``version``)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Bastion JSON API",
            "version": version,
            "summary": "Health, statistics, change log and configured remotes of a Bastion PACS.",
            "description": "DICOMweb (QIDO-RS, WADO-RS, STOW-RS under /dicom-web, WADO-URI at /wado) "
                           "follows DICOM PS3.18 and is not described here.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "paths": {
            "/health": {"get": {
                "operationId": "health",
                "summary": "Liveness: is the DICOM listener up?",
                "responses": {"200": _json("Serving DICOM and HTTP.", "Health"),
                              "503": _json("Starting: the DICOM listener is not up yet.", "Health")},
            }},
            "/api/statistics": {"get": {
                "operationId": "statistics",
                "summary": "Archive counts, storage use, ingest rate and the last rejections.",
                "responses": {"200": _json("The statistics.", "Statistics")},
            }},
            "/api/changes": {"get": {
                "operationId": "changes",
                "summary": "The change log after `since`, oldest first (poll with `since` = the last `last`).",
                "parameters": [
                    {"name": "since", "in": "query", "required": False,
                     "description": "Return entries with `seq` greater than this.",
                     "schema": {"type": "integer", "minimum": 0, "maximum": 2**62, "default": 0}},
                    {"name": "limit", "in": "query", "required": False,
                     "description": "At most this many entries.",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 10_000, "default": 100}},
                ],
                "responses": {"200": _json("Change-log entries.", "Changes"),
                              "400": _json("`since` or `limit` is not an integer in range.", "Error")},
            }},
            "/api/remotes": {"get": {
                "operationId": "remotes",
                "summary": "The configured C-MOVE destinations.",
                "responses": {"200": _json("The remote AEs.", "Remotes")},
            }},
            "/api/queues": {"get": {
                "operationId": "queues",
                "summary": "The forwarding queues ([[forward]] rules), one per destination, and an edge's backlog.",
                "responses": {"200": _json("Each destination's queue.", "Queues")},
            }},
            "/api/queues/{name}/retry": {"post": {
                "operationId": "retryQueue",
                "summary": "Make a destination's dead letters pending again, their attempts reset.",
                "parameters": [_path_parameter("name", "The destination's name (its rule's `name`, else its `to`).")],
                "responses": {"200": _json("How many dead letters are pending again.", "QueueRetry"),
                              "404": _json("No queue of that name.", "Error")},
            }},
            "/api/studies/{study}/digests": {"get": {
                "operationId": "studyDigests",
                "summary": "What this node stores of each current instance of a study (an edge's reconciliation).",
                "parameters": [_path_parameter("study", "The Study Instance UID.")],
                "responses": {"200": _json("Each instance's transfer syntax and digests.", "Digests"),
                              "404": _json("No such study here (or not a UID).", "Error"),
                              "503": _json("A stored object could not be read.", "Error")},
            }},
            "/api/index/rebuild": {
                "get": {
                    "operationId": "indexRebuildState",
                    "summary": "Where the online rebuild of the index is.",
                    "responses": {"200": _json("The rebuild's state.", "IndexRebuild")},
                },
                "post": {
                    "operationId": "indexRebuild",
                    "summary": "Rebuild the index from the stored objects while the server serves (SQLite index).",
                    "responses": {"202": _json("Started: the rebuild's state.", "IndexRebuild"),
                                  "409": _json("A rebuild runs already, or this server cannot rebuild online (a "
                                               "PostgreSQL index is rebuilt offline only, for now).", "Error")},
                },
            },
            "/api/openapi.json": {"get": {
                "operationId": "openapi",
                "summary": "This document.",
                "responses": {"200": {"description": "The OpenAPI 3.1 document.",
                                      "content": {"application/json": {"schema": {"type": "object"}}}}},
            }},
            **security.PATHS,
            **reporting.PATHS,
        },
        "components": {"schemas": {
            **reporting.SCHEMAS,
            **security.SCHEMAS,
            "Health": _HEALTH, "Statistics": _STATISTICS, "Rejection": _REJECTION, "IngestWarning": _INGEST_WARNING,
            "Change": _CHANGE,
            "Changes": _CHANGES, "Remotes": _REMOTES, "Queues": _QUEUES, "QueueRetry": _QUEUE_RETRY, "Error": _ERROR,
            "Edge": _EDGE, "Digests": _DIGESTS,
            "IndexRebuild": _INDEX_REBUILD,
        }},
    }
