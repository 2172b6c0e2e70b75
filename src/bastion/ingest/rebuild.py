"""Rebuild the index from the blob store alone (the stored files are the truth).

Every object key carries its ingest stamp (:func:`bastion.model.records.object_key`), so
replaying all stored versions in stamp order through :meth:`Index.record` reproduces the
same current versions, superseded versions, counts and change log as live ingest did. An object that was stored
with warnings (``bastion.ingest.header.Header.warnings``, derived from its bytes) is indexed as it was, and its
warnings are listed in the report again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bastion.blobs.base import BlobStore
from bastion.errors import BastionError, CorruptObject, InvalidObject, UnsupportedTransferSyntax
from bastion.index.base import Index
from bastion.ingest.header import read_header
from bastion.model.records import InstanceRecord, StoredObject, parse_object_key, partition_of

log = logging.getLogger("bastion.rebuild")


@dataclass
class RebuildReport:
    """What a rebuild found."""

    indexed: int = 0
    superseded: int = 0
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
    header = read_header(blobs.open(key))
    if header.sop_uid != parts["sop"]:
        raise InvalidObject(f"{key}: the object's SOP Instance UID {header.sop_uid} differs from its key")
    record = InstanceRecord(header.sop_uid, header.sop_class_uid, header.series_uid, header.study_uid,
                            header.transfer_syntax, key, parts["digest"], blobs.size(key))
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
            progress: Callable[[int], None] | None = None, *, verify: bool = False) -> RebuildReport:
    """Record the objects ``keys`` ((stamp, key), oldest first) through ``Index.record_many``.

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
    batch: list[StoredObject] = []
    for _, key in keys:
        try:
            if verify:
                _check_digest(blobs, key)
            obj, warnings = _read_stored_object(blobs, key)
            batch.append(obj)
            if warnings:
                report.warned.append((key, warnings))
        except BastionError as exc:
            if verify and isinstance(exc, _NEVER_ACKNOWLEDGED):
                where = blobs.set_aside(key)
                report.set_aside.append(key)
                log.warning("%s set %s aside%s: %s", what, key, f" in {where}" if where else " (deleted)",
                            exc.message)
            else:
                report.skipped.append((key, exc.message))
                log.warning("%s skips %s: %s", what, key, exc.message)
        if len(batch) >= 500:
            _flush(index, batch, report)
        if progress:
            progress(1)
    _flush(index, batch, report)
    return report


def rebuild(blobs: BlobStore, index: Index, progress: Callable[[int], None] | None = None, *,
            after: int = 0) -> RebuildReport:
    """Replay every stored object into ``index`` (which should be empty), as a new change log.

    The log gets a new epoch and starts after ``after``: the highest ``seq`` the index being replaced handed
    out (:func:`bastion.index.log_floor`), so no ``seq`` is handed out twice, and a consumer that follows the log
    is told that the log it read is gone (:meth:`Index.changes_after`) and reads this one from its start, where
    every stored object is recorded again.
    """
    index.start_log_after(after)
    return _replay(blobs, index, stored_keys(blobs), "rebuild", progress)


def recover(blobs: BlobStore, index: Index, node_id: str | None = None) -> RebuildReport:
    """Index objects stored but not indexed, after an unclean shutdown.

    Lists only the hourly partitions from one hour before the newest indexed stamp up to an hour past
    now or that stamp, whichever is later (stamps run ahead of a clock that went back:
    :mod:`bastion.ingest.stamps`; see :func:`bastion.model.records.object_key`), so it is quick on a large
    archive. With ``node_id`` only that node's objects (and those of a single-node archive, whose keys name no
    node) are taken up: another node sharing the blob store may be writing its own right now.
    """
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
    found: list[tuple[str, str]] = []
    for prefix in prefixes:
        for key in blobs.keys(prefix):
            parts = parse_object_key(key)
            if (parts and int(parts["stamp"]) >= start_ns and (node_id is None or parts["node"] in ("", node_id))
                    and not index.has_blob(key)):
                found.append((parts["stamp"], key))
    # These objects were stored just before the crash: an object whose file was written but not yet
    # made durable when the power went may be incomplete (it was never acknowledged), so each is checked.
    index.resume_log_after_crash()  # no seq that the lost commits handed out is handed out again
    report = _replay(blobs, index, sorted(found), "recovery", verify=True)
    if report.indexed:
        log.warning("recovered %d stored object(s) that the index had lost", report.indexed)
    return report


def _flush(index: Index, batch: list[StoredObject], report: RebuildReport) -> None:
    for status, _ in index.record_many(batch):
        report.indexed += 1
        if status.value == "superseded":
            report.superseded += 1
    batch.clear()
