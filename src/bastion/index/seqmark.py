"""The change log's durable high-water mark: a number that no ``seq`` the index has handed out exceeds.

It lives in a small file beside the index file (:data:`SUFFIX`) and survives what the index's own rows may not:
a power failure that loses the index's last commits (SQLite with ``synchronous=NORMAL``), and a rebuild into a
new file (``bastion index rebuild`` moves the new index's mark in with it). It is a floor, never truth: the
stored DICOM files are the truth and the index a rebuildable cache, so a lost or unreadable mark costs nothing
but the guarantee that sequence numbers are not reused after a power failure.

Guarantees:

* The mark never goes down: every write, from any process, takes the larger of the file's value and its own
  under an exclusive ``flock`` on the file, and is ``fsync``'d before it returns.
* It is kept ahead of the log: :meth:`SeqMark.cover` is called with every ``seq`` handed out, and reserves
  :data:`AHEAD` more whenever a ``seq`` comes within half of that of the mark. A change log that continues after
  the mark (:meth:`bastion.index.base.Index.resume_log_after_crash`) thus never hands out a ``seq`` that was
  handed out before a crash, unless more than ``AHEAD // 2`` commits ran between a commit and its cover.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading

log = logging.getLogger("bastion.index")

#: What the mark's file name adds to the index file's.
SUFFIX = "-seqmark"
#: How far the mark is kept ahead of the newest ``seq`` (one file write and ``fsync`` per ``AHEAD // 2`` seqs).
AHEAD = 1 << 16
_WIDTH = 20  # digits: the value is rewritten in place, never longer than one disk sector


class SeqMark:
    """The durable high-water mark of one index's change log (in memory only for an in-memory index)."""

    def __init__(self, index_path: str | None) -> None:
        self.path = None if index_path is None else index_path + SUFFIX
        self._lock = threading.Lock()
        self._value = 0
        self._value = self.read()

    def read(self) -> int:
        """The mark as stored now (0 if there is none or it cannot be read)."""
        if self.path is None:
            return self._value
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("change-log mark %s cannot be read (%s): taken as 0", self.path, exc)
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return _parse(os.pread(fd, 64, 0), self.path)
        finally:
            os.close(fd)

    def cover(self, seq: int) -> None:
        """Make sure the mark stays ahead of ``seq`` (a sequence number just handed out): durable on return."""
        if seq + AHEAD // 2 <= self._value:
            return
        self.raise_to(seq + AHEAD)

    def raise_to(self, value: int) -> int:
        """Raise the mark to at least ``value`` (never lower it); the mark now, durable on return."""
        with self._lock:
            if self.path is None:
                self._value = max(self._value, value)
                return self._value
            created = not os.path.exists(self.path)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                stored = _parse(os.pread(fd, 64, 0), self.path)
                if value > stored:
                    os.pwrite(fd, f"{value:0{_WIDTH}d}\n".encode(), 0)
                    os.fsync(fd)
                    if created:
                        _fsync_directory(os.path.dirname(os.path.abspath(self.path)))
                self._value = max(stored, value)
            finally:
                os.close(fd)
            return self._value


def _parse(raw: bytes, path: str) -> int:
    text = raw.decode("ascii", "replace").strip()
    if not text:
        return 0
    try:
        return max(0, int(text.split()[0]))
    except ValueError:
        log.warning("change-log mark %s holds %r, not a number: taken as 0", path, text[:40])
        return 0


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
