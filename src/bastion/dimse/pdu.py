"""Protocol Data Units of the DICOM Upper Layer (PS3.8 9.3) and their items.

Encoding and decoding only; no I/O. Lengths are big-endian (PS3.8 9.3.1).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


#: A-ASSOCIATE-RJ fields (PS3.8 9.3.4, Table 9-21).
REJECTED_PERMANENT = 1
REJECTED_TRANSIENT = 2
SOURCE_SERVICE_USER = 1
SOURCE_PROVIDER_PRESENTATION = 3
REASON_NO_REASON = 1  # with source 1
REASON_CALLING_AE_NOT_RECOGNIZED = 3  # with source 1
REASON_CALLED_AE_NOT_RECOGNIZED = 7  # with source 1
REASON_LOCAL_LIMIT_EXCEEDED = 2  # with source 3


class PDUError(Exception):
    """A PDU that breaks PS3.8 9.3."""


class PDURefused(PDUError):
    """A PDU refused from its 6-byte header alone, before any of its body is received or stored.

    Its type is not one this end accepts in the association's state, or its length (PS3.8 9.3.1) is larger
    than this end accepts: an invalid PDU to the state machine (PS3.8 9.2, Evt19), answered with
    A-ASSOCIATE-RJ or A-ABORT.
    """

    def __init__(self, kind: int, length: int, why: str) -> None:
        super().__init__(f"PDU 0x{kind:02x} of {length} bytes refused: {why}")
        self.kind = kind
        self.length = length


@dataclass
class PresentationContext:
    """A proposed (RQ) or answered (AC) presentation context (PS3.8 9.3.2.2 / 9.3.3.2)."""

    id: int
    abstract_syntax: str = ""
    transfer_syntaxes: list[str] = field(default_factory=list)
    result: int = 0  # AC: 0 acceptance, 1 user-rejection, 2 no-reason, 3 abstract syntax, 4 transfer syntaxes

    @property
    def transfer_syntax(self) -> str:
        """The accepted transfer syntax (AC)."""
        return self.transfer_syntaxes[0] if self.transfer_syntaxes else ""


@dataclass
class RoleSelection:
    """SCP/SCU Role Selection sub-item (PS3.7 D.3.3.4)."""

    sop_class: str
    scu: bool
    scp: bool


@dataclass
class AssociateRQ:
    """A-ASSOCIATE-RQ or -AC (PS3.8 9.3.2, 9.3.3)."""

    called_aet: str
    calling_aet: str
    contexts: list[PresentationContext] = field(default_factory=list)
    max_pdu: int = 16384
    implementation_uid: str = ""
    implementation_version: str = ""
    roles: list[RoleSelection] = field(default_factory=list)
    async_ops: tuple[int, int] | None = None
    user_identity: tuple[int, bytes, bytes] | None = None  # (type, primary, secondary)


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(payload)) + payload


def _uid_item(kind: int, uid: str) -> bytes:
    return _item(kind, uid.encode("ascii"))


def _aet(text: str) -> bytes:
    return text.encode("ascii", "replace")[:16].ljust(16, b" ")


def encode_associate(rq: AssociateRQ, ac: bool) -> bytes:
    """Encode an A-ASSOCIATE-RQ (``ac=False``) or -AC PDU."""
    items = [_uid_item(0x10, APPLICATION_CONTEXT)]
    for pc in rq.contexts:
        if ac:
            sub = _uid_item(0x40, pc.transfer_syntax or "1.2.840.10008.1.2")
            items.append(_item(0x21, struct.pack(">BxBx", pc.id, pc.result) + sub))
        else:
            sub = _uid_item(0x30, pc.abstract_syntax) + b"".join(_uid_item(0x40, t) for t in pc.transfer_syntaxes)
            items.append(_item(0x20, struct.pack(">Bxxx", pc.id) + sub))
    user = [_item(0x51, struct.pack(">I", rq.max_pdu)), _uid_item(0x52, rq.implementation_uid)]
    if rq.async_ops is not None:
        user.append(_item(0x53, struct.pack(">HH", *rq.async_ops)))
    for role in rq.roles:
        uid = role.sop_class.encode()
        user.append(_item(0x54, struct.pack(">H", len(uid)) + uid + bytes([int(role.scu), int(role.scp)])))
    if rq.implementation_version:
        user.append(_item(0x55, rq.implementation_version.encode()[:16]))
    if rq.user_identity is not None and not ac:
        kind, primary, secondary = rq.user_identity
        user.append(_item(0x58, struct.pack(">BBH", kind, 0, len(primary)) + primary
                          + struct.pack(">H", len(secondary)) + secondary))
    items.append(_item(0x50, b"".join(user)))
    body = struct.pack(">H2x", 1) + _aet(rq.called_aet) + _aet(rq.calling_aet) + b"\x00" * 32 + b"".join(items)
    return struct.pack(">BxI", A_ASSOCIATE_AC if ac else A_ASSOCIATE_RQ, len(body)) + body


def _iter_items(data: bytes, start: int, end: int) -> list[tuple[int, bytes]]:
    out = []
    pos = start
    while pos < end:
        if pos + 4 > end:
            raise PDUError("truncated item header")
        kind, length = struct.unpack_from(">BxH", data, pos)
        if pos + 4 + length > end:
            raise PDUError(f"item 0x{kind:02x} overruns its PDU")
        out.append((kind, data[pos + 4: pos + 4 + length]))
        pos += 4 + length
    return out


def _text(raw: bytes) -> str:
    """An AE title or UID as text: control characters, which neither may hold (PS3.5 6.2), become ``?`` (they
    would otherwise reach the logs, where a newline forges a line)."""
    text = raw.decode("ascii", "replace").strip(" \x00")
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def decode_associate(body: bytes) -> AssociateRQ:
    """Decode the body (after the 6-byte header) of an A-ASSOCIATE-RQ or -AC PDU."""
    if len(body) < 68:
        raise PDUError("A-ASSOCIATE PDU shorter than its fixed fields")
    rq = AssociateRQ(called_aet=_text(body[4:20]), calling_aet=_text(body[20:36]))
    for kind, payload in _iter_items(body, 68, len(body)):
        if kind in (0x20, 0x21):
            if len(payload) < 4:
                raise PDUError("presentation context item too short")
            pc = PresentationContext(id=payload[0], result=payload[2])
            for sub_kind, sub in _iter_items(payload, 4, len(payload)):
                if sub_kind == 0x30:
                    pc.abstract_syntax = _text(sub)
                elif sub_kind == 0x40:
                    pc.transfer_syntaxes.append(_text(sub))
            rq.contexts.append(pc)
        elif kind == 0x50:
            for sub_kind, sub in _iter_items(payload, 0, len(payload)):
                if sub_kind == 0x51 and len(sub) >= 4:
                    rq.max_pdu = struct.unpack(">I", sub[:4])[0]
                elif sub_kind == 0x52:
                    rq.implementation_uid = _text(sub)
                elif sub_kind == 0x53 and len(sub) >= 4:
                    rq.async_ops = struct.unpack(">HH", sub[:4])
                elif sub_kind == 0x54 and len(sub) >= 2:
                    n = struct.unpack(">H", sub[:2])[0]
                    if len(sub) >= 4 + n:
                        rq.roles.append(RoleSelection(_text(sub[2:2 + n]), bool(sub[2 + n]), bool(sub[3 + n])))
                elif sub_kind == 0x55:
                    rq.implementation_version = _text(sub)
                elif sub_kind == 0x58 and len(sub) >= 4:
                    kind_, _, n = struct.unpack(">BBH", sub[:4])
                    primary = sub[4:4 + n]
                    m = struct.unpack(">H", sub[4 + n:6 + n])[0] if len(sub) >= 6 + n else 0
                    rq.user_identity = (kind_, primary, sub[6 + n:6 + n + m])
    return rq


def encode_reject(result: int, source: int, reason: int) -> bytes:
    """A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 permanent / 2 transient."""
    return struct.pack(">BxIxBBB", A_ASSOCIATE_RJ, 4, result, source, reason)


def encode_release(rp: bool) -> bytes:
    """A-RELEASE-RQ or -RP (PS3.8 9.3.6, 9.3.7)."""
    return struct.pack(">BxI4x", A_RELEASE_RP if rp else A_RELEASE_RQ, 4)


def encode_abort(source: int = 2, reason: int = 0) -> bytes:
    """A-ABORT (PS3.8 9.3.8): source 0 service-user, 2 service-provider."""
    return struct.pack(">BxIxxBB", A_ABORT, 4, source, reason)


def pdv_header(context_id: int, command: bool, last: bool, length: int) -> bytes:
    """P-DATA-TF PDU header with one PDV item header (PS3.8 9.3.5, E.2)."""
    mch = (1 if command else 0) | (2 if last else 0)
    return struct.pack(">BxIIBB", P_DATA_TF, length + 6, length + 2, context_id, mch)


def iter_pdvs(body: bytes | bytearray | memoryview) -> list[tuple[int, bool, bool, memoryview]]:
    """The PDV items of a P-DATA-TF body: (context id, is_command, is_last, data).

    A body without a PDV item breaks PS3.8 9.3.5 ("one or more Presentation-data-value Items"): PDUError.
    """
    out = []
    view = memoryview(body)
    pos = 0
    end = len(body)
    if not end:
        raise PDUError("a P-DATA-TF PDU without a PDV item")
    while pos < end:
        if pos + 6 > end:
            raise PDUError("truncated PDV item")
        length = struct.unpack_from(">I", body, pos)[0]
        if length < 2 or pos + 4 + length > end:
            raise PDUError("PDV item length overruns its PDU")
        ctx, mch = body[pos + 4], body[pos + 5]
        out.append((ctx, bool(mch & 1), bool(mch & 2), view[pos + 6: pos + 4 + length]))
        pos += 4 + length
    return out
