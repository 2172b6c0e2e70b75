"""The load board: how many associations each DICOM worker process serves, shared by all of them.

:class:`LoadBoard` lives in memory mapped before the workers fork; :class:`bastion.dimse.server.DicomServer`
reads it to leave a new association to a less busy worker, and counts every association on it against the limits
``max_associations`` and ``max_associations_per_peer`` (PS3.8 9.3.4's local-limit-exceeded rejection).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import socket
import struct
import tempfile
from collections.abc import Iterator


def _anonymous_file(name: str) -> int:
    """A file descriptor of a new file no other process can open: a memfd on Linux, elsewhere (macOS) a temporary
    file removed at once."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create(name)
    fd, path = tempfile.mkstemp(prefix=f"{name}-")
    os.unlink(path)
    return fd


class LoadBoard:
    """How many associations each worker process serves, in memory shared by all of them (made before fork).

    The workers wait on one listening socket, and whichever wakes first would take the next association:
    with four senders and two workers, three associations often landed on one worker, which then ran them on
    one core under one GIL. A worker serving more associations than the least busy one leaves the next one
    to it (:meth:`DicomServer._accept_loop`). Each worker writes only its own slots: its association count,
    how many of them come from each peer address (``peers`` slots per worker) and, once it listens, its
    process id; a worker that is not listening, or whose process is gone, does not count.

    :meth:`admit` checks the limits on associations, in all and per peer address, and counts the new one in
    one step under a lock on the board (a POSIX record lock, which the kernel releases if its holder dies), so
    the limits hold over all workers even when several accept at once.
    """

    def __init__(self, workers: int, peers: int = 64) -> None:
        self.workers = workers
        self.peers = peers
        size = 4 * 2 * workers + _PEER_SLOT.size * workers * peers
        self._fd = _anonymous_file("bastion-load-board")  # shared across fork; its lock is the board's lock
        os.ftruncate(self._fd, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
        self._map = mmap.mmap(self._fd, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
        self._slots = memoryview(self._map).cast("i")  # counts, then process ids, then the peer slots

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _peer_offsets(self, worker: int) -> range:
        """The byte offsets of ``worker``'s peer slots (16-byte address, then its association count)."""
        first = 4 * 2 * self.workers + _PEER_SLOT.size * self.peers * worker
        return range(first, first + _PEER_SLOT.size * self.peers, _PEER_SLOT.size)

    def register(self, worker: int) -> None:
        """Mark ``worker`` as listening, in this process (a replacement for a worker that died starts from 0)."""
        with self._locked():
            self._slots[worker] = 0
            for offset in self._peer_offsets(worker):
                _PEER_SLOT.pack_into(self._map, offset, bytes(16), 0)
            self._slots[self.workers + worker] = os.getpid()

    def admit(self, worker: int, peer: str, max_total: int, max_per_peer: int) -> str | None:
        """Count one more association on ``worker`` from ``peer`` (an IP address) unless that passes a limit:
        ``max_total`` associations over all live workers, ``max_per_peer`` from one address.

        Returns None when it was counted (:meth:`release` uncounts it), else which limit was reached.
        """
        key = _address_key(peer)
        with self._locked():
            pids = self.pids()
            live = [w for w in range(self.workers) if pids[w] or w == worker]
            total = sum(self._slots[w] for w in live)
            if total >= max_total:
                return f"{total} associations already, the most allowed (max_associations = {max_total})"
            from_peer, free = 0, -1
            for w in live:
                for offset in self._peer_offsets(w):
                    address, count = _PEER_SLOT.unpack_from(self._map, offset)
                    if address == key:
                        from_peer += count
                        if w == worker:
                            free = offset
                    elif w == worker and free < 0 and count == 0:
                        free = offset
            if from_peer >= max_per_peer:
                return (f"{from_peer} associations from {peer} already, the most allowed "
                        f"(max_associations_per_peer = {max_per_peer})")
            if free < 0:
                return f"this worker serves {self.peers} peers already (max_associations = {max_total})"
            _, count = _PEER_SLOT.unpack_from(self._map, free)
            _PEER_SLOT.pack_into(self._map, free, key, count + 1)
            self._slots[worker] += 1
            return None

    def release(self, worker: int, peer: str) -> None:
        """Uncount an association :meth:`admit` counted."""
        key = _address_key(peer)
        with self._locked():
            self._slots[worker] = max(0, self._slots[worker] - 1)
            for offset in self._peer_offsets(worker):
                address, count = _PEER_SLOT.unpack_from(self._map, offset)
                if address == key:
                    _PEER_SLOT.pack_into(self._map, offset, key if count > 1 else bytes(16), max(0, count - 1))
                    return

    def set(self, worker: int, active: int) -> None:
        """Publish how many associations ``worker`` serves."""
        self._slots[worker] = active

    def least(self) -> int:
        """The fewest associations any listening worker serves (one that died or never started does not count)."""
        counts = [self._slots[w] for w in range(self.workers) if _alive(self._slots[self.workers + w])]
        return min(counts) if counts else 0

    def total(self) -> int:
        """How many associations all workers serve (a worker that died may still count its last ones)."""
        return sum(self._slots[w] for w in range(self.workers))

    def counts(self) -> list[int]:
        """How many associations each worker serves (0 for one that is not listening or is gone)."""
        pids = self.pids()
        return [self._slots[w] if pids[w] else 0 for w in range(self.workers)]

    def pids(self) -> list[int]:
        """The process id of each listening worker; 0 for one that is not listening or is gone."""
        return [pid if _alive(pid := self._slots[self.workers + w]) else 0 for w in range(self.workers)]


#: A peer slot of the :class:`LoadBoard`: an IPv6 (or IPv4-mapped) address and how many associations from it.
_PEER_SLOT = struct.Struct("=16si")


def _address_key(peer: str) -> bytes:
    """``peer``'s address as 16 bytes, an IPv4 address mapped into IPv6 (``::ffff:a.b.c.d``), so both forms
    of one address are one peer."""
    try:
        return socket.inet_pton(socket.AF_INET6, peer.split("%")[0])
    except OSError:
        try:
            return b"\0" * 10 + b"\xff\xff" + socket.inet_pton(socket.AF_INET, peer)
        except OSError:
            return hashlib.blake2b(peer.encode(), digest_size=16).digest()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
