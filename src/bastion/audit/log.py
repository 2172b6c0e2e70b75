"""The audit log (placeholder writer: one JSON line per event; the hash chain replaces it)."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time

from bastion.audit.events import AuditEvent


class AuditLog:
    """Appends audit events to ``path`` (``None``: kept in memory, for tests and read-only openers)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.memory: list[dict[str, object]] = []
        self._lock = threading.Lock()

    def record(self, event: AuditEvent) -> None:
        """Append one event; never raises (a failure to audit must not fail the access it describes)."""
        entry = {"time": time.time(), **dataclasses.asdict(event)}
        with self._lock:
            if self.path is None:
                self.memory.append(entry)
                return
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, (json.dumps(entry) + "\n").encode())
                finally:
                    os.close(fd)
            except OSError:
                pass

    def close(self) -> None:
        """Flush what is buffered."""
