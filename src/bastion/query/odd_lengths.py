"""Finding an element of odd length in a stored dataset without decoding it (PS3.5 7.1.1, 7.5, A.4).

Every value length in a dataset shall be even (PS3.5 7.1.1), and so shall every fragment of encapsulated Pixel
Data (A.4). A stored object that breaks this is kept as received, but what goes out over DIMSE must not
(:meth:`bastion.query.retrieve.Retriever.open_for_dimse`). A dataset of odd total length has such an element;
one of even total length may still hold two: :func:`has_odd_length_element` walks the element headers (into
sequences and items, over the fragments of encapsulated Pixel Data), reading only the headers and seeking over
the values, to tell.
"""

from __future__ import annotations

import io
import struct
from typing import BinaryIO

from pydicom.datadict import dictionary_VR

from bastion.model.uids import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)

#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _SEQ_END = 0xE000, 0xE0DD
_PIXEL_DATA = 0x7FE00010
_HEAD = struct.Struct("<HH")
_U16, _U32 = struct.Struct("<H"), struct.Struct("<I")

#: At most this many element headers are read; a dataset with more is taken to be even (a bound on the cost
#: for objects such as RT Structure Sets with many thousands of items).
MAX_ELEMENTS = 20_000


def _is_sequence(tag: int) -> bool:
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:  # private or unknown: a value
        return False


def has_odd_length_element(fh: BinaryIO, transfer_syntax: str, max_elements: int = MAX_ELEMENTS) -> bool:
    """True if the dataset from ``fh``'s position to its end has an element or a Pixel Data fragment of odd length.

    Little Endian syntaxes only (Explicit, Implicit and the encapsulated ones); Deflated and Big Endian give
    False, as does a dataset whose headers do not parse (it is sent as stored, as before) or that has more
    than ``max_elements`` elements. ``fh`` is left at an unspecified position.
    """
    if transfer_syntax in (DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN):
        return False
    explicit = transfer_syntax != IMPLICIT_VR_LITTLE_ENDIAN
    read, seek = fh.read, fh.seek
    fragments = False  # inside encapsulated Pixel Data
    un_depth = 0  # inside an explicit UN of undefined length, Implicit VR (PS3.5 6.2.2): its open sequences
    for _ in range(max_elements):
        head = read(8)
        if len(head) < 8:
            return False  # the end (or a truncated header: not ours to judge)
        group, elem = _HEAD.unpack_from(head)
        if group == 0xFFFE:  # item or delimiter: a 4-byte length, no VR
            length = _U32.unpack_from(head, 4)[0]
            if fragments:
                if elem == _SEQ_END:
                    fragments = False
                elif elem == _ITEM:
                    if length % 2:
                        return True
                    seek(length, io.SEEK_CUR)
            elif elem == _SEQ_END and un_depth:
                un_depth -= 1
                explicit = un_depth == 0
            continue  # an item of a sequence: its elements come next
        tag = group << 16 | elem
        if explicit:
            vr = head[4:6]
            if vr in _LONG_VRS:
                rest = read(4)
                if len(rest) < 4:
                    return False
                length = _U32.unpack_from(rest)[0]
            else:
                length = _U16.unpack_from(head, 6)[0]
            sequence = vr == b"SQ"
        else:
            length = _U32.unpack_from(head, 4)[0]
            sequence = _is_sequence(tag)
        if length == _UNDEFINED:
            if un_depth:
                un_depth += 1
            elif explicit and vr == b"UN":
                explicit, un_depth = False, 1
            elif tag == _PIXEL_DATA and not sequence:
                fragments = True  # the Basic Offset Table and fragments follow as items
            continue  # a sequence: its items follow
        if sequence:
            continue  # a sequence of defined length: its items follow
        if length % 2:
            return True
        seek(length, io.SEEK_CUR)
    return False
