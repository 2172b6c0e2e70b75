"""Read single frames straight from a stored file, without loading the object (PS3.5 8.2, A.4).

A viewer asks for every frame of a multi-frame object one request at a time; parsing a
1 GB object for each would be hopeless. Here only the header is parsed (up to Pixel Data),
then the frame is located and read:

* native pixels (Explicit/Implicit VR Little Endian, whole-byte frames): frame ``n`` is the
  ``n``-th slice of the Pixel Data value;
* encapsulated pixels (PS3.5 A.4): the items are walked by their lengths; with one fragment
  per frame, or with a Basic Offset Table, frame ``n`` is located without reading the others.

Anything else returns None and the caller loads the object in full.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import BinaryIO

import pydicom

from bastion.errors import NotFound
from bastion.model.records import InstanceRecord
from bastion.model.uids import EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, is_compressed
from bastion.query.retrieve import Retriever

_NATIVE = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)
_ITEM, _SEQ_END = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)


def _pixel_value_offset(fh: BinaryIO, ts: str) -> tuple[int, int] | None:
    """(offset, length) of the Pixel Data value; ``fh`` is positioned at the Pixel Data tag."""
    pos = fh.tell()
    head = fh.read(12)
    if len(head) < 8 or struct.unpack("<HH", head[:4]) != (0x7FE0, 0x0010):
        return None
    if ts == IMPLICIT_VR_LITTLE_ENDIAN or head[4:6] not in (b"OB", b"OW"):
        return pos + 8, struct.unpack("<I", head[4:8])[0]
    return pos + 12, struct.unpack("<I", head[8:12])[0]


def _fragments(fh: BinaryIO, start: int) -> list[tuple[int, int]] | None:
    """(offset, length) of every item of an encapsulated value, the Basic Offset Table first."""
    out: list[tuple[int, int]] = []
    pos = start
    while True:
        fh.seek(pos)
        item = fh.read(8)
        if len(item) < 8:
            return None
        group, elem, length = struct.unpack("<HHI", item)
        if (group, elem) == _SEQ_END:
            return out
        if (group, elem) != _ITEM or length == 0xFFFFFFFF:
            return None
        out.append((pos + 8, length))
        pos += 8 + length


def _encapsulated_frame(fh: BinaryIO, items: list[tuple[int, int]], index: int, count: int) -> bytes | None:
    bot, fragments = items[0], items[1:]
    if len(fragments) == count:
        offset, length = fragments[index]
        fh.seek(offset)
        return fh.read(length)
    if bot[1] != 4 * count:
        return None  # several fragments per frame and no offset table: let pydicom work it out
    fh.seek(bot[0])
    offsets = list(struct.unpack(f"<{count}I", fh.read(4 * count)))
    base = fragments[0][0] - 8 if fragments else 0
    start = base + offsets[index]
    end = base + offsets[index + 1] if index + 1 < count else None
    parts = []
    for offset, length in fragments:
        item_start = offset - 8
        if item_start >= start and (end is None or item_start < end):
            fh.seek(offset)
            parts.append(fh.read(length))
    return b"".join(parts)


def read_frames(retriever: Retriever, record: InstanceRecord, numbers: Sequence[int], *,
                as_stored: bool) -> list[bytes] | None:
    """Frames ``numbers`` (1-based) read straight from the file, or None when this needs a full load.

    Native frames are the same bytes whether sent as stored or as Explicit VR Little Endian;
    compressed frames are only read here when they go out as stored.
    """
    ts = record.transfer_syntax
    if ts not in _NATIVE and not (is_compressed(ts) and as_stored):
        return None
    with retriever.open(record) as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
        located = _pixel_value_offset(fh, ts)
        if located is None:
            return None
        try:
            count = max(1, int(ds.get("NumberOfFrames") or 1))
            rows, columns = int(ds.Rows), int(ds.Columns)
            samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated)
        except (AttributeError, TypeError, ValueError):
            return None
        bad = [n for n in numbers if n > count]
        if bad:
            raise NotFound(f"frame {bad[0]} does not exist (the instance has {count})")
        start, length = located
        out: list[bytes] = []
        if ts in _NATIVE:
            frame_bits = rows * columns * samples * bits
            if frame_bits % 8 or length == 0xFFFFFFFF or length < count * frame_bits // 8:
                return None
            size = frame_bits // 8
            for n in numbers:
                fh.seek(start + (n - 1) * size)
                out.append(fh.read(size))
            return out
        items = _fragments(fh, start) if length == 0xFFFFFFFF else None
        if not items:
            return None
        for n in numbers:
            frame = _encapsulated_frame(fh, items, n - 1, count)
            if frame is None:
                return None
            out.append(frame)
        return out
