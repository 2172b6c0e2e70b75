"""DICOM Part 10 framing (PS3.10 7.1): preamble, ``DICM`` prefix and File Meta Information."""

from __future__ import annotations

import functools
import io
import struct
from collections.abc import Iterator

import pydicom
from pydicom.errors import InvalidDicomError

from bastion import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from bastion.errors import InvalidObject
from bastion.model.uids import EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN

PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(elem: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


@functools.lru_cache(maxsize=256)
def _meta_around_uid(sop_class: str, transfer_syntax: str, source_aet: str) -> tuple[bytes, bytes]:
    """The File Meta elements before and after Media Storage SOP Instance UID, which alone changes from one
    object of a sender to the next (worked out once per SOP class, transfer syntax and sender)."""
    before = _element(0x0001, b"OB", b"\x00\x01", b"\x00") + _element(0x0002, b"UI", sop_class.encode(), b"\x00")
    after = b"".join((
        _element(0x0010, b"UI", transfer_syntax.encode(), b"\x00"),
        _element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode(), b"\x00"),
        _element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode(), b" "),
        *((_element(0x0016, b"AE", source_aet.strip().encode(), b" "),) if source_aet.strip() else ()),
    ))
    return before, after


_GROUP_LENGTH = struct.Struct("<HH2sHI")


def file_meta_bytes(sop_class: str, sop_uid: str, transfer_syntax: str, source_aet: str = "") -> bytes:
    """Preamble, prefix and File Meta Information group for one object (PS3.10 7.1)."""
    before, after = _meta_around_uid(sop_class, transfer_syntax, source_aet)
    uid = _element(0x0003, b"UI", sop_uid.encode(), b"\x00")
    length = _GROUP_LENGTH.pack(0x0002, 0x0000, b"UL", 4, len(before) + len(uid) + len(after))
    return b"".join((PREAMBLE, length, before, uid, after))


_LONG_VRS = (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV")


def file_meta_elements(data: bytes) -> Iterator[tuple[int, int, int]]:
    """The elements of the File Meta Information (Explicit VR Little Endian, PS3.10 7.1) at the start of Part 10
    ``data``, as ``(tag, value offset, value length)``, up to the first element of another group or the end of
    ``data``; none if ``data`` has no ``DICM`` prefix."""
    if data[128:132] != b"DICM":
        return
    pos = 132
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            return
        if data[pos + 4: pos + 6] in _LONG_VRS:
            length, start = struct.unpack_from("<I", data, pos + 8)[0], pos + 12
        else:
            length, start = struct.unpack_from("<H", data, pos + 6)[0], pos + 8
        yield group << 16 | elem, start, length
        pos = start + length


def dataset_offset(data: bytes) -> int:
    """Offset of the dataset after the File Meta Information of Part 10 ``data``."""
    if data[128:132] != b"DICM":
        return 0
    group, elem = struct.unpack_from("<HH", data, 132)
    if (group, elem) == (0x0002, 0x0000) and data[136:138] == b"UL":
        length: int = struct.unpack_from("<I", data, 140)[0]  # File Meta Information Group Length
        return 144 + length
    pos = 132
    for _, start, length in file_meta_elements(data):
        pos = start + length
    return pos


def part10_bytes(data: bytes) -> bytes:
    """``data`` if it is a Part 10 file; a bare dataset gets File Meta Information added.

    The dataset's own bytes are never changed. Raises InvalidObject if it is not DICOM.
    """
    if data[128:132] == b"DICM":
        return data
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True, defer_size=1024)
        sop_class = str(ds.get("SOPClassUID", "") or "")
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    except (InvalidDicomError, AttributeError, EOFError, ValueError, struct.error, KeyError, TypeError) as exc:
        raise InvalidObject(f"not a DICOM object: {exc}") from exc
    if not sop_class or not sop_uid:
        raise InvalidObject("not a DICOM object: no DICM prefix and no SOP Class/Instance UID")
    ts = IMPLICIT_VR_LITTLE_ENDIAN if ds.original_encoding[0] else EXPLICIT_VR_LITTLE_ENDIAN
    return file_meta_bytes(sop_class, sop_uid, ts) + data
