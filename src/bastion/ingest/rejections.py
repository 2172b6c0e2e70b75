"""The rejection log and the ingest warnings log: one JSON line per object Bastion refused, or accepted with a
warning, shared by all worker processes.

Operational history for the admin page (``/api/statistics``), not archive state: losing either loses no image,
and every warning can be derived again from the stored object's bytes (``bastion.ingest.header.read_header``,
which ``bastion index rebuild`` runs on every object and reports). Appends are single ``O_APPEND`` writes,
atomic across processes.
"""

from __future__ import annotations

import os
import time

from bastion.jsonlines import JsonLinesLog
from bastion.model.records import StoreResult


class RejectionLog(JsonLinesLog):
    """``<data>/rejected.jsonl``: ``{"time", "origin", "message"}`` per refused object."""

    def record(self, origin: str, message: str) -> None:
        """Append one rejection."""
        self._append({"time": time.time(), "origin": origin, "message": message})


class IngestWarningLog(JsonLinesLog):
    """``<data>/warnings.jsonl``: one entry per object stored with warnings (``StoreResult.warnings``):
    ``{"time", "origin", "status", "sop_instance_uid", "sop_class_uid", "study_instance_uid", "blob_key",
    "warnings": [...]}``."""

    @classmethod
    def beside(cls, rejections: RejectionLog) -> IngestWarningLog:
        """The log ``warnings.jsonl`` in the rejection log's directory (in memory if that has no file)."""
        if rejections.path is None:
            return cls(None)
        return cls(os.path.join(os.path.dirname(rejections.path), "warnings.jsonl"))

    def record(self, origin: str, result: StoreResult) -> None:
        """Append the warnings of one stored object."""
        r = result.record
        self._append({"time": time.time(), "origin": origin, "status": result.status.value,
                      "sop_instance_uid": r.sop_uid, "sop_class_uid": r.sop_class_uid,
                      "study_instance_uid": r.study_uid, "blob_key": r.blob_key, "warnings": list(result.warnings)})
