"""The rejection log: one JSON line per object Bastion refused, shared by all worker processes.

Operational history for the admin page (``/api/statistics``), not archive state: losing it
loses no image. Appends are single ``O_APPEND`` writes, atomic across processes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any


class RejectionLog:
    """Appends and reads ``<data>/rejected.jsonl``; ``path=None`` keeps it in memory only."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._memory: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def record(self, origin: str, message: str) -> None:
        """Append one rejection."""
        entry = {"time": time.time(), "origin": origin, "message": message}
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
            pass  # a full disk must not turn a clean rejection into a crash

    def _lines(self) -> list[bytes]:
        if self.path is None or not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as fh:
            return fh.read().splitlines()

    def count(self) -> int:
        """Rejections recorded so far."""
        return len(self._memory) if self.path is None else len(self._lines())

    def tail(self, n: int = 20) -> list[dict[str, Any]]:
        """The last ``n`` rejections, oldest first."""
        if self.path is None:
            return self._memory[-n:]
        out = []
        for raw in self._lines()[-n:]:
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
        return out
