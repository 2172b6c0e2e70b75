"""STOW-RS: store instances (PS3.18 10.5).

Each ``application/dicom`` part of a ``multipart/related`` request goes through
``archive.ingest.store_bytes`` -- the one store pipeline C-STORE also uses -- as soon as it
has arrived. The response (PS3.18 10.5.3, Table 10.5.3-1) lists stored instances in the
ReferencedSOPSequence and rejected ones in the FailedSOPSequence with a FailureReason:

==========  =============================================================
0xA700      out of resources (storage full)
0xA900      the data set does not match its SOP class / command
0xC000      cannot understand (not DICOM, missing or invalid UIDs)
0xC122      transfer syntax not supported
0xC409      the instance's Study Instance UID differs from the one in the URL
0x0110      processing failure (blob store or index error)
==========  =============================================================

HTTP status: 200 all stored, 202 some failed, 409 all failed (PS3.18 10.5.3).
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pydicom
from starlette.concurrency import run_in_threadpool

from bastion.archive import Archive
from bastion.dicomweb.multipart import MultipartError, MultipartParser, Part
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
from bastion.model.records import InstanceRecord

PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
STUDY_MISMATCH = 0xC409
MAX_PART_BYTES = 4 * 1024**3


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

    @property
    def http_status(self) -> int:
        """200 all stored, 202 some failed, 409 all failed (PS3.18 10.5.3)."""
        if not self.failed:
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
            } for cls, sop, url in self.stored]}
        return body


def _uids(data: bytes) -> tuple[str, str, str]:
    """SOP Class, SOP Instance and Study Instance UIDs of a part, ``""`` when unreadable."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"])
        return (str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or ""),
                str(ds.get("StudyInstanceUID", "") or ""))
    except Exception:
        return "", "", ""


def store_part(archive: Archive, part: Part, study: str | None, base: str, outcome: StowOutcome) -> None:
    """Store one part (blocking) and record the outcome."""
    ctype = parse_media_type(part.content_type).media_type if part.content_type else DICOM
    if ctype != DICOM:
        outcome.failed.append(("", "", CANNOT_UNDERSTAND, f"part of type {ctype} is not application/dicom"))
        return
    if study is not None:
        sop_class, sop, part_study = _uids(part.body)
        if part_study != study:
            outcome.failed.append((sop_class, sop, STUDY_MISMATCH,
                                   f"Study Instance UID {part_study or '(none)'} differs from {study}"))
            return
    try:
        result = archive.ingest.store_bytes(part.body, origin="stow")
    except BastionError as exc:
        sop_class, sop, _ = _uids(part.body)  # parsed again only to name the failed instance
        outcome.failed.append((sop_class, sop, failure_reason(exc), exc.message))
        return
    r = result.record
    url = f"{base}/studies/{r.study_uid}/series/{r.series_uid}/instances/{r.sop_uid}"
    outcome.stored.append((r.sop_class_uid, r.sop_uid, url))
    outcome.records.append(r)


async def store_stream(archive: Archive, chunks: AsyncIterator[bytes], boundary: str,
                       study: str | None, base: str) -> StowOutcome:
    """Parse a multipart body as it arrives and store each part as soon as it is complete.

    Raises
    ------
    MultipartError
        The body is not a well-formed multipart message, or holds no part (HTTP 400).
    """
    parser = MultipartParser(boundary, max_part_bytes=MAX_PART_BYTES)
    outcome = StowOutcome()
    count = 0
    async for chunk in chunks:
        for part in parser.feed(chunk):
            count += 1
            await run_in_threadpool(store_part, archive, part, study, base, outcome)
        if parser.finished:
            break
    parser.close()
    if count == 0:
        raise MultipartError("the multipart body holds no parts")
    return outcome
