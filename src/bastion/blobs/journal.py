"""Write-ahead journal of the filesystem blob store: an object made durable by one ``fdatasync``.

Making a new file durable costs a journaling filesystem two journal commits: ``fsync`` of the file (its
blocks and inode) and ``fsync`` of its directory (its name), each also waiting for whatever else the
filesystem has pending; a store must not be acknowledged before its object is durable.

The journal makes an object durable with one write into a *segment*, a file whose blocks were
allocated and zero-filled up front: the write changes no metadata, so ``fdatasync`` only flushes the
data (see BENCHMARKS.md, "The journal"). The object is also written to its final file, without a
flush. A background checkpoint makes those files durable in bulk (one ``syncfs``) and then retires
the segment. After a crash or a power failure :func:`replay` rewrites, from the journal, every object
whose final file is missing or incomplete; it runs whenever a blob store is opened, on the segments
of this node's processes that are gone (a live process holds an exclusive ``flock`` on its own segments).

Segments are named after the node that writes them, ``<node>-<uuid>.wal`` (and ``.tmp-<node>-<uuid>``
while being made): nodes sharing a blob store never replay or remove each other's segments, whether or
not their filesystem carries ``flock`` between hosts; a node's segments wait for that node's next start.
Segments named in the single-node form, ``<uuid>.wal``, are taken by any node (they come from an archive
that had one).

Concurrent appends in one process share ``fdatasync`` calls (group commit). Each process has its
own pair of segments: one takes appends while the other is checkpointed.

Segment layout: a 4 KiB header (``BASTION-BLOB-JOURNAL-02``, generation) then records::

    "BJR1" | generation u64 | kind u8 | key length u16 | data length u64 | BLAKE3 of data | CRC-32
    key (UTF-8) | data

The CRC covers the fixed fields and the key. A record counts only if its generation is the segment's
(a reused segment starts a new generation, so older records behind it are ignored), its CRC matches
and its data hashes to its digest (a torn write, which was never acknowledged, fails that and ends
the scan). Kind 1 is a tombstone: the key was deleted after being journaled.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import logging
import os
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from bastion.blobs.fileio import sync_all, sync_data
from bastion.model import digest as content_digest

log = logging.getLogger("bastion.blobs")

SEGMENT_MAGIC = b"BASTION-BLOB-JOURNAL-02\n"  # 24 bytes; records carry BLAKE3 digests
#: Segments written before BLAKE3 (their records carry SHA-256 digests): still replayed.
_SEGMENT_MAGIC_SHA256 = b"BASTION-BLOB-JOURNAL-01\n"
HEADER_SIZE = 4096
_SEGMENT_HEADER = struct.Struct("<24sQ")
_RECORD = struct.Struct("<4sQBHQ32s")
_CRC = struct.Struct("<I")
RECORD_MAGIC = b"BJR1"
OBJECT, TOMBSTONE = 0, 1

#: Size of each of a process's two segments when they are created (a 8 MB object fits)...
SEGMENT_SIZE = 16 * 1024 * 1024
#: ...and how large they grow (doubling each time one filled before its checkpoint interval).
MAX_SEGMENT_SIZE = 128 * 1024 * 1024
#: A checkpoint starts once this long has passed since the first record of the active segment...
CHECKPOINT_INTERVAL_S = 1.0
#: ...or once the active segment is this full.
CHECKPOINT_FILL = 0.5


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs()


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait (Linux)


def sync_filesystem(path: str) -> None:
    """Make everything written on the filesystem holding ``path`` durable (``syncfs``; ``sync`` elsewhere)."""
    if _syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def _record_header(generation: int, kind: int, key: bytes, size: int, digest: bytes) -> bytes:
    fixed = _RECORD.pack(RECORD_MAGIC, generation, kind, len(key), size, digest)
    return fixed + _CRC.pack(zlib.crc32(key, zlib.crc32(fixed)))


def record_size(key: str, size: int) -> int:
    """Bytes a record of ``size`` data bytes under ``key`` takes in a segment."""
    return _RECORD.size + _CRC.size + len(key.encode()) + size


def segment_name(node_id: str, suffix: str = ".wal", prefix: str = "") -> str:
    """A new segment's file name: ``<prefix><node>-<uuid><suffix>``, or without the node for ``node_id`` ``""``."""
    return f"{prefix}{node_id}-{uuid.uuid4().hex}{suffix}" if node_id else f"{prefix}{uuid.uuid4().hex}{suffix}"


def segment_owner(name: str) -> str:
    """The node id in a segment's (or its ``.tmp-`` file's) name; ``""`` for a name of the single-node form."""
    stem = name.removeprefix(".tmp-").removesuffix(".wal")
    node, _, _ = stem.rpartition("-")  # a uuid's hex holds no "-"; a node id may
    return node


def _locked_temporary(directory: str, node_id: str = "", attempts: int = 100) -> tuple[int, str]:
    """A new ``.tmp-`` file of node ``node_id`` in ``directory``, open and ``flock``-ed by this process:
    ``(fd, path)``.

    Another process of the node opening the store removes every ``.tmp-`` file of the node it can lock
    (:func:`orphaned_segments`): between this process's ``open`` and ``flock`` it may lock and remove ours, or
    hold its lock. The file is ours only once we hold the lock *and* it is still the file at its path;
    otherwise another name is tried.
    """
    for _ in range(attempts):
        path = os.path.join(directory, segment_name(node_id, "", ".tmp-"))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd, path
        except (BlockingIOError, FileNotFoundError):
            pass  # a cleaner holds it, or removed it: it will remove it if it is still there
        os.close(fd)
    raise OSError(f"could not create a journal segment in {directory}: {attempts} attempts were taken away")


class _Segment:
    """One preallocated segment file of node ``node_id``, locked by this process."""

    def __init__(self, directory: str, size: int, node_id: str = "") -> None:
        self.fd, tmp = _locked_temporary(directory, node_id)
        self.size = 0
        try:
            self.grow(size)
            self.path = os.path.join(directory, segment_name(node_id))
            os.rename(tmp, self.path)
            fsync_dir(directory)
        except BaseException:
            os.close(self.fd)
            os.unlink(tmp)
            raise
        self.generation = 0
        self.pos = HEADER_SIZE
        self.first_at = 0.0  # monotonic time of the first record since it became active

    def grow(self, size: int) -> None:
        """Zero-fill up to ``size`` bytes: blocks allocated and written, so data writes change no metadata."""
        zeros = bytes(1024 * 1024)
        for offset in range(self.size, size, len(zeros)):
            os.pwrite(self.fd, zeros[: size - offset], offset)
        sync_all(self.fd)
        self.size = max(self.size, size)

    def start(self, generation: int) -> None:
        """Begin a new generation: records of earlier ones no longer count."""
        self.generation = generation
        os.pwrite(self.fd, _SEGMENT_HEADER.pack(SEGMENT_MAGIC, generation), 0)
        sync_data(self.fd)
        self.pos = HEADER_SIZE
        self.first_at = 0.0

    def remove(self) -> None:
        os.unlink(self.path)
        os.close(self.fd)


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sync_all(fd)
    finally:
        os.close(fd)


class Journal:
    """A process's journal over ``directory`` (``<blob root>/.journal``), checkpointed by ``checkpoint``.

    ``checkpoint`` must make every final file written so far durable (the blob store passes a
    ``syncfs`` of its root). Create it in the process that uses it; :meth:`close` checkpoints and
    removes its segments. Its segments are named after ``node_id`` (:func:`segment_name`).
    """

    def __init__(self, directory: str, checkpoint: Callable[[], None], *, segment_size: int = SEGMENT_SIZE,
                 max_segment_size: int = MAX_SEGMENT_SIZE, interval_s: float | None = None,
                 node_id: str = "") -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.segment_size = segment_size
        self.max_segment_size = max(segment_size, max_segment_size)
        self.interval_s = CHECKPOINT_INTERVAL_S if interval_s is None else interval_s
        self._checkpoint = checkpoint
        self.pid = os.getpid()
        self.node_id = node_id
        self._segments = [_Segment(directory, segment_size, node_id), _Segment(directory, segment_size, node_id)]
        self._generation = 1
        self._active = self._segments[0]
        self._active.start(self._generation)
        self._segments[1].start(0)
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # appends, flushes and rotations wait on it
        # The checkpoint thread waits on a condition of its own, so that a flush never wakes a thread that
        # has nothing to do.
        self._rotator = threading.Condition(lock)
        self._written = 0  # records written so far, in either segment
        self._synced = 0  # appends known durable
        self._syncing = False
        self._sync_error: tuple[int, OSError] | None = None  # (appends it covered, error)
        self._rotate_wanted = False
        self._closed = False
        self.checkpoints = 0
        self._thread = threading.Thread(target=self._run, name="bastion-blob-journal", daemon=True)
        self._thread.start()

    def capacity(self) -> int:
        """The largest record both segments hold."""
        return min(seg.size for seg in self._segments) - HEADER_SIZE

    def append(self, key: str, digest: bytes, data: Sequence[bytes | bytearray | memoryview], size: int,
               kind: int = OBJECT) -> None:
        """Write one record and return once it is durable.

        Raises OSError (the record may not count), or ValueError if it is larger than :meth:`capacity`.
        """
        self.wait(self.write(key, digest, data, size, kind))

    def write(self, key: str, digest: bytes, data: Sequence[bytes | bytearray | memoryview], size: int,
              kind: int = OBJECT, *, writeback: bool = True) -> int:
        """Write one record and start its way to the disk; return the ticket that :meth:`wait` takes.

        The caller may do other work before it waits (the ingest pipeline runs its index statements): the disk
        writes the record meanwhile, and the ``fdatasync`` that :meth:`wait` needs mostly finds it done. Raises as
        :meth:`append` does. ``writeback=False`` skips starting the write (``sync_file_range``), for a caller that
        starts the ``fdatasync`` itself at once (:meth:`pending_sync`). The record's file must be written, or
        handed to a writer that the ``checkpoint`` callable waits for (the blob store's: ``_cwrite.barrier``),
        before this is called: the checkpoint that voids the record runs after it, and its ``syncfs`` must cover
        the file.
        """
        key_bytes = key.encode()
        need = _RECORD.size + _CRC.size + len(key_bytes) + size
        if need > self.capacity():
            raise ValueError(f"record of {need} bytes exceeds the journal segment")
        with self._cond:
            while self._active.pos + need > self._active.size:
                if self._closed:
                    raise OSError(errno.EBADF, "blob journal is closed")
                self._rotate_wanted = True
                self._rotator.notify()
                self._cond.wait()
            seg = self._active
            header = _record_header(seg.generation, kind, key_bytes, size, digest)
            written = os.pwritev(seg.fd, [header, key_bytes, *data], seg.pos)
            if written != need:
                raise OSError(errno.EIO, f"short write to the blob journal ({written} of {need} bytes)")
            if writeback and _sync_file_range is not None:  # not for a caller whose flush starts at once
                _sync_file_range(seg.fd, seg.pos, need, _SYNC_FILE_RANGE_WRITE)  # advisory: errors show in wait
            seg.pos += need
            if seg.first_at == 0.0:
                seg.first_at = time.monotonic()
            self._written += 1
            if seg.pos - HEADER_SIZE >= CHECKPOINT_FILL * (seg.size - HEADER_SIZE):
                self._rotator.notify()
            return self._written

    def pending_sync(self, ticket: int) -> tuple[int, int] | None:
        """For a flush outside this class: the file descriptor whose ``fdatasync`` makes ``ticket`` durable and
        the appends that flush will cover, or None if it is durable already. Report the flush's outcome with
        :meth:`synced`. (Records not yet durable are all in the active segment; a segment stays open until
        :meth:`close`: its caller must first wait for such flushes, as the blob store does.)"""
        with self._cond:
            if self._synced >= ticket:
                return None
            return self._active.fd, self._written

    def synced(self, ticket: int, target: int, error: OSError | None) -> None:
        """The outcome of a flush that :meth:`pending_sync` prepared: raises ``error``, or one that an earlier
        flush covering ``ticket`` met (after a failed ``fdatasync`` a later one may succeed without the data)."""
        with self._cond:
            if error is not None:
                if self._sync_error is None or self._sync_error[0] < target:
                    self._sync_error = (target, error)
                self._cond.notify_all()
                raise error
            if self._sync_error is not None and self._sync_error[0] >= ticket:
                raise self._sync_error[1]
            if target > self._synced:
                self._synced = target
                self._cond.notify_all()

    def wait(self, ticket: int) -> None:
        """Return once the record of ``ticket`` is durable; raises OSError if the flush that covers it failed."""
        with self._cond:
            self._wait_durable(ticket)

    def _wait_durable(self, mine: int) -> None:
        """Group commit: the first waiter syncs for everyone written so far. Called holding the lock.

        Records not yet durable are all in the active segment: a rotation makes the old one durable first.
        """
        while self._synced < mine:
            if self._sync_error is not None and self._sync_error[0] >= mine:
                raise self._sync_error[1]
            if self._syncing:
                self._cond.wait()
                continue
            self._syncing = True
            target = self._written
            seg = self._active  # no rotation while _syncing
            self._cond.release()
            try:
                sync_data(seg.fd)
                error = None
            except OSError as exc:
                error = exc
            finally:
                self._cond.acquire()
                self._syncing = False
            if error is not None:
                self._sync_error = (target, error)
                self._cond.notify_all()
                raise error
            self._synced = max(self._synced, target)
            self._cond.notify_all()

    def _rotation_due(self) -> bool:
        seg = self._active
        if seg.pos == HEADER_SIZE:
            return False
        return self._filled(seg) or time.monotonic() - seg.first_at >= self.interval_s

    def _filled(self, seg: _Segment) -> bool:
        return self._rotate_wanted or seg.pos - HEADER_SIZE >= CHECKPOINT_FILL * (seg.size - HEADER_SIZE)

    def _rotate(self) -> tuple[_Segment, bool]:
        """Make the other segment active; return the one to checkpoint and whether it filled up.

        Called holding the lock.
        """
        while self._syncing:
            self._cond.wait()
        old = self._active
        filled = self._filled(old)
        sync_data(old.fd)  # every record in it is durable before new ones go elsewhere
        self._synced = self._written
        self._generation += 1
        new = self._segments[1] if old is self._segments[0] else self._segments[0]
        new.start(self._generation)
        self._active = new
        self._rotate_wanted = False
        self._cond.notify_all()
        return old, filled

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._rotation_due():
                    self._rotator.wait(self.interval_s / 4)
                if self._closed:
                    return
                try:
                    old, filled = self._rotate()
                except OSError as exc:
                    log.error("blob journal rotation failed: %s", exc)
                    self._rotator.wait(1.0)
                    continue
            self._retire(old, grow=filled)

    def _retire(self, old: _Segment, grow: bool) -> None:
        """Checkpoint: make the final files durable, then void the old segment's records.

        A segment that filled up before the checkpoint interval is doubled (up to the maximum), so a
        high ingest rate checkpoints less often.
        """
        while True:
            try:
                self._checkpoint()
                old.start(0)
                self.checkpoints += 1
                break
            except OSError as exc:  # records stay in the journal; retry
                if self._closed:  # close() checkpoints itself (and fails: a store directory that is gone, see revive)
                    return
                log.error("blob journal checkpoint failed (retrying): %s", exc)
                time.sleep(1.0)
        if grow and old.size < self.max_segment_size:
            try:
                old.grow(min(old.size * 2, self.max_segment_size))
            except OSError as exc:  # e.g. a full disk: it keeps its size
                log.warning("blob journal segment cannot grow: %s", exc)

    def close(self) -> None:
        """Checkpoint everything and remove the segments (a clean stop leaves no journal)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            self._rotator.notify_all()
        self._thread.join()
        with self._cond:
            while self._syncing:
                self._cond.wait()
        self._checkpoint()
        for seg in self._segments:
            seg.remove()


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass
class Record:
    """One valid record read back from a segment."""

    kind: int
    key: str
    digest: bytes
    data: bytes


def read_segment(path: str) -> Iterator[Record]:
    """The valid records of a segment file, in order, up to the first invalid one."""
    with open(path, "rb") as fh:
        head = fh.read(HEADER_SIZE)
        if len(head) < _SEGMENT_HEADER.size:
            return
        magic, generation = _SEGMENT_HEADER.unpack_from(head)
        if magic not in (SEGMENT_MAGIC, _SEGMENT_MAGIC_SHA256) or generation == 0:
            return
        digest_of = content_digest.of_bytes if magic == SEGMENT_MAGIC else _sha256
        while True:
            fixed = fh.read(_RECORD.size + _CRC.size)
            if len(fixed) < _RECORD.size + _CRC.size:
                return
            magic, gen, kind, key_len, size, digest = _RECORD.unpack_from(fixed)
            if magic != RECORD_MAGIC or gen != generation or kind not in (OBJECT, TOMBSTONE):
                return
            key_bytes = fh.read(key_len)
            (crc,) = _CRC.unpack_from(fixed, _RECORD.size)
            if len(key_bytes) < key_len or zlib.crc32(key_bytes, zlib.crc32(fixed[:_RECORD.size])) != crc:
                return
            data = fh.read(size)
            if len(data) < size or (kind == OBJECT and digest_of(data) != digest):
                return  # torn: never acknowledged
            try:
                key = key_bytes.decode()
            except UnicodeDecodeError:
                return
            yield Record(kind, key, digest, data)


def orphaned_segments(directory: str, node_id: str = "") -> Iterator[tuple[str, int]]:
    """``(path, locked fd)`` of each segment of node ``node_id`` in ``directory`` whose process is gone; the
    caller closes the fd.

    Also removes the node's temporary files of segments that died while being created. A segment is the node's
    if its name says so (:func:`segment_owner`) or names no node (the single-node form); another node's are
    never opened. Among the node's own processes, which share one host, a live one holds its segments'
    ``flock``.
    """
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return
    for name in names:
        path = os.path.join(directory, name)
        if not (name.endswith(".wal") or name.startswith(".tmp-")) or segment_owner(name) not in ("", node_id):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                raise FileNotFoundError(path)  # replayed and removed by another process meanwhile
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            continue
        if name.startswith(".tmp-"):
            os.unlink(path)
            os.close(fd)
            continue
        yield path, fd
