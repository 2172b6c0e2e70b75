"""Rebuild the index from the blob store alone (the stored files are the truth).

Every object key carries its ingest stamp (:func:`bastion.model.records.object_key`), so
replaying all stored versions in stamp order through :meth:`Index.record` reproduces the
same current versions, superseded versions, counts and change log as live ingest did. An object that was stored
with warnings (``bastion.ingest.header.Header.warnings``, derived from its bytes) is indexed as it was, and its
warnings are listed in the report again.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bastion.blobs.base import BlobStore
from bastion.blobs.fileio import sync_all
from bastion.blobs.journal import fsync_dir
from bastion.errors import BastionError, CorruptObject, InvalidObject, UnsupportedTransferSyntax
from bastion.index.base import Index, log_floor
from bastion.ingest.deletion import apply_state_log, hide_tombstoned
from bastion.ingest.header import read_header
from bastion.ingest.report_log import apply_report_log
from bastion.model.records import InstanceRecord, StoredObject, parse_object_key, partition_of

log = logging.getLogger("bastion.rebuild")


@dataclass
class RebuildReport:
    """What a rebuild found."""

    indexed: int = 0
    superseded: int = 0
    #: Versions the index held already (recorded live while the index was being rebuilt at start).
    duplicates: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    warned: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)  # (key, warnings): indexed all the same
    set_aside: list[str] = field(default_factory=list)  # torn objects that were never acknowledged


class TornObject(BastionError):
    """A stored file whose bytes do not match the digest in its key."""


#: What makes an object that recovery finds unindexed one that was never acknowledged: torn, or failing the
#: checks a store makes (see :func:`_replay`).
_NEVER_ACKNOWLEDGED = (TornObject, InvalidObject, UnsupportedTransferSyntax)


def stored_keys(blobs: BlobStore) -> list[tuple[str, str]]:
    """All object keys with their stamps, oldest first; foreign files are left out."""
    keyed = []
    for key in blobs.keys():
        parts = parse_object_key(key)
        if parts is not None:
            keyed.append((parts["stamp"], key))
    keyed.sort()
    return keyed


def read_stored_object(blobs: BlobStore, key: str) -> StoredObject:
    """Derive the index record of one stored object from its bytes and key."""
    return _read_stored_object(blobs, key)[0]


def _read_stored_object(blobs: BlobStore, key: str) -> tuple[StoredObject, tuple[str, ...]]:
    """:func:`read_stored_object` and the object's warnings."""
    parts = parse_object_key(key)
    if parts is None:
        raise BastionError(f"{key} is not an object key")
    fh = blobs.open(key)
    try:
        size = fh.seek(0, os.SEEK_END)  # the object's size: what BlobStore.size says, without another look-up
        fh.seek(0)
    except BaseException:
        fh.close()
        raise
    header = read_header(fh)  # it closes fh
    if header.sop_uid != parts["sop"]:
        raise InvalidObject(f"{key}: the object's SOP Instance UID {header.sop_uid} differs from its key")
    record = InstanceRecord(header.sop_uid, header.sop_class_uid, header.series_uid, header.study_uid,
                            header.transfer_syntax, key, parts["digest"], size)
    return StoredObject(record, header.patient_id, parts["stamp"], header.attrs), header.warnings


def _check_digest(blobs: BlobStore, key: str) -> None:
    """Raise unless the object's bytes hash to the digest its key names (in one copy at least, with several blob
    stores: an object acknowledged with fewer copies than stores is whole where it was made durable, and the
    torn copies become findings that the repair makes good)."""
    try:
        blobs.open_verified(key).close()
    except CorruptObject as exc:
        raise TornObject(f"{key}: the content does not match the digest in its key (a write that a "
                         "crash cut short, never acknowledged)") from exc


def _replay(blobs: BlobStore, index: Index, keys: list[tuple[str, str]], what: str,
            progress: Callable[[int], None] | None = None, *, verify: bool = False,
            verify_if: Callable[[str, str], bool] | None = None,
            stop: threading.Event | None = None) -> RebuildReport:
    """Record the objects ``keys`` ((stamp, key), oldest first) through ``Index.record_many``.

    ``verify_if(stamp, key)``: verify only the objects it is true of (the self-rebuild after a crash: the recent
    ones). ``stop``: once set, what was read is recorded and the replay returns (the rest is not).

    With ``verify`` (crash recovery) each object's content is checked against the digest in its key first, and
    one that does not match is set aside (:meth:`BlobStore.set_aside`): it is a write that a crash cut short.
    It was never acknowledged, since an acknowledged object is durable, and the blob store's journal replay
    (which runs when the store is opened, before this) has restored every acknowledged object whose file a
    power failure cut short. One that is whole but cannot be indexed is set aside too: a C-STORE's object is
    written under the command's SOP Instance UID before its header is checked (:meth:`Ingest._stage`), and
    the crash came before an object that failed the check was removed again. Its failure was answered, or
    nothing was.
    """
    report = RebuildReport()
    chunks = ([(key, verify or (verify_if is not None and verify_if(stamp, key))) for stamp, key in keys[i:i + _CHUNK]]
              for i in range(0, len(keys), _CHUNK))
    # Objects are read and parsed by a reader thread a few chunks ahead while this thread records: the index's
    # statements and the reads run without the GIL, beside each other.
    pool = ThreadPoolExecutor(_READERS, thread_name_prefix="bastion-rebuild-read")
    try:
        ahead: deque[Future[list[_Read]]] = deque()
        for chunk in itertools.islice(chunks, _READERS + 1):
            ahead.append(pool.submit(_read_chunk, blobs, chunk))
        while ahead and not (stop is not None and stop.is_set()):
            results = ahead.popleft().result()
            for chunk in itertools.islice(chunks, 1):
                ahead.append(pool.submit(_read_chunk, blobs, chunk))
            batch: list[StoredObject] = []
            for key, checked, found in results:
                if isinstance(found, BastionError):
                    if checked and isinstance(found, _NEVER_ACKNOWLEDGED):
                        where = blobs.set_aside(key)
                        report.set_aside.append(key)
                        log.warning("%s set %s aside%s: %s", what, key, f" in {where}" if where else " (deleted)",
                                    found.message)
                    else:
                        report.skipped.append((key, found.message))
                        log.warning("%s skips %s: %s", what, key, found.message)
                    continue
                obj, warnings = found
                batch.append(obj)
                if warnings:
                    report.warned.append((key, warnings))
            _flush(index, batch, report)
            if progress:
                progress(len(results))
    finally:
        pool.shutdown(cancel_futures=True)
    return report


#: What :func:`_replay` records at a time (one ``Index.record_many``: one transaction, whose writer lock live stores
#: wait for during a rebuild at start), and how many objects a reader thread reads at a time. As fast as 500 here.
_CHUNK = 200
#: :func:`_replay`'s reader threads: one, reading ahead of the recording thread. (Two contend for the GIL with it:
#: slower on two cores, see ``benchmarks/rebuild.py``.)
_READERS = 1
#: One object as a reader thread found it: its key, whether its digest was checked, and its record and warnings,
#: or why it cannot be indexed.
_Read = tuple[str, bool, "tuple[StoredObject, tuple[str, ...]] | BastionError"]


def _read_chunk(blobs: BlobStore, chunk: list[tuple[str, bool]]) -> list[_Read]:
    """Read (and, where asked, check the digest of) each object of ``chunk`` ((key, check), in order)."""
    found: list[_Read] = []
    for key, checked in chunk:
        try:
            if checked:
                _check_digest(blobs, key)
            found.append((key, checked, _read_stored_object(blobs, key)))
        except BastionError as exc:
            found.append((key, checked, exc))
    return found


def rebuild(blobs: BlobStore, index: Index, progress: Callable[[int], None] | None = None, *,
            after: int = 0, keys: list[tuple[str, str]] | None = None,
            stop: threading.Event | None = None) -> RebuildReport:
    """Replay every stored object into ``index`` (which should be empty), as a new change log, then apply the
    state log (:func:`bastion.ingest.deletion.apply_state_log`): deleted studies are hidden again.

    The log gets a new epoch and starts after ``after``: the highest ``seq`` the index being replaced handed
    out (:func:`bastion.index.log_floor`), so no ``seq`` is handed out twice, and a consumer that follows the log
    is told that the log it read is gone (:meth:`Index.changes_after`) and reads this one from its start, where
    every stored object is recorded again. ``keys``: :func:`stored_keys`, listed already. ``stop``: once set, the
    replay returns after the batch being recorded (the rest is not).
    """
    index.start_log_after(after)
    report = _replay(blobs, index, stored_keys(blobs) if keys is None else keys, "rebuild", progress, stop=stop)
    if stop is None or not stop.is_set():
        apply_state_log(blobs, index)  # the deleted studies are hidden again (bastion.blobs.statelog)
        apply_report_log(blobs, index)  # the radiology reports come back (bastion.blobs.reportlog)
    return report


def record_stored(blobs: BlobStore, index: Index, keys: list[tuple[str, str]], what: str, *,
                  verify: bool = False) -> RebuildReport:
    """Record the stored objects ``keys`` ((stamp, key), oldest first) into ``index``; ``what`` names the work in log
    lines. With ``verify``, as crash recovery does (:func:`recover`): each object's digest is checked first, and one
    that was never acknowledged (torn, or failing a store's checks) is set aside."""
    return _replay(blobs, index, keys, what, verify=verify)


def recover(blobs: BlobStore, index: Index, node_id: str | None = None) -> RebuildReport:
    """Index objects stored but not indexed, after an unclean shutdown.

    Lists only the hourly partitions from one hour before the newest indexed stamp up to an hour past
    now or that stamp, whichever is later (stamps run ahead of a clock that went back:
    :mod:`bastion.ingest.stamps`; see :func:`bastion.model.records.object_key`), so it is quick on a large
    archive. With ``node_id`` only that node's objects (and those of a single-node archive, whose keys name no
    node) are taken up: another node sharing the blob store may be writing its own right now.
    """
    found = unindexed_recent(blobs, index, node_id)
    # These objects were stored just before the crash: an object whose file was written but not yet
    # made durable when the power went may be incomplete (it was never acknowledged), so each is checked.
    index.resume_log_after_crash()  # no seq that the lost commits handed out is handed out again
    report = _replay(blobs, index, found, "recovery", verify=True)
    if report.indexed:
        log.warning("recovered %d stored object(s) that the index had lost", report.indexed)
        hide_tombstoned(index)  # an object of a deleted study stays hidden
    return report


def unindexed_recent(blobs: BlobStore, index: Index, node_id: str | None = None) -> list[tuple[str, str]]:
    """The objects ((stamp, key), oldest first) stored from an hour before the newest stamp ``index`` holds on, that
    it does not hold: what :func:`recover` takes up (see it for the partitions listed and ``node_id``). Every
    object a node stores after that newest stamp is issued has a newer stamp (:mod:`bastion.ingest.stamps`), so
    the hour covers one whose stamp was issued before and whose store finished after."""
    last = index.last_stamp()
    start_ns = (int(last) if last else 0) - 3600 * 1_000_000_000
    if last is None:
        prefixes = [""]
    else:
        prefixes = []
        hour_ns = 3600 * 1_000_000_000
        t = start_ns - start_ns % hour_ns
        while t <= max(time.time_ns(), int(last)) + hour_ns:
            prefixes.append(partition_of(f"{t:020d}") + "/")
            t += hour_ns
    listed: list[tuple[str, str]] = []
    for prefix in prefixes:
        for key in blobs.keys(prefix):
            parts = parse_object_key(key)
            if parts and int(parts["stamp"]) >= start_ns and (node_id is None or parts["node"] in ("", node_id)):
                listed.append((parts["stamp"], key))
    keys = [key for _, key in listed]
    held = index.held_blobs(keys) | index.hidden_blobs(keys)  # a deleted study's objects are held, hidden
    return sorted(entry for entry in listed if entry[1] not in held)


def _flush(index: Index, batch: list[StoredObject], report: RebuildReport) -> None:
    if not batch:
        return
    for status, _ in index.record_many(batch):
        if status.value == "duplicate":
            report.duplicates += 1
            continue
        report.indexed += 1
        if status.value == "superseded":
            report.superseded += 1
    batch.clear()


# -- the rebuild at start ----------------------------------------------------------------------------------------
#: The file in the data directory that says the index is being rebuilt from the blob store (it holds why). It is
#: made before the rebuild starts and removed once it is done, so a rebuild that a stop or a crash cut short goes on
#: at the next start (its objects already indexed are duplicates then); the process rebuilding holds a ``flock``
#: on it, so that no second process rebuilds at once.
REBUILD_FILE = "index-rebuild"
#: How far before the newest stored object a self-rebuild after a crash checks objects' digests (what crash
#: recovery checks: :func:`recover`).
_RECENT_NS = 3600 * 1_000_000_000


def holds_an_object(blobs: BlobStore) -> bool:
    """True if the blob store holds at least one object key (it stops at the first)."""
    return any(parse_object_key(key) is not None for key in blobs.keys())


class SelfRebuild:
    """The index rebuilt from the blob store in a thread of the archive's primary process, while it serves.

    The live index, empty, is filled in place: every stored object is replayed oldest first through
    :meth:`Index.record_many`, as ``bastion index rebuild`` does, while stores go on being recorded beside it.
    What makes the two meet right is the index's record itself: a version stored live has a newer stamp than
    every stored one, so an older version of its instance replayed after it is kept as superseded (OUTDATED), and
    an object recorded live that the replay meets again (the same blob key) is a duplicate. Queries answer from
    what is indexed so far. ``done`` and ``total`` say how far it is (``total`` None while the keys are listed).
    """

    def __init__(self, blobs: BlobStore, index: Index, pending: Path, reason: str, *, node_id: str = "",
                 crashed: bool = False) -> None:
        self.blobs = blobs
        self.index = index
        self.pending = pending
        self.reason = reason
        self.node_id = node_id
        self.crashed = crashed
        self.done = 0
        self.total: int | None = None
        self.report: RebuildReport | None = None
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bastion-index-rebuild", daemon=True)

    @property
    def running(self) -> bool:
        """True until the rebuild is done, stopped or failed."""
        return not self._finished.is_set()

    def start(self) -> SelfRebuild:
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the rebuild to end; True if it has."""
        return self._finished.wait(timeout)

    def stop(self) -> None:
        """Stop the rebuild (after the batch being recorded) and wait for its thread; it goes on at the next start."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _advance(self, count: int) -> None:
        self.done += count

    def _run(self) -> None:
        try:
            fd = os.open(self.pending, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:  # another process finished the rebuild meanwhile
            self._finished.set()
            return
        except OSError as exc:
            log.error("the index rebuild cannot open %s: %s", self.pending, exc)
            self._finished.set()
            return
        try:
            waiting = False
            while True:  # another process rebuilding (one opened alone before this one) is waited for
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waiting:
                        log.info("another process is rebuilding the index: waiting for it to finish or stop")
                        waiting = True
                    if self._stop.wait(0.2):
                        return
            if os.fstat(fd).st_nlink == 0:
                return  # the other process finished it (and removed the file)
            self._rebuild()
        except Exception:
            log.exception("the index rebuild failed: it is tried again at the next start")
        finally:
            os.close(fd)
            self._finished.set()

    def _rebuild(self) -> None:
        started = time.monotonic()
        keyed = []
        for n, key in enumerate(self.blobs.keys()):
            if n % 1024 == 0 and self._stop.is_set():
                return
            parts = parse_object_key(key)
            if parts is not None:
                keyed.append((parts["stamp"], key))
        keyed.sort()
        self.total = len(keyed)
        verify_if = None
        if self.crashed and keyed:
            # What crash recovery would check: this node's objects of the last hour before the newest one.
            recent = str(int(keyed[-1][0]) - _RECENT_NS).zfill(len(keyed[-1][0]))

            def verify_if(stamp: str, key: str) -> bool:
                parts = parse_object_key(key)
                return stamp >= recent and parts is not None and parts["node"] in ("", self.node_id)

        report = self.report = _replay(self.blobs, self.index, keyed, "index rebuild", self._advance,
                                       verify_if=verify_if, stop=self._stop)
        if self._stop.is_set() and self.done < len(keyed):
            if self.done:
                log.info("index rebuild stopped after %d of %d stored objects: it goes on at the next start",
                         self.done, len(keyed))
            return
        apply_state_log(self.blobs, self.index)  # the deleted studies are hidden again
        apply_report_log(self.blobs, self.index)  # the radiology reports come back
        self.pending.unlink()
        fsync_dir(str(self.pending.parent))
        elapsed = time.monotonic() - started
        log.info("index rebuilt from %d stored object(s) in %.1f s (%.0f/s): %d indexed (%d superseding an older "
                    "version), %d indexed already, %d skipped, %d set aside", len(keyed), elapsed,
                    len(keyed) / elapsed if elapsed else 0, report.indexed, report.superseded, report.duplicates,
                    len(report.skipped), len(report.set_aside))


def self_rebuild(blobs: BlobStore, index: Index, data: Path, *, problem: str | None = None, alone: bool = False,
                 crashed: bool = False, node_id: str = "") -> SelfRebuild | None:
    """Start rebuilding the index in the background (:class:`SelfRebuild`) if it must be, for a primary opener.

    It must be when the index holds nothing while the blob store holds an object (``problem``: why, e.g. its file
    was missing or corrupt and set aside), or when a rebuild did not finish (:data:`REBUILD_FILE`). A new rebuild
    starts a new change log after every ``seq`` the lost index handed out (its durable mark,
    :func:`bastion.index.log_floor`), so the log's consumers see a reset and read the new one from its start; one
    that goes on keeps the log it began. ``alone``: the opener is alone with the archive (the one that reports it
    as a WARNING; a server's HTTP process, started after it, carries it out). ``crashed``: the last run did not
    shut down cleanly: the rebuild also does what crash recovery (:func:`recover`) would have done, checking the
    digests of this node's objects of the last hour. None if nothing is to be done.
    """
    pending = data / REBUILD_FILE
    try:
        reason = pending.read_text(encoding="utf-8", errors="replace").strip() or "the index was being rebuilt"
        resumed = True
    except FileNotFoundError:
        if not (index.holds_nothing() and holds_an_object(blobs)):
            return None
        reason = f"{problem or 'the index is empty'} while the blob store holds objects"
        resumed = False
        write_durably(pending, reason)
        index.start_log_after(log_floor(index.location))
    if crashed:
        index.resume_log_after_crash()  # no seq that commits lost in the crash handed out is handed out again
    if alone:
        log.warning("%s: rebuilding the index from the stored objects in the background%s%s; the server serves "
                    "meanwhile and queries answer from what is indexed so far (/health says \"rebuilding\")",
                    reason, " (an earlier rebuild did not finish)" if resumed else "",
                    " (the previous run did not shut down cleanly: the digests of its last hour's objects are "
                    "checked too)" if crashed else "")
    else:
        log.info("rebuilding the index from the stored objects in the background: %s", reason)
    return SelfRebuild(blobs, index, pending, reason, node_id=node_id, crashed=crashed).start()


def write_durably(path: Path, text: str) -> None:
    """Replace the file ``path`` with ``text`` (and a newline) durably: written, flushed, renamed into place and
    its directory flushed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
        fh.flush()
        sync_all(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(str(path.parent))
