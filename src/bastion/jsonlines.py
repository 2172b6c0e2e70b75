"""Append-only JSON-lines logs shared by all of a node's processes (rejections, ingest warnings, copy findings).

Operational history, not archive state: each entry is one ``O_APPEND`` write, atomic across processes, and a full
disk loses the entry rather than failing what it describes.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any


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
        return parsed(self._lines()[-n:])

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, oldest first (a torn or foreign line is skipped)."""
        if self.path is None:
            with self._lock:
                return list(self._memory)
        return parsed(self._lines())


def parsed(lines: list[bytes]) -> list[dict[str, Any]]:
    """The entries of ``lines``, in order; a torn or foreign line is skipped."""
    out = []
    for raw in lines:
        try:
            out.append(json.loads(raw))
        except ValueError:
            continue
    return out
