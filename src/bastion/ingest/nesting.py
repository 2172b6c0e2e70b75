"""The bound on how deeply an object may nest sequences (PS3.5 7.5), checked without recursion.

PS3.5 sets no limit on nesting. Parsers that recurse per sequence level (pydicom's reader and its DICOM JSON,
which serve the stored object later) run out of stack on a hostile object nested a thousand levels deep, so
ingest refuses any object nested more than :data:`MAX_SEQUENCE_DEPTH` levels (0xC000, cannot understand): real
objects stay within a handful. Both checks here walk iteratively and stop one level past the bound.
"""

from __future__ import annotations

import functools
import struct

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

#: The deepest nesting of sequences an object may have: a sequence inside an item of a sequence counts two.
MAX_SEQUENCE_DEPTH = 64

#: The message of the error an object nested deeper gets.
TOO_DEEP = f"sequences are nested more than {MAX_SEQUENCE_DEPTH} deep"

#: The Item tag (FFFE,E000) in little endian: every nesting level holds one, unless its sequence is empty.
ITEM_TAG_BYTES = b"\xfe\xff\x00\xe0"

_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_HEADER = struct.Struct("<HHI")
_SHORT = struct.Struct("<H")
_LONG = struct.Struct("<I")
_SEQUENCE, _ITEM, _FRAGMENTS = 0, 1, 2


@functools.lru_cache(maxsize=4096)
def _is_sequence_tag(tag: int) -> bool:
    """Whether the data dictionary (PS3.6) gives ``tag`` the VR SQ (for Implicit VR, PS3.5 7.1.3)."""
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False


def raw_nested_too_deep(buf: bytes, pos: int, end: int, explicit: bool, limit: int = MAX_SEQUENCE_DEPTH) -> bool:
    """Whether the Little Endian dataset ``buf[pos:end]`` nests sequences more than ``limit`` deep.

    Walks element headers (PS3.5 7.1, 7.5) into sequences of defined and undefined length alike. In Implicit VR a
    defined-length sequence is known by the data dictionary, as a parser knows it; encapsulated fragments
    (PS3.5 A.4) are skipped. A walk that runs off the buffer ends with False: the object's other checks judge
    its framing.
    """
    containers: list[tuple[int, int]] = []  # (kind, end offset or -1 for undefined length)
    depth = 0
    size = min(len(buf), max(end, pos))
    while True:
        while containers and containers[-1][1] != -1 and pos >= containers[-1][1]:
            if containers.pop()[0] == _SEQUENCE:
                depth -= 1
        if (not containers and pos >= end) or pos + 8 > size:
            return False
        group, element, value_length = _HEADER.unpack_from(buf, pos)
        if group == 0xFFFE:
            pos += 8
            inside = containers[-1][0] if containers else None
            if element == 0xE000:
                if inside == _FRAGMENTS:
                    pos += value_length
                else:
                    containers.append((_ITEM, -1 if value_length == _UNDEFINED else pos + value_length))
            elif element == 0xE00D and inside == _ITEM:
                containers.pop()
            elif element == 0xE0DD and inside in (_SEQUENCE, _FRAGMENTS):
                if containers.pop()[0] == _SEQUENCE:
                    depth -= 1
            continue
        tag = (group << 16) | element
        vr: bytes | None = None
        if explicit:
            vr = buf[pos + 4: pos + 6]
            if vr in _LONG_VRS:
                if pos + 12 > size:
                    return False
                value_length, pos = _LONG.unpack_from(buf, pos + 8)[0], pos + 12
            else:
                value_length, pos = _SHORT.unpack_from(buf, pos + 6)[0], pos + 8
        else:
            pos += 8
        undefined = value_length == _UNDEFINED
        if undefined and (tag >> 16) == 0x7FE0 or undefined and vr not in (None, b"SQ", b"UN"):
            containers.append((_FRAGMENTS, -1))
        elif vr == b"SQ" or undefined or (vr is None and _is_sequence_tag(tag)):
            depth += 1
            if depth > limit:
                return True
            containers.append((_SEQUENCE, -1 if undefined else pos + value_length))
        else:
            pos += value_length


def dataset_nested_too_deep(ds: Dataset, limit: int = MAX_SEQUENCE_DEPTH) -> bool:
    """Whether the pydicom dataset ``ds`` nests sequences more than ``limit`` deep.

    Parses sequences still held raw one level at a time, and none deeper than ``limit + 1`` levels.
    """
    stack = [(ds, 0)]
    while stack:
        current, depth = stack.pop()
        for tag, elem in list(current._dict.items()):
            if isinstance(elem, RawDataElement):
                if elem.VR != "SQ" and not (elem.VR is None and _is_sequence_tag(tag)):
                    continue
                elem = current[tag]  # parses this sequence's items (one level)
            if elem.VR != "SQ" or elem.value is None:
                continue
            if depth + 1 > limit:
                return True
            stack.extend((item, depth + 1) for item in elem.value)
    return False
