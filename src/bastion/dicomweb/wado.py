"""WADO-RS: retrieve studies, series, instances, metadata, frames and bulk data (PS3.18 10.4).

Instances go out as ``multipart/related; type="application/dicom"``. When an instance is
sent as stored its blob is streamed in chunks, so a 1 GB study never sits in memory; an
instance the client wants in another syntax is converted by the
:class:`~bastion.query.retrieve.Retriever` on the way. Transfer syntax negotiation follows
PS3.18 8.7.3: ``transfer-syntax=*`` means as stored; no parameter means Explicit VR Little
Endian, the default of ``application/dicom``; nothing workable is a 406.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from bastion.dicomweb import multipart, pixels
from bastion.dicomweb.frame_reader import read_frames
from bastion.dicomweb.negotiation import (
    DICOM,
    IMAGE_MEDIA_TYPES,
    MULTIPART,
    OCTET_STREAM,
    MediaRange,
    NotAcceptable,
    check_transfer_syntax,
    multipart_syntaxes,
)
from bastion.errors import InvalidQuery, NotFound
from bastion.model.levels import QueryLevel
from bastion.model.records import InstanceRecord
from bastion.model.uids import EXPLICIT_VR_BIG_ENDIAN, UNCOMPRESSED, is_compressed, is_identifiable_uid
from bastion.query.find import QueryKey, conditions_for
from bastion.query.retrieve import Retriever

#: The size of the pieces a retrieve is streamed in: each is one trip to the thread pool and one write
#: to the socket, and about what one retrieve holds in memory (a study can be many GB). Measured on
#: loopback: 1 MB takes the fewest CPU cycles per byte; larger pieces no longer fit the socket's send
#: buffer in one ``send``, so asyncio copies the rest into its own buffer, and fresh pages fault in.
BATCH = 1024 * 1024
_PART_OVERHEAD = 256  # room for one part's delimiter and header fields, or the closing delimiter
_UID_TAGS = {"StudyInstanceUID": 0x0020000D, "SeriesInstanceUID": 0x0020000E, "SOPInstanceUID": 0x00080018}


def check_uid(uid: str, what: str) -> str:
    """``uid`` if it can name a stored object (:func:`bastion.model.uids.is_identifiable_uid`: PS3.5 9.1 UIDs, and
    the ones breaking it that ingest accepts with a warning), else InvalidQuery (400)."""
    if not is_identifiable_uid(uid):
        raise InvalidQuery(f"{what} {uid[:80]!r} is not a valid UID")
    return uid


def select(retriever: Retriever, study: str, series: str | None = None,
           sop: str | None = None) -> list[InstanceRecord]:
    """Current instances of a study, series or instance named in a URL; NotFound if none."""
    named = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": sop}
    keys = [QueryKey(_UID_TAGS[k], k, "UI", check_uid(v, k)) for k, v in named.items() if v is not None]
    level = QueryLevel.IMAGE if sop else QueryLevel.SERIES if series else QueryLevel.STUDY
    records = retriever.select(level, conditions_for(keys))
    if not records:
        what = "instance" if sop else "series" if series else "study"
        raise NotFound(f"no such {what}", uid=sop or series or study)
    return records


def convertible(stored: str, target: str) -> bool:
    """True if an object stored in ``stored`` can be sent in ``target``."""
    if target == stored:
        return True
    if target not in (*UNCOMPRESSED, EXPLICIT_VR_BIG_ENDIAN):
        return False  # Bastion decompresses but never compresses
    return pixels.decodable(stored) or stored in pixels.NATIVE_LE or stored == EXPLICIT_VR_BIG_ENDIAN


def choose_syntax(stored: str, wanted: Sequence[str]) -> str | None:
    """The first of ``wanted`` (``*`` = as stored) that ``stored`` can be sent in."""
    for ts in wanted:
        if ts == "*":
            return stored
        if convertible(stored, ts):
            return ts
    return None


@dataclass(frozen=True)
class Planned:
    """One instance of a retrieve and the syntax it goes out in."""

    record: InstanceRecord
    transfer_syntax: str


def plan_instances(records: list[InstanceRecord], accept: list[MediaRange]) -> list[Planned]:
    """Pick each instance's transfer syntax from ``accept``; NotAcceptable (406) if one has none."""
    wanted = multipart_syntaxes(accept, DICOM, UNCOMPRESSED[0])
    if not wanted:
        raise NotAcceptable('instances are sent as multipart/related; type="application/dicom"')
    plan = []
    for r in records:
        ts = choose_syntax(r.transfer_syntax, wanted)
        if ts is None:
            raise NotAcceptable(f"instance {r.sop_uid} is stored in {r.transfer_syntax} and cannot be sent "
                                f"in {', '.join(wanted)}", uid=r.sop_uid)
        plan.append(Planned(r, ts))
    return plan


def _read_into(fh: BinaryIO, view: memoryview) -> int:
    """Read up to ``len(view)`` bytes into ``view``; 0 at the end of the file."""
    readinto = getattr(fh, "readinto", None)  # files and BytesIO: no intermediate bytes object
    if readinto is not None:
        return int(readinto(view))
    data = fh.read(len(view))
    view[: len(data)] = data
    return len(data)


def stream_instances(retriever: Retriever, plan: list[Planned], boundary: str) -> Iterator[bytes | memoryview]:
    """The multipart body of a retrieve in pieces of at most :data:`BATCH` bytes.

    As-stored blobs are read straight into the piece being filled (several small instances
    share one, a large one spans several), so a study is never in memory and each piece
    costs the server one trip to the thread pool and one write, whatever the instance sizes.
    Each piece is a fresh buffer: the consumer may keep it.
    """
    # What is left to send, for sizing the buffers (a retrieve of one small instance needs no 4 MB).
    left = sum(item.record.size + _PART_OVERHEAD for item in plan) + _PART_OVERHEAD

    def fresh(need: int = 0) -> memoryview:
        return memoryview(bytearray(max(need, _PART_OVERHEAD, min(BATCH, left))))

    view, used = fresh(), 0
    for i, item in enumerate(plan):
        header = multipart.part_header(boundary, f"{DICOM}; transfer-syntax={item.transfer_syntax}", first=i == 0)
        if used + len(header) > len(view):
            yield view[:used]
            view, used = fresh(len(header)), 0
        view[used: used + len(header)] = header
        used += len(header)
        if item.transfer_syntax != item.record.transfer_syntax:
            yield view[:used]  # converted in memory by the retriever: a piece of its own
            yield retriever.part10_bytes(item.record, item.transfer_syntax)
            left -= item.record.size + _PART_OVERHEAD
            view, used = fresh(), 0
            continue
        with retriever.open(item.record) as fh:
            while True:
                if used == len(view):
                    yield view
                    view, used = fresh(), 0
                n = _read_into(fh, view[used:])
                if not n:
                    break
                used += n
        left -= item.record.size + _PART_OVERHEAD
    closing = multipart.closing(boundary)
    if used + len(closing) > len(view):
        yield view[:used]
        view, used = fresh(len(closing)), 0
    view[used: used + len(closing)] = closing
    yield view[: used + len(closing)]


@dataclass(frozen=True)
class FrameChoice:
    """How frames go out: as stored or native, and the part's media type."""

    as_stored: bool
    media_type: str


def choose_frames(stored: str, accept: list[MediaRange]) -> FrameChoice:
    """Negotiate the representation of frames (PS3.18 8.7.3.5.3); NotAcceptable if none fits."""
    image_type = IMAGE_MEDIA_TYPES.get(stored)
    for r in accept:
        related = r.related_type if r.media_type == MULTIPART else ""
        if r.media_type in ("*/*", "multipart/*") or (r.media_type == MULTIPART and related in ("", "*/*")):
            ts = r.transfer_syntax or "*"
        elif r.media_type == MULTIPART and related == OCTET_STREAM:
            ts = check_transfer_syntax(r.transfer_syntax) if r.transfer_syntax else UNCOMPRESSED[0]
        elif r.media_type == MULTIPART and image_type and MediaRange(related).matches(image_type):
            if r.transfer_syntax in (None, "*", stored):
                return FrameChoice(True, image_type)
            continue
        else:
            continue
        if ts in ("*", stored):
            return FrameChoice(True, OCTET_STREAM)
        if ts == UNCOMPRESSED[0] and (stored in pixels.NATIVE_LE or convertible(stored, ts)):
            return FrameChoice(False, OCTET_STREAM)
    raise NotAcceptable(f"frames stored in {stored} can be sent as stored (transfer-syntax=*"
                        f"{' or ' + stored if stored else ''}) or as {UNCOMPRESSED[0]}")


def frames_body(retriever: Retriever, record: InstanceRecord, numbers: list[int],
                choice: FrameChoice, boundary: str) -> bytes:
    """The multipart body of a frames retrieve; each part names its transfer syntax for OHIF."""
    data = read_frames(retriever, record, numbers, as_stored=choice.as_stored)
    if data is None:  # needs decoding or an unusual layout: load the whole object
        data = pixels.frames(pixels.load_dataset(retriever, record), numbers, as_stored=choice.as_stored)
    stored = record.transfer_syntax
    sent_as_is = is_compressed(stored) or stored in pixels.NATIVE_LE
    ts = stored if choice.as_stored and sent_as_is else UNCOMPRESSED[0]
    ctype = f"{choice.media_type}; transfer-syntax={ts}"
    out = bytearray()
    for i, frame in enumerate(data):
        out += multipart.part_header(boundary, ctype, first=i == 0)
        out += frame
    out += multipart.closing(boundary)
    return bytes(out)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single ``bytes=a-b`` range as ``(start, end_exclusive)``; None for no/ignored range.

    Raises ``ValueError`` when the range cannot be satisfied (HTTP 416).
    """
    if not header or not header.strip().lower().startswith("bytes="):
        return None
    spec = header.strip()[6:]
    if "," in spec:
        return None  # multiple ranges: send the whole value (RFC 9110 14.2 allows it)
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.strip().isdigit() or last.strip().isdigit()):
        return None
    if not first.strip():
        n = int(last)
        if n == 0:
            raise ValueError("empty suffix range")
        return max(0, size - n), size
    start = int(first)
    if last.strip() and int(last) < start:
        return None  # an invalid range is ignored (RFC 9110 14.1.1)
    if start >= size:
        raise ValueError("range not satisfiable")
    end = int(last) + 1 if last.strip() else size
    return start, min(end, size)


def bulk_data(retriever: Retriever, record: InstanceRecord, path: str) -> bytes:
    """The bulk data value at ``path`` of ``record`` (as stored)."""
    ds = pixels.load_dataset(retriever, record)
    return pixels.bulk_value(ds, path)
