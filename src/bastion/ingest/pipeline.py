"""The store pipeline shared by DIMSE C-STORE, STOW-RS and ``bastion import``.

Order of work for one object (Orthanc's "instance to store" idea, with Bastion's promise):

1. the adapter streams the Part 10 bytes into a :class:`PendingObject` (hashed on the way);
2. :meth:`Ingest.finish` parses and validates the header, and
3. the blob is committed durably under its final key (the blob store's journal, or fsync of file and directory):
   :meth:`BlobWriter.start_commit` writes it and starts the flush, which completes while (for a C-STORE, whose
   command names the SOP Instance UID the key holds, the commit starts before step 2, which runs meanwhile, and
   an object that fails it is removed again)
4. the index records it in one transaction, with a change-log entry, which commits only once step 3 is done (it
   survives a process crash at once; after a power failure recovery re-indexes it from the blob store). An
   identical current copy, which that transaction finds, makes it a duplicate: nothing is recorded and the new
   blob is removed again (an object from :data:`PRECHECK_BYTES` is looked up before step 3 instead);
5. only then is success returned. If 3 or 4 fails, nothing is indexed and the blob is removed.

An object accepted with warnings (:attr:`bastion.ingest.header.Header.warnings`: a UID that breaks PS3.5 9.1 but
identifies it, a File Meta that names another SOP instance) is stored like any other; its
:class:`StoreResult` carries the warnings, which are appended to the ingest warnings log
(:class:`bastion.ingest.rejections.IngestWarningLog`) for the admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import BinaryIO

from bastion.blobs.base import BlobStore, BlobWriter, Commit, Committed
from bastion.errors import BastionError, CommandMismatch, CommitOutcomeUnknown, IndexFailure, StorageError
from bastion.index.base import Index
from bastion.ingest.header import Header, read_header
from bastion.ingest.rejections import IngestWarningLog, RejectionLog
from bastion.ingest.stamps import IngestStamps
from bastion.model import digest as content_digest
from bastion.model.part10 import dataset_offset, file_meta_bytes, part10_bytes
from bastion.model.records import (
    InstanceRecord,
    StoredObject,
    StoreResult,
    StoreStatus,
    object_key,
    parse_object_key,
)
from bastion.model.uids import UID_MAX_LENGTH, is_identifiable_uid

log = logging.getLogger("bastion.ingest")


def _cut_to_fit(command_uid: str, dataset_uid: str) -> bool:
    """Whether ``command_uid`` is ``dataset_uid`` (longer than a UI value may be) cut to 64 characters."""
    return (len(command_uid) == UID_MAX_LENGTH and len(dataset_uid) > UID_MAX_LENGTH
            and dataset_uid.startswith(command_uid))


@dataclass
class PendingObject:
    """An object being received: bytes go to a blob writer; nothing is visible yet."""

    writer: BlobWriter
    origin: str
    #: The sending AE title written into a C-STORE's File Meta (Source Application Entity Title, PS3.10 7.1).
    source_aet: str = ""

    def write(self, data: bytes | memoryview) -> None:
        """Append Part 10 bytes."""
        self.writer.write(data)

    def abort(self) -> None:
        """Drop the object (association aborted, client gave up)."""
        self.writer.abort()


#: From this size the pipeline asks the index for a current copy before it writes the object, so that a re-sent
#: object that may be gigabytes is not written and removed again. Smaller objects skip that read: the index
#: transaction that records them finds a duplicate itself (see BENCHMARKS.md, "The duplicate check").
PRECHECK_BYTES = 1024 * 1024


def _same_content(stored: str, open_copy: Callable[[], BinaryIO]) -> bool:
    """Whether the copy ``open_copy`` reads holds the bytes a digest of another algorithm (SHA-256: a version
    stored before BLAKE3) names; False for a BLAKE3 digest, which the caller compared already."""
    if stored.startswith(content_digest.BLAKE3_PREFIX):
        return False
    with open_copy() as fh:
        return content_digest.of_file(fh, stored) == stored


@dataclass
class _Staged:
    """An object whose blob is being committed, to be recorded in the index."""

    obj: StoredObject
    durable: Commit
    same_content: Callable[[str], bool]
    warnings: tuple[str, ...] = ()


class Ingest:
    """Stores objects: one instance per call, thread-safe."""

    def __init__(self, blobs: BlobStore, index: Index, rejections: RejectionLog | None = None,
                 warnings: IngestWarningLog | None = None, *, node_id: str = "",
                 stamps: IngestStamps | None = None) -> None:
        """``warnings`` defaults to ``warnings.jsonl`` beside the rejection log's file (in memory without one).

        ``node_id`` names this node in the blob keys it makes (:func:`bastion.model.records.object_key`; none: a
        single-node archive's keys). ``stamps`` orders the versions it stores (default: the clock, above every
        stamp this process issued; the archive passes one that stays above those of earlier runs).
        """
        self.blobs = blobs
        self.index = index
        self.rejections = rejections or RejectionLog(None)
        self.warnings = warnings or IngestWarningLog.beside(self.rejections)
        self.node_id = node_id
        self._stamps = stamps if stamps is not None else IngestStamps()

    def begin(self, origin: str) -> PendingObject:
        """Start receiving an object from ``origin`` (e.g. ``dimse:MODALITY`` or ``stow``)."""
        return PendingObject(self.blobs.writer(), origin)

    def begin_dimse(self, origin: str, sop_class: str, sop_uid: str, transfer_syntax: str,
                    source_aet: str) -> PendingObject:
        """Start receiving a C-STORE dataset: the file meta (PS3.10 7.1) is written first."""
        pending = self.begin(origin)
        pending.source_aet = source_aet
        pending.write(file_meta_bytes(sop_class, sop_uid, transfer_syntax, source_aet))
        return pending

    def store_bytes(self, data: bytes, origin: str, *, lookup_first: bool = False) -> StoreResult:
        """Store one Part 10 file (or bare dataset) given as bytes.

        ``lookup_first``: ask the index for an identical current copy before writing the object, whatever its
        size (see :data:`PRECHECK_BYTES`); for ``bastion import``, which is often run again over files that
        are stored already.
        """
        try:
            framed = part10_bytes(data)
        except BastionError as exc:
            self._failed(origin, exc.message)
            raise
        pending = self.begin(origin)
        try:
            pending.write(framed)
        except BaseException:
            pending.abort()
            raise
        return self.finish(pending, lookup_first=lookup_first)

    def finish(self, pending: PendingObject, *, sop_class: str | None = None,
               sop_uid: str | None = None, lookup_first: bool = False) -> StoreResult:
        """Validate, commit and index a received object; see the module docstring.

        ``sop_class`` / ``sop_uid`` are the C-STORE command's affected UIDs, which the dataset
        must repeat (PS3.4 B.2.3: 0xA900 otherwise; see :meth:`_checked_header` for the one leniency).
        """
        try:
            staged = self._stage(pending, sop_class, sop_uid, lookup_first=lookup_first)
            if isinstance(staged, StoreResult):
                return self._noted(pending, staged)
            return self._noted(pending, self._record(staged))
        except Exception as exc:
            self._reject(pending, exc)
            raise

    async def finish_async(self, pending: PendingObject, *, sop_class: str | None = None,
                           sop_uid: str | None = None) -> StoreResult:
        """:meth:`finish` for an event loop that serves other clients meanwhile: the same steps, none of which
        makes the loop wait. The header is checked while the disk flushes; the commit is awaited
        (:meth:`Commit.wait_async`); then the index records the object (:meth:`Index.record_async`: at once when
        no other write of this process runs, else beside the others in the index's writer thread).

        A store whose caller goes away (its association closed) still completes its commit, and its blob is then
        removed: nothing is recorded.
        """
        failed: list[tuple[Commit, str]] = []  # the blob of an object that failed its checks, being committed
        try:
            try:
                staged = self._stage(pending, sop_class, sop_uid, discard=lambda d, k: failed.append((d, k)))
            except BaseException:
                for durable, key in failed:  # removed once committed, before the failure is answered
                    await self._discard_async(durable, key)
                raise
            if isinstance(staged, StoreResult):
                return self._noted(pending, staged)
            try:
                await staged.durable.wait_async()
            except asyncio.CancelledError:  # the commit goes on: its blob is removed once it is done
                staged.durable.then(lambda: self._discard_staged(staged))
                raise
            except BaseException:
                self._discard_staged(staged)
                raise
            return self._noted(pending, await self._record_async(staged))
        except Exception as exc:
            self._reject(pending, exc)
            raise

    async def _discard_async(self, durable: Commit, key: str) -> None:
        """:meth:`_discard` on an event loop: the commit is awaited, not waited for (if the caller goes away
        meanwhile, the blob is removed once the commit is done)."""
        try:
            await durable.wait_async()
        except asyncio.CancelledError:
            durable.then(lambda: self.blobs.delete(key))
            raise
        except Exception:  # noqa: S110 - a failed commit leaves its blob to remove all the same
            pass
        self.blobs.delete(key)

    async def _record_async(self, staged: _Staged) -> StoreResult:
        """:meth:`_record` on an event loop, for a staged object whose commit completed."""
        with self._removed_unless_recorded(staged):
            status, seq = await self.index.record_async(staged.obj, staged.same_content, keep_outdated=False)
        if status is StoreStatus.OUTDATED:
            return await asyncio.to_thread(self._stored_again, staged)
        if status is StoreStatus.DUPLICATE:  # its stored copies are checked (:meth:`_heal`): not on the loop
            return await asyncio.to_thread(self._recorded, staged, status, seq)
        return self._recorded(staged, status, seq)

    def _noted(self, pending: PendingObject, result: StoreResult) -> StoreResult:
        """``result``, its warnings (if any) appended to the ingest warnings log and the server's log."""
        if result.warnings:
            self.warnings.record(pending.origin, result)
            log.warning("accepted object %s from %s with warnings: %s", result.record.sop_uid, pending.origin,
                        "; ".join(result.warnings))
        return result

    def _reject(self, pending: PendingObject, exc: Exception) -> None:
        """Drop ``pending`` and log why its store failed; an unexpected error is raised as a StorageError."""
        pending.abort()
        if isinstance(exc, BastionError):
            self._failed(pending.origin, exc.message)
            return
        self._failed(pending.origin, f"unexpected: {exc!r}")
        log.exception("store from %s failed", pending.origin)
        raise StorageError(f"store failed: {exc}") from exc

    def _stage(self, pending: PendingObject, sop_class: str | None, sop_uid: str | None,
               lookup_first: bool = False, discard: Callable[[Commit, str], None] | None = None,
               ) -> _Staged | StoreResult:
        """Check the header and start the blob's commit; a StoreResult for a duplicate that the lookup before the
        write found (nothing written).

        A C-STORE names its SOP Instance UID in the command, which the dataset must repeat: its blob's commit
        (the disk's flush above all) starts before the header is read, under a key made from the command's UID,
        and the header is checked while the flush runs. An object that then fails the checks is removed again,
        before its failure is answered (:meth:`_discard`).

        A C-STORE whose command named the dataset's SOP Instance UID cut to 64 characters (see
        :meth:`_checked_header`) is stored under the dataset's UID, its File Meta made again to name it.

        ``discard`` removes the blob of an object that failed the checks (default :meth:`_discard`, which waits for
        its commit); :meth:`finish_async` takes it over, to await the commit instead.
        """
        w = pending.writer
        if sop_uid is None or lookup_first or w.size >= PRECHECK_BYTES or not is_identifiable_uid(sop_uid):
            header = self._checked_header(w.reader(), sop_class, sop_uid)
            if sop_uid is not None and header.sop_uid != sop_uid:
                w, header = self._reframed(pending, w.reader(), header)
                pending.writer.abort()
                pending.writer = w
            digest = w.digest
            if lookup_first or w.size >= PRECHECK_BYTES:  # a re-sent one is not written again only to be removed
                current = self.index.current(header.sop_uid)
                if current is not None and (current.digest == digest or _same_content(current.digest, w.reader)):
                    self._heal(current, w.reader)
                    w.abort()
                    return StoreResult(StoreStatus.DUPLICATE, current, warnings=header.warnings,
                                       patient_id=header.patient_id)
            stamp = self._stamps.next()
            key = object_key(header.sop_uid, stamp, digest, self.node_id)
            durable = w.start_commit(key)  # written now, flushed while the index works
        else:
            digest = w.digest
            reader = w.reader()  # the buffer it reads is handed to the blob store by start_commit
            stamp = self._stamps.next()
            key = object_key(sop_uid, stamp, digest, self.node_id)
            durable = w.start_commit(key)
            try:
                header = self._checked_header(reader, sop_class, sop_uid)
                if header.sop_uid != sop_uid:  # committed under the command's cut UID: again under the dataset's
                    durable()
                    w, header = self._reframed(pending, self.blobs.open(key), header)
            except BaseException:
                (discard or self._discard)(durable, key)
                raise
            if header.sop_uid != sop_uid:
                self.blobs.delete(key)
                pending.writer = w
                digest = w.digest
                key = object_key(header.sop_uid, stamp, digest, self.node_id)
                durable = w.start_commit(key)
        record = InstanceRecord(header.sop_uid, header.sop_class_uid, header.series_uid, header.study_uid,
                                header.transfer_syntax, key, digest, w.size)

        def committed() -> BinaryIO:
            durable()  # the copy is complete (the index's own wait for it then returns at once)
            return self.blobs.open(key)

        return _Staged(StoredObject(record, header.patient_id, stamp, header.attrs), durable,
                       lambda stored: _same_content(stored, committed), header.warnings)

    def _reframed(self, pending: PendingObject, read: BinaryIO, header: Header) -> tuple[BlobWriter, Header]:
        """A new writer holding the object ``read`` reads (a C-STORE's: File Meta, then the dataset) with its File
        Meta (PS3.10 7.1) made again to name ``header``'s SOP Instance UID, and the header of what it holds.

        The dataset's bytes are copied unchanged.
        """
        w = self.blobs.writer()
        try:
            with read:
                head = read.read(256 * 1024)
                w.write(file_meta_bytes(header.sop_class_uid, header.sop_uid, header.transfer_syntax,
                                        pending.source_aet))
                w.write(head[dataset_offset(head):])
                while chunk := read.read(1024 * 1024):
                    w.write(chunk)
            return w, read_header(w.reader())
        except BaseException:
            w.abort()
            raise

    @staticmethod
    def _checked_header(reader: BinaryIO, sop_class: str | None, sop_uid: str | None) -> Header:
        """The header of the object ``reader`` reads, which must repeat the command's UIDs where they are given
        (PS3.4 B.2.3).

        One leniency: a command's Affected SOP Instance UID of 64 characters that the dataset's longer SOP
        Instance UID starts with names it (the command's UI element holds at most 64 characters, PS3.7 E.1, and
        DCMTK's SCUs cut a longer UID to fit); the dataset's UID identifies the object.
        """
        header = read_header(reader)
        if sop_uid is not None and header.sop_uid != sop_uid and not _cut_to_fit(sop_uid, header.sop_uid):
            raise CommandMismatch(f"dataset SOP Instance UID {header.sop_uid} differs from the "
                                  f"command's {sop_uid}", uid=header.sop_uid)
        if sop_class is not None and header.sop_class_uid != sop_class:
            raise CommandMismatch(f"dataset SOP Class UID {header.sop_class_uid} differs from the "
                                  f"command's {sop_class}", uid=header.sop_class_uid)
        return header

    def _record(self, staged: _Staged) -> StoreResult:
        """Record ``staged`` in the index (its flush completing meanwhile); remove its blob if that fails."""
        with self._removed_unless_recorded(staged):
            status, seq = self.index.record(staged.obj, staged.durable, staged.same_content, keep_outdated=False)
        return self._recorded(staged, status, seq)

    def _recorded(self, staged: _Staged, status: StoreStatus, seq: int | None, *, again: int = 0) -> StoreResult:
        """The result of recording ``staged`` in the index; a duplicate's copy is removed again, and an outdated one
        stored again (:meth:`_stored_again`)."""
        record = staged.obj.instance
        if status is StoreStatus.OUTDATED:
            return self._stored_again(staged, again)
        if status is StoreStatus.DUPLICATE:
            # The index found this SOP instance with the same content in the transaction that would have recorded
            # the copy (asking first cost every store a read transaction): the copy goes again, once it has made
            # good any stored copy that is missing or corrupt. Unless the index names this very copy (a record whose
            # outcome it could not tell, recorded after all): then it stays.
            found = self.index.current(record.sop_uid)
            if found is not None and found.blob_key == record.blob_key:
                return StoreResult(status, found, warnings=staged.warnings, patient_id=staged.obj.patient_id)
            current = found or record
            try:
                self._heal(current, lambda: self.blobs.open(record.blob_key))
            finally:
                self.blobs.delete(record.blob_key)
            return StoreResult(status, current, warnings=staged.warnings, patient_id=staged.obj.patient_id)
        return StoreResult(status, record, seq, staged.warnings, staged.obj.patient_id)

    #: How many times :meth:`_stored_again` stores one object again before it gives up (each time another node
    #: stored a newer version meanwhile).
    STORE_AGAIN_LIMIT = 3

    def _stored_again(self, staged: _Staged, again: int = 0) -> StoreResult:
        """``staged``, which the index found older (by stamp) than the instance's current version and did not
        record, stored again under a stamp above that version's, so that it becomes current: it was received after
        that version was recorded (by another node, whose clock is ahead, or by a store of this one that overtook
        it). Its first copy is then removed. Versions thus follow the order the index recorded them in, on any
        number of nodes, whatever their clocks (:mod:`bastion.ingest.stamps`)."""
        first = staged.obj.instance
        try:
            if again >= self.STORE_AGAIN_LIMIT:
                raise IndexFailure(f"instance {first.sop_uid}: newer versions kept being stored by other nodes "
                                   "while this one was stored again", uid=first.sop_uid)
            current = self.index.current(first.sop_uid)
            parts = parse_object_key(current.blob_key) if current is not None else None
            stamp = self._stamps.next(above=parts["stamp"] if parts is not None else None)
            record = replace(first, blob_key=object_key(first.sop_uid, stamp, first.digest, self.node_id))
            w = self.blobs.writer()
            try:
                with self.blobs.open(first.blob_key) as copy:
                    while chunk := copy.read(1024 * 1024):
                        w.write(chunk)
                w.commit(record.blob_key)
            except BaseException:
                w.abort()
                raise
            log.info("instance %s: stored again as %s, above the version stored meanwhile (%s)", first.sop_uid,
                     record.blob_key, current.blob_key if current is not None else "")
            again_staged = _Staged(replace(staged.obj, instance=record, stamp=stamp), Committed(),
                                   staged.same_content, staged.warnings)
            with self._removed_unless_recorded(again_staged):
                status, seq = self.index.record(again_staged.obj, None, again_staged.same_content, keep_outdated=False)
            return self._recorded(again_staged, status, seq, again=again + 1)
        finally:
            self.blobs.delete(first.blob_key)  # never indexed: the copy above (or nothing) replaces it

    @contextlib.contextmanager
    def _removed_unless_recorded(self, staged: _Staged) -> Iterator[None]:
        """Around recording ``staged``: if that fails, its blob is removed (:meth:`_discard_staged`), unless the
        index may have recorded it after all (:class:`CommitOutcomeUnknown`): then it stays, since removing it
        could leave the index naming an object that is gone."""
        try:
            yield
        except CommitOutcomeUnknown:
            log.warning("kept %s: the index lost its connection while recording it, and may hold it (if it does "
                        "not, `bastion verify` lists it as stored but not indexed)", staged.obj.instance.blob_key)
            raise
        except BaseException:
            self._discard_staged(staged)
            raise

    def _heal(self, current: InstanceRecord, resent: Callable[[], BinaryIO]) -> None:
        """A re-sent object identical to the stored ``current``: where a stored copy of it is missing or corrupt, it
        is written again from the re-sent bytes ``resent`` opens (:meth:`BlobStore.heal`)."""
        try:
            repaired = self.blobs.heal(current.blob_key, resent)
        except BastionError as exc:
            log.error("instance %s: a stored copy is wanting and could not be made good from the re-sent object: %s",
                      current.sop_uid, exc.message)
            return
        if repaired:
            log.warning("instance %s: its stored copy in %s was missing or corrupt, and was made good from the "
                        "re-sent object", current.sop_uid, ", ".join(repaired))

    def _discard_staged(self, staged: _Staged) -> None:
        """:meth:`_discard` for a staged object."""
        self._discard(staged.durable, staged.obj.instance.blob_key)

    def _discard(self, durable: Callable[[], None], key: str) -> None:
        """The index will not record the object being committed under ``key``: remove its blob once its commit
        (``durable``) has finished or failed."""
        with contextlib.suppress(Exception):
            durable()
        self.blobs.delete(key)

    def _failed(self, origin: str, message: str) -> None:
        self.rejections.record(origin, message)
        log.warning("rejected object from %s: %s", origin, message)
