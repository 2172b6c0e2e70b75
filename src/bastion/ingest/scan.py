"""A fast scan of a Part 10 header for the common case (PS3.5 7.1, 7.5; PS3.10 7.1).

Explicit or Implicit VR Little Endian, the wanted attributes present as plain values: the
top-level elements are walked without decoding anything else (sequences and their items are
skipped by their lengths or delimiters), up to Pixel Data. Anything else — another transfer
syntax, a wanted attribute that is a sequence, a header that does not fit the first block —
raises :class:`NotSimple`, and the caller uses pydicom instead. Pure: no I/O.

:func:`scan_header` is the C twin from ``_cscan.c`` where that extension was built (``SPEEDUPS``), and
:func:`scan_header_py` otherwise; both give the same results (``tests/unit/test_cscan.py``). Setting
``BASTION_PURE_PYTHON=1`` in the environment forces the Python versions (to compare them).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from types import ModuleType

from bastion.model.compiled import load_extension
from bastion.model.uids import EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN

_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


class NotSimple(Exception):
    """The object needs the general parser."""


@dataclass
class Scan:
    """What the scan found."""

    transfer_syntax: str
    meta_sop_uid: str | None
    elements: dict[int, tuple[str | None, bytes]]  # wanted tag -> (explicit VR or None, value)
    pixel_data_offset: int | None  # where the Pixel Data element starts, if reached


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace").strip("\x00 ")


def _meta(buf: bytes) -> tuple[str, str | None, int]:
    if len(buf) < 144 or buf[128:132] != b"DICM":
        raise NotSimple("no Part 10 preamble")
    pos, ts, sop = 132, "", None
    while pos + 8 <= len(buf):
        group, elem = struct.unpack_from("<HH", buf, pos)
        if group != 0x0002:
            break
        vr = buf[pos + 4: pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(buf):
                raise NotSimple("file meta runs past the scanned block")
            length, hdr = struct.unpack_from("<I", buf, pos + 8)[0], 12
        else:
            length, hdr = struct.unpack_from("<H", buf, pos + 6)[0], 8
        value = buf[pos + hdr: pos + hdr + length]
        if elem == 0x0010:
            ts = _text(value)
        elif elem == 0x0003:
            sop = _text(value)
        pos += hdr + length
    return ts, sop, pos


def _element(buf: bytes, pos: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, explicit VR, value length, header length) of the element at ``pos``."""
    if pos + 8 > len(buf):
        raise NotSimple("header runs past the scanned block")
    group, elem = struct.unpack_from("<HH", buf, pos)
    tag = (group << 16) | elem
    if group == 0xFFFE or not explicit:
        return tag, None, struct.unpack_from("<I", buf, pos + 4)[0], 8
    vr = buf[pos + 4: pos + 6]
    if not (vr.isalpha() and vr.isupper()):
        raise NotSimple("not explicit VR after all")
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise NotSimple("header runs past the scanned block")
        return tag, vr, struct.unpack_from("<I", buf, pos + 8)[0], 12
    return tag, vr, struct.unpack_from("<H", buf, pos + 6)[0], 8


def _skip_items(buf: bytes, pos: int, explicit: bool, depth: int) -> int:
    """Skip the items of an undefined-length value starting at ``pos``; return the position after it."""
    if depth > 16:
        raise NotSimple("sequences nested too deep")
    while True:
        tag, _, length, hdr = _element(buf, pos, explicit)
        pos += hdr
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise NotSimple("unexpected element in a sequence")
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an item of undefined length: its elements up to the item delimiter
            tag, _, length, hdr = _element(buf, pos, explicit)
            pos += hdr
            if tag == _ITEM_END:
                break
            pos = _skip_items(buf, pos, explicit, depth + 1) if length == _UNDEFINED else pos + length


_TAG = struct.Struct("<HH")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")


def scan_header_py(buf: bytes, wanted: frozenset[int]) -> Scan:
    """Scan ``buf`` (the first bytes of a Part 10 object) for the ``wanted`` top-level elements.

    The loop decodes element headers inline (this runs for every stored object): it is
    :func:`_element` unrolled, and both must agree.
    """
    ts, meta_sop, pos = _meta(buf)
    if ts not in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN):
        raise NotSimple(f"transfer syntax {ts}")
    explicit = ts == EXPLICIT_VR_LITTLE_ENDIAN
    found: dict[int, tuple[str | None, bytes]] = {}
    size = len(buf)
    tag_of, u32, u16, long_vrs = _TAG.unpack_from, _U32.unpack_from, _U16.unpack_from, _LONG_VRS
    while pos < size:
        if pos + 8 > size:
            raise NotSimple("header runs past the scanned block")
        group, elem = tag_of(buf, pos)
        tag = (group << 16) | elem
        if tag in PIXEL_DATA_TAGS:
            return Scan(ts, meta_sop, found, pos)
        if group == 0xFFFE:
            raise NotSimple("item outside a sequence")
        vr: bytes | None
        if explicit:
            vr = buf[pos + 4: pos + 6]
            if vr in long_vrs:
                if pos + 12 > size:
                    raise NotSimple("header runs past the scanned block")
                length, hdr = u32(buf, pos + 8)[0], 12
            elif vr.isalpha() and vr.isupper():
                length, hdr = u16(buf, pos + 6)[0], 8
            else:
                raise NotSimple("not explicit VR after all")
        else:
            vr, length, hdr = None, u32(buf, pos + 4)[0], 8
        if length == _UNDEFINED:
            if tag in wanted:
                raise NotSimple("a wanted attribute is a sequence")
            pos = _skip_items(buf, pos + hdr, explicit, 0)
            continue
        end = pos + hdr + length
        if end > size:
            raise NotSimple("value runs past the scanned block")
        if tag in wanted:
            if vr in (b"SQ", b"UN"):
                raise NotSimple("a wanted attribute is a sequence or of unknown VR")
            found[tag] = (vr.decode() if vr else None, buf[pos + hdr: end])
        pos = end
    return Scan(ts, meta_sop, found, None)


def _load_speedups() -> ModuleType | None:
    module = load_extension("bastion.ingest._cscan")
    if module is not None:
        module.init(NotSimple)
    return module


#: The compiled twins (``_cscan``), or None where Bastion runs the Python versions.
SPEEDUPS = _load_speedups()


@functools.lru_cache(maxsize=8)
def _packed(wanted: frozenset[int]) -> bytes:
    return b"".join(tag.to_bytes(4, "big") for tag in sorted(wanted))


def _scan_header_c(buf: bytes, wanted: frozenset[int]) -> Scan:
    assert SPEEDUPS is not None
    return Scan(*SPEEDUPS.scan(buf, _packed(wanted)))


scan_header = _scan_header_c if SPEEDUPS is not None else scan_header_py
scan_header.__doc__ = scan_header_py.__doc__
