"""Ingest stamps: the 20-digit nanosecond numbers in blob keys that order the versions of one SOP instance.

A stamp is the clock's time in nanoseconds since the epoch, but never less than one more than the last stamp
this node issued, *including stamps issued before a restart*: a clock that steps back (an NTP correction, a
virtual machine restored from a snapshot) cannot make a newer version sort before an older one, in the live
index or in ``bastion index rebuild``, which orders versions by stamp alone.

The guarantee across restarts comes from a *ceiling* kept in a small file of the node's data directory
(``<data>/stamp-ceiling``, 20 digits): every stamp any process of the node has issued is below the ceiling in
that file, which is written (durably, and only ever raised) *before* a stamp at or above the old ceiling is
handed out. Each write reserves :data:`RESERVE_NS` ahead, so a process storing continuously writes it about
once a minute. A process starts issuing above the ceiling it reads (and above the newest stamp its index holds,
for an archive that had no ceiling file yet), so after a restart stamps may run up to :data:`RESERVE_NS`
ahead of the clock until it catches up.

The ceiling is per node; nodes sharing a blob store order their versions of one instance by their clocks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable

from bastion.blobs.fileio import sync_all

#: How far ahead of the stamp being issued one write of the ceiling reserves.
RESERVE_NS = 60 * 1_000_000_000
#: The largest stamp that fits the key's 20 digits.
_MAX_STAMP = 10**20 - 1


class IngestStamps:
    """Strictly increasing 20-digit nanosecond stamps, above every stamp issued before ``floor`` and, with
    ``ceiling_file``, above every stamp any process of this node issued before (see the module docstring).

    ``clock`` returns nanoseconds since the epoch (injected so a test can make it go backwards). Thread-safe.
    """

    def __init__(self, *, clock: Callable[[], int] = time.time_ns, floor: int = 0,
                 ceiling_file: str | None = None) -> None:
        self._clock = clock
        self._path = ceiling_file
        self._lock = threading.Lock()
        self._ceiling = read_ceiling(ceiling_file) if ceiling_file is not None else 0
        self._last = max(floor, self._ceiling)

    def next(self) -> str:
        """A stamp greater than every one issued before (this process's, and the node's before its start)."""
        with self._lock:
            stamp = max(self._last + 1, self._clock())
            if stamp > _MAX_STAMP:
                raise OverflowError("ingest stamp past 20 digits")
            if self._path is not None and stamp >= self._ceiling:
                self._ceiling = raise_ceiling(self._path, stamp + RESERVE_NS)
            self._last = stamp
            return f"{stamp:020d}"


def read_ceiling(path: str) -> int:
    """The ceiling kept in ``path``, 0 where there is none yet (or it holds no number)."""
    try:
        with open(path, "rb") as fh:
            text = fh.read(64).strip()
    except FileNotFoundError:
        return 0
    return int(text) if text.isdigit() else 0


def raise_ceiling(path: str, wanted: int) -> int:
    """Make the ceiling in ``path`` at least ``wanted``, durably, and return it (it may be higher: another
    process of the node raised it further).

    The processes of a node share its data directory on one host: they take turns on an ``flock`` of
    ``<path>.lock``. The new value is written to a temporary file, flushed and renamed over ``path``, and the
    directory flushed, so a crash leaves the old ceiling or the new one, never a torn one.
    """
    directory = os.path.dirname(path) or "."
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ceiling = max(read_ceiling(path), min(wanted, _MAX_STAMP))
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, f"{ceiling:020d}\n".encode())
                sync_all(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            sync_all(dfd)
        finally:
            os.close(dfd)
        return ceiling
    finally:
        os.close(lock)
