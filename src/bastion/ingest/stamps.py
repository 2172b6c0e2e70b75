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

The processes of a node (the server's workers, ``bastion import`` beside them) take turns issuing stamps: the last
stamp any of them issued is kept in ``<data>/stamp-ceiling.lock`` and read, under that file's ``flock``, by each
``next``, so stamps rise strictly across the node's processes too, however far behind the clock is. (That file is
not flushed: after a power failure, the durable ceiling is what every new process starts above.)

The ceiling is per node. Nodes sharing an index follow each other as a Lamport clock does: a node that finds
the current version of an instance stamped above its own stamp (another node's clock is ahead) stores its version
again under a stamp above that one (``next(above=...)``), and issues later stamps above it too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import weakref
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
        self._shared_fd = -1  # the lock file, open in process ``_shared_pid`` (a forked child opens its own)
        self._shared_pid = 0

    def next(self, above: str | None = None) -> str:
        """A stamp greater than every one issued before (by any process of the node, and before its start) and
        than ``above``: another node's stamp this one must follow (a version stored after it, see ``Ingest``).
        Stamps issued later stay above it too."""
        wanted = int(above) + 1 if above else 0
        with self._lock:
            if self._path is None:
                return self._issue(max(wanted, self._clock()))
            fd = self._shared()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                stamp = self._issue(max(_parse(os.pread(fd, 32, 0)) + 1, self._clock(), wanted))
                os.pwrite(fd, f"{int(stamp):020d}\n".encode(), 0)
                return stamp
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _issue(self, wanted: int) -> str:
        """The next stamp, at least ``wanted``; the ceiling raised first where it reaches it (lock held)."""
        stamp = max(self._last + 1, wanted)
        if stamp > _MAX_STAMP:
            raise OverflowError("ingest stamp past 20 digits")
        if self._path is not None and stamp >= self._ceiling:
            self._ceiling = _raise_ceiling_locked(self._path, stamp + RESERVE_NS)
        self._last = stamp
        return f"{stamp:020d}"

    def _shared(self) -> int:
        """This process's file description of ``<ceiling>.lock`` (``flock`` excludes only between descriptions)."""
        if self._shared_pid != os.getpid():
            assert self._path is not None
            self._shared_fd = os.open(self._path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._shared_pid = os.getpid()
            weakref.finalize(self, os.close, self._shared_fd)
        return self._shared_fd


def _parse(raw: bytes) -> int:
    """The number in ``raw`` (a ceiling or the last stamp), 0 where there is none."""
    text = raw.strip()
    return int(text) if text.isdigit() else 0


def read_ceiling(path: str) -> int:
    """The ceiling kept in ``path``, 0 where there is none yet (or it holds no number)."""
    try:
        with open(path, "rb") as fh:
            return _parse(fh.read(64))
    except FileNotFoundError:
        return 0


def raise_ceiling(path: str, wanted: int) -> int:
    """Make the ceiling in ``path`` at least ``wanted``, durably, and return it (it may be higher: another
    process of the node raised it further).

    The processes of a node share its data directory on one host: they take turns on an ``flock`` of
    ``<path>.lock``. The new value is written to a temporary file, flushed and renamed over ``path``, and the
    directory flushed, so a crash leaves the old ceiling or the new one, never a torn one.
    """
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _raise_ceiling_locked(path, wanted)
    finally:
        os.close(lock)


def _raise_ceiling_locked(path: str, wanted: int) -> int:
    """:func:`raise_ceiling` for a caller holding the ``flock`` of ``<path>.lock``."""
    directory = os.path.dirname(path) or "."
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

