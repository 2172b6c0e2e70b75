"""STOW-RS: store instances (PS3.18 10.5).

Each ``application/dicom`` part of a ``multipart/related`` request is streamed into the one store
pipeline C-STORE also uses (``archive.ingest.begin`` / ``finish``) while it arrives, and stored as
soon as its closing delimiter has come: memory per request stays bounded whatever the parts' sizes. The response (PS3.18 10.5.3, Table 10.5.3-1) lists stored instances in the
ReferencedSOPSequence and rejected ones in the FailedSOPSequence with a FailureReason:

==========  =============================================================
0xA700      out of resources (storage full)
0xA900      the data set does not match its SOP class / command
0xC000      cannot understand (not DICOM, missing or invalid UIDs)
0xC122      transfer syntax not supported
0xC409      the instance's Study Instance UID differs from the one in the URL
0x0110      processing failure (blob store or index error)
==========  =============================================================

An instance stored with warnings (``StoreResult.warnings``: a UID breaking PS3.5 9.1 that still identifies it, a
File Meta naming another SOP instance) is listed in the ReferencedSOPSequence with a Warning Reason (0008,1196)
of :data:`STORED_WITH_WARNINGS` (0x0116, the status C-STORE answers for it); the reasons in words go to the
ingest warnings log.

HTTP status: 200 all stored without warnings, 202 some failed or were stored with warnings, 409 all failed
(PS3.18 10.5.3).
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import pydicom
from pydicom.multival import MultiValue
from starlette.concurrency import run_in_threadpool

from bastion.archive import Archive
from bastion.audit import StoreTally
from bastion.dicomweb.multipart import MultipartError, MultipartStream, PartStart
from bastion.dicomweb.negotiation import DICOM, parse_media_type
from bastion.errors import (
    BastionError,
    CommandMismatch,
    IndexFailure,
    InvalidObject,
    StorageError,
    StorageFull,
    UnsupportedTransferSyntax,
)
from bastion.ingest.pipeline import PendingObject
from bastion.model.part10 import part10_bytes
from bastion.model.records import InstanceRecord

PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
STUDY_MISMATCH = 0xC409
#: Warning Reason of an instance stored with warnings: 0116H, Attribute Value Out of Range (PS3.7 Annex C), the
#: warning C-STORE answers for it (``bastion.dimse.services.STORED_WITH_WARNINGS``). The Storage warnings of
#: PS3.4 B.2.3 (B000 coercion, B006 elements discarded, B007 data set does not match SOP class) do not describe
#: it: nothing was changed or left out.
STORED_WITH_WARNINGS = 0x0116
MAX_PART_BYTES = 4 * 1024**3
#: The first bytes of each part kept in memory beside the stream (see :class:`_PartSink`).
HEAD_BYTES = 256 * 1024
ORIGIN = "stow"


def failure_reason(exc: BastionError) -> int:
    """The STOW-RS FailureReason for an ingest error."""
    if isinstance(exc, StorageFull):
        return OUT_OF_RESOURCES
    if isinstance(exc, UnsupportedTransferSyntax):
        return TRANSFER_SYNTAX_NOT_SUPPORTED
    if isinstance(exc, CommandMismatch):
        return SOP_CLASS_MISMATCH
    if isinstance(exc, InvalidObject):
        return CANNOT_UNDERSTAND
    if isinstance(exc, StorageError | IndexFailure):
        return PROCESSING_FAILURE
    return CANNOT_UNDERSTAND


@dataclass
class StowOutcome:
    """What a STOW-RS request did, instance by instance."""

    stored: list[tuple[str, str, str]] = field(default_factory=list)  # class, instance, retrieve URL
    failed: list[tuple[str, str, int, str]] = field(default_factory=list)  # class, instance, reason, why
    records: list[InstanceRecord] = field(default_factory=list)  # what was stored, for cache warm-up
    warned: dict[str, tuple[str, ...]] = field(default_factory=dict)  # SOP Instance UID: warnings, if stored so
    tally: StoreTally = field(default_factory=StoreTally)  # per study, for the audit (bastion.dicomweb.audit)

    @property
    def http_status(self) -> int:
        """200 all stored without warnings, 202 some failed or had warnings, 409 all failed (PS3.18 10.5.3)."""
        if not self.failed and not self.warned:
            return 200
        return 202 if self.stored else 409

    def response(self, study_url: str | None) -> dict[str, Any]:
        """The DICOM JSON response body (PS3.18 Table 10.5.3-1)."""
        body: dict[str, Any] = {}
        if study_url:
            body["00081190"] = {"vr": "UR", "Value": [study_url]}
        if self.failed:
            body["00081198"] = {"vr": "SQ", "Value": [{
                **({"00081150": {"vr": "UI", "Value": [cls]}} if cls else {}),
                **({"00081155": {"vr": "UI", "Value": [sop]}} if sop else {}),
                "00081197": {"vr": "US", "Value": [reason]},
            } for cls, sop, reason, _ in self.failed]}
        if self.stored:
            body["00081199"] = {"vr": "SQ", "Value": [{
                "00081150": {"vr": "UI", "Value": [cls]},
                "00081155": {"vr": "UI", "Value": [sop]},
                "00081190": {"vr": "UR", "Value": [url]},
                **({"00081196": {"vr": "US", "Value": [STORED_WITH_WARNINGS]}} if sop in self.warned else {}),
            } for cls, sop, url in self.stored]}
        return body


def _uids(data: bytes | BinaryIO) -> tuple[str, str, str]:
    """SOP Class, SOP Instance and Study Instance UIDs of a part (or of its first bytes), ``""`` when unreadable."""
    try:
        fp = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
        ds = pydicom.dcmread(fp, force=True, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"])
        def text(keyword: str) -> str:
            """The UID as sent (a backslash makes several values), control characters escaped: it is logged."""
            value = ds.get(keyword, "") or ""
            sent = "\\".join(map(str, value)) if isinstance(value, MultiValue) else str(value)
            return sent if sent.isprintable() else sent.encode("unicode_escape").decode("ascii")

        return text("SOPClassUID"), text("SOPInstanceUID"), text("StudyInstanceUID")
    except Exception:
        return "", "", ""


class _PartSink:
    """One part being received, streamed into the store pipeline as it arrives (PS3.18 10.5.1).

    A Part 10 part goes into a :class:`~bastion.ingest.pipeline.PendingObject` piece by piece: the blob writer
    keeps it in memory up to its limit and spools the rest, so no part is ever held whole here. The first
    :data:`HEAD_BYTES` are kept besides, to name a failed instance by its UIDs and to frame a bare dataset
    (no File Meta Information), which is buffered only that far. A part that is refused before its end
    (wrong type, not DICOM, too large) is read to its end and dropped.
    """

    def __init__(self, archive: Archive, part: PartStart, outcome: StowOutcome) -> None:
        self.archive = archive
        self.outcome = outcome
        self.head = bytearray()
        self.size = 0
        self.pending: PendingObject | None = None
        self.refused = False
        ctype = parse_media_type(part.content_type).media_type if part.content_type else DICOM
        if ctype != DICOM:
            self._refuse(CANNOT_UNDERSTAND, f"part of type {ctype} is not application/dicom")

    def _refuse(self, reason: int, why: str, uids: tuple[str, str, str] | None = None) -> None:
        sop_class, sop, _ = uids or (_uids(bytes(self.head)) if self.head else ("", "", ""))
        self.outcome.failed.append((sop_class, sop, reason, why))
        self.outcome.tally.failed(why)
        self.abort()
        self.refused = True

    def write(self, data: bytes) -> None:
        """Append a piece of the part's content."""
        if self.refused:
            return
        self.size += len(data)
        if self.size > MAX_PART_BYTES:
            self._refuse(CANNOT_UNDERSTAND, f"the part is larger than {MAX_PART_BYTES} bytes")
            return
        taken = min(len(data), HEAD_BYTES - len(self.head))
        if taken > 0:
            self.head += data[:taken]
        if self.pending is not None:
            self.pending.write(data)
        elif len(self.head) >= HEAD_BYTES or (len(self.head) >= 132 and self.head[128:132] == b"DICM"):
            self._begin(data[taken:])  # everything before is in the head

    def _begin(self, rest: bytes) -> None:
        """Open the pending object with the head, framed as Part 10 if it is a bare dataset, then ``rest``."""
        head = bytes(self.head)
        try:
            framed = part10_bytes(head)
        except BastionError as exc:
            self.archive.ingest.rejections.record(ORIGIN, exc.message)
            self._refuse(failure_reason(exc), exc.message)
            return
        self.pending = self.archive.ingest.begin(ORIGIN)
        self.pending.write(framed)
        if rest:
            self.pending.write(rest)

    def finish(self, study: str | None, base: str) -> None:
        """Validate, commit and index the part (blocking: run it in a thread) and record the outcome."""
        if self.refused:
            return
        if self.pending is None:
            self._begin(b"")
            if self.pending is None:
                return
        pending = self.pending
        if study is not None:
            with pending.writer.reader() as fh:
                uids = _uids(fh)
            if uids[2] != study:
                self._refuse(STUDY_MISMATCH, f"Study Instance UID {uids[2] or '(none)'} differs from {study}", uids)
                return
        self.pending = None  # finish takes it over: it is committed, or aborted on failure
        try:
            result = self.archive.ingest.finish(pending)
        except BastionError as exc:
            sop_class, sop, _ = _uids(bytes(self.head))  # parsed again only to name the failed instance
            self.outcome.failed.append((sop_class, sop, failure_reason(exc), exc.message))
            self.outcome.tally.failed(exc.message)
            return
        r = result.record
        self.outcome.tally.stored(r.study_uid, result.patient_id)
        url = f"{base}/studies/{r.study_uid}/series/{r.series_uid}/instances/{r.sop_uid}"
        self.outcome.stored.append((r.sop_class_uid, r.sop_uid, url))
        self.outcome.records.append(r)
        if result.warnings:
            self.outcome.warned[r.sop_uid] = result.warnings

    def abort(self) -> None:
        """Drop what was received of the part (the request failed or was abandoned)."""
        if self.pending is not None:
            self.pending.abort()
            self.pending = None


async def store_stream(archive: Archive, chunks: AsyncIterator[bytes], boundary: str,
                       study: str | None, base: str, outcome: StowOutcome | None = None) -> StowOutcome:
    """Parse a multipart body as it arrives, streaming each part into the store pipeline (:class:`_PartSink`)
    and storing it as soon as it is complete.

    Memory per request stays bounded whatever the parts' sizes. If the body fails (a malformed body, the client
    gone, a body timeout), the part being received is aborted: nothing of it is stored, and no spool file stays.
    ``outcome`` (a new one by default) collects what was stored, also when the body fails after some parts.

    Raises
    ------
    MultipartError
        The body is not a well-formed multipart message, or holds no part (HTTP 400).
    """
    parser = MultipartStream(boundary)
    outcome = StowOutcome() if outcome is None else outcome
    count = 0
    sink: _PartSink | None = None
    try:
        async for chunk in chunks:
            for event in parser.feed(chunk):
                if isinstance(event, PartStart):
                    count += 1
                    sink = _PartSink(archive, event, outcome)
                elif isinstance(event, bytes):
                    assert sink is not None
                    sink.write(event)
                else:
                    assert sink is not None
                    done, sink = sink, None
                    await run_in_threadpool(done.finish, study, base)
            if parser.finished:
                break
        parser.close()
    finally:
        if sink is not None:
            sink.abort()
    if count == 0:
        raise MultipartError("the multipart body holds no parts")
    return outcome
