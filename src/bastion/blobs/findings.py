"""What the blob stores' copies were found wanting in, and their repairs: one :class:`Finding` each, appended to
the node's findings log (:class:`FindingLog`, ``<data>/copies.jsonl``), which ``/health``, the admin page and the
repair (:mod:`bastion.blobs.repair`) read back. Written by :class:`bastion.blobs.copies.Copies`."""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bastion.jsonlines import JsonLinesLog, parsed

#: What a finding says was wrong with one copy.
MISSING, CORRUPT, UNREADABLE, NOT_WRITTEN = "missing", "corrupt", "unreadable", "not written"


@dataclass(frozen=True)
class Finding:
    """One copy of one object found wanting (``problem``: missing, corrupt, unreadable, not written), or, with
    ``repaired`` set, made good again."""

    key: str
    store: str  # the store's location
    problem: str
    detail: str = ""
    time: float = 0.0
    repaired: bool = False


class FindingLog(JsonLinesLog):
    """``<data>/copies.jsonl``: every finding and every repair, one JSON line each, shared by a node's processes.

    :meth:`outstanding` and :meth:`summary` read it back: the copies found wanting and not repaired since. Each
    reader folds in only what was appended since it last looked (a log that grew by millions of lines while a lost
    store was refilled is not parsed again for every ``/health``); a log that was replaced is read again.
    """

    def __init__(self, path: str | None) -> None:
        super().__init__(path)
        self._fold_lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._offset = 0  # bytes of the file (entries in memory) folded in so far
        self._inode = 0  # the file's (a log replaced by another file is read again from its start)
        self._open: dict[tuple[str, str], Finding] = {}
        self._found = 0
        self._repaired = 0
        self._recent: deque[dict[str, Any]] = deque(maxlen=20)

    def record(self, finding: Finding) -> None:
        """Append ``finding`` (timed now unless it carries a time)."""
        entry = asdict(finding)
        entry["time"] = finding.time or time.time()
        self._append(entry)

    def _unread(self) -> list[dict[str, Any]]:
        """The entries appended since the last look (whole lines only: one being appended waits for the next)."""
        if self.path is None:
            with self._lock:
                new = self._memory[self._offset:]
            self._offset += len(new)
            return new
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                if st.st_size < self._offset or st.st_ino != self._inode:
                    self._reset()
                    self._inode = st.st_ino
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            if self._offset:
                self._reset()
            return []
        data = data[: data.rfind(b"\n") + 1]
        self._offset += len(data)
        return parsed(data.splitlines())

    def _fold(self) -> None:
        with self._fold_lock:
            for entry in self._unread():
                try:
                    finding = Finding(**{k: entry[k] for k in ("key", "store", "problem", "detail", "time",
                                                               "repaired")})
                except (KeyError, TypeError):
                    continue
                self._recent.append(entry)
                if finding.repaired:
                    self._repaired += 1
                    self._open.pop((finding.key, finding.store), None)
                else:
                    self._found += 1
                    self._open.setdefault((finding.key, finding.store), finding)

    def outstanding(self) -> list[Finding]:
        """Copies found wanting and not repaired since, oldest finding first (one per object and store)."""
        self._fold()
        with self._fold_lock:
            return list(self._open.values())

    def summary(self) -> dict[str, Any]:
        """For ``/api/statistics``, ``/health`` and the admin page: counts, and the latest entries."""
        outstanding = self.outstanding()
        with self._fold_lock:
            return {"found": self._found, "repaired": self._repaired, "outstanding": len(outstanding),
                    "outstanding_by_store": _count_by(outstanding, "store"), "recent": list(self._recent)}

    def size(self) -> int:
        """How many bytes (or, in memory, entries) the log holds."""
        if self.path is None:
            return self.count()
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0


def _count_by(findings: Sequence[Finding], attribute: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in findings:
        name = getattr(f, attribute)
        counts[name] = counts.get(name, 0) + 1
    return counts
