"""DIMSE command sets (PS3.7 Annex E): group 0000, always Implicit VR Little Endian.

A command set is a plain ``dict`` keyed by keyword, e.g. ``{"CommandField": 0x0001,
"MessageID": 7, "AffectedSOPClassUID": "1.2..."}``. Encoding and decoding are table
driven and do not go through pydicom: this runs for every message on the hot path.
"""

from __future__ import annotations

import functools
import struct
from typing import Any

from bastion.dimse.pdu import PDUError

# keyword -> (element number, VR)
_ELEMENTS: dict[str, tuple[int, str]] = {
    "CommandGroupLength": (0x0000, "UL"),
    "AffectedSOPClassUID": (0x0002, "UI"),
    "RequestedSOPClassUID": (0x0003, "UI"),
    "CommandField": (0x0100, "US"),
    "MessageID": (0x0110, "US"),
    "MessageIDBeingRespondedTo": (0x0120, "US"),
    "MoveDestination": (0x0600, "AE"),
    "Priority": (0x0700, "US"),
    "CommandDataSetType": (0x0800, "US"),
    "Status": (0x0900, "US"),
    "OffendingElement": (0x0901, "AT"),
    "ErrorComment": (0x0902, "LO"),
    "ErrorID": (0x0903, "US"),
    "AffectedSOPInstanceUID": (0x1000, "UI"),
    "RequestedSOPInstanceUID": (0x1001, "UI"),
    "EventTypeID": (0x1002, "US"),
    "ActionTypeID": (0x1008, "US"),
    "NumberOfRemainingSuboperations": (0x1020, "US"),
    "NumberOfCompletedSuboperations": (0x1021, "US"),
    "NumberOfFailedSuboperations": (0x1022, "US"),
    "NumberOfWarningSuboperations": (0x1023, "US"),
    "MoveOriginatorApplicationEntityTitle": (0x1030, "AE"),
    "MoveOriginatorMessageID": (0x1031, "US"),
}
_BY_ELEMENT = {elem: (kw, vr) for kw, (elem, vr) in _ELEMENTS.items()}

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF
N_EVENT_REPORT_RQ, N_EVENT_REPORT_RSP = 0x0100, 0x8100
N_ACTION_RQ, N_ACTION_RSP = 0x0130, 0x8130

NO_DATASET = 0x0101
HAS_DATASET = 0x0000

# Status codes (PS3.7 C, PS3.4 B.2.3, C.4.x)
SUCCESS = 0x0000
PENDING = 0xFF00
PENDING_WARNING = 0xFF01
CANCEL = 0xFE00
WARNING_SUBOPS = 0xB000
OUT_OF_RESOURCES_SUBOPS = 0xA702
UNRECOGNIZED_OPERATION = 0x0211
DUPLICATE_INVOCATION = 0x0210
OUT_OF_RESOURCES = 0xA700  # C-FIND (PS3.4 C.4.1.1.4)
OUT_OF_RESOURCES_MATCHES = 0xA701  # C-MOVE, C-GET: unable to calculate number of matches (C.4.2.1.4)
SOP_CLASS_NOT_SUPPORTED = 0x0122


def _encode_value(vr: str, value: Any) -> bytes:
    if vr == "US":
        return struct.pack("<H", value)
    if vr == "UL":
        return struct.pack("<I", value)
    if vr == "AT":
        return b"".join(struct.pack("<HH", v >> 16, v & 0xFFFF) for v in
                        (value if isinstance(value, (list, tuple)) else [value]))
    raw = str(value).encode("utf-8" if vr == "LO" else "ascii", "replace")
    if len(raw) % 2:
        raw += b"\x00" if vr == "UI" else b" "
    return raw


_US_ELEMENT = struct.Struct("<HHIH")
_ELEMENT_HEADER = struct.Struct("<HHI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
@functools.lru_cache(maxsize=256)  # commands come in a few shapes
def _plan(keys: tuple[str, ...]) -> tuple[tuple[str, int, str], ...]:
    """The elements of a command built with ``keys``, in tag order, as (keyword, element, VR)."""
    return tuple(sorted(((k, *_ELEMENTS[k]) for k in keys if k != "CommandGroupLength"), key=lambda p: p[1]))


def encode_command(command: dict[str, Any]) -> bytes:
    """Encode a command set, computing CommandGroupLength (PS3.7 E.1)."""
    body = []
    for kw, elem, vr in _plan(tuple(command)):
        value = command[kw]
        if value is None:
            continue
        if vr == "US":
            body.append(_US_ELEMENT.pack(0x0000, elem, 2, value))
            continue
        raw = _encode_value(vr, value)
        body.append(_ELEMENT_HEADER.pack(0x0000, elem, len(raw)) + raw)
    joined = b"".join(body)
    return struct.pack("<HHII", 0, 0, 4, len(joined)) + joined


def decode_command(data: bytes) -> dict[str, Any]:
    """Decode a command set; unknown group-0000 elements are skipped."""
    out: dict[str, Any] = {}
    pos, end = 0, len(data)
    while pos + 8 <= end:
        group, elem, length = _ELEMENT_HEADER.unpack_from(data, pos)
        pos += 8
        stop = pos + length
        if group != 0x0000 or stop > end:
            raise PDUError("malformed DIMSE command set")
        spec = _BY_ELEMENT.get(elem)
        if spec is not None:
            kw, vr = spec
            if vr == "US":
                out[kw] = _U16.unpack_from(data, pos)[0] if length >= 2 else 0
            elif vr == "UL":
                out[kw] = _U32.unpack_from(data, pos)[0] if length >= 4 else 0
            elif vr == "AT":
                raw = bytes(data[pos: stop - length % 4])
                out[kw] = [(g << 16) | e for g, e in struct.iter_unpack("<HH", raw)]
            else:
                out[kw] = bytes(data[pos: stop]).decode("utf-8" if vr == "LO" else "ascii", "replace").strip(" \x00")
        pos = stop
    if "CommandField" not in out:
        raise PDUError("DIMSE command set has no Command Field")
    return out


def has_dataset(command: dict[str, Any]) -> bool:
    """True if a dataset follows the command (PS3.7 E.1: CommandDataSetType != 0x0101)."""
    return command.get("CommandDataSetType", NO_DATASET) != NO_DATASET
