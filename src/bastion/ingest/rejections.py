"""The rejection log and the ingest warnings log: one JSON line per object Bastion refused, or accepted with a
warning, shared by all worker processes.

Operational history for the admin page (``/api/statistics``), not archive state: losing either loses no image,
and every warning can be derived again from the stored object's bytes (``bastion.ingest.header.read_header``,
which ``bastion index rebuild`` runs on every object and reports). Appends are single ``O_APPEND`` writes,
atomic across processes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from bastion.model.records import StoreResult


class JsonLinesLog:
    """Appends and reads one JSON-lines file; ``path=None`` keeps the entries in memory only."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._memory: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def _append(self, entry: dict[str, Any]) -> None:
        """Append one entry (a full disk loses it silently)."""
        if self.path is None:
            with self._lock:
                self._memory.append(entry)
            return
        line = (json.dumps(entry) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError:
            pass  # a full disk must not turn a clean answer into a crash

    def _lines(self) -> list[bytes]:
        if self.path is None or not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as fh:
            return fh.read().splitlines()

    def count(self) -> int:
        """Entries recorded so far."""
        return len(self._memory) if self.path is None else len(self._lines())

    def tail(self, n: int = 20) -> list[dict[str, Any]]:
        """The last ``n`` entries, oldest first."""
        if self.path is None:
            return self._memory[-n:]
        out = []
        for raw in self._lines()[-n:]:
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
        return out


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
