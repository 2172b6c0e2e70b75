"""Fuzzing the DICOM upper layer of a running ``bastion serve`` over real sockets (PS3.8 9).

Each example is one connection: hypothesis builds what a hostile or broken peer sends (A-ASSOCIATE-RQ variants
with wrong, truncated or huge item lengths; an accepted association followed by P-DATA-TF fragments with bad PDV
lengths, unknown presentation contexts, mangled command sets; PDUs of unknown types; lengths of up to 4 GB
claimed for a few bytes), sends it, half-closes, and reads the answer until the server closes.

Properties, for every example:

* the answer is a sequence of whole PDUs of the types an acceptor sends (A-ASSOCIATE-AC/RJ, P-DATA-TF,
  A-RELEASE-RP, A-ABORT), and the server closes the connection within a generous deadline;
* an association is accepted only for an A-ASSOCIATE-RQ; a complete first PDU of any other type is answered
  with A-ABORT (PS3.8 9.2, state Sta2, AA-1), a request claiming more than the acceptor reads with
  A-ASSOCIATE-RJ, and a complete P-DATA-TF that breaks PS3.8 9.3.5 after the association with A-ABORT;

and after the run: nothing stored changed (each object file's SHA-256, the index's counts), the server still
answers C-ECHO (DCMTK ``echoscu``) and ``/health``, and its log holds no traceback (an unexpected exception,
even one the server caught).

Raw bytes built here, independent of Bastion's own PDU code (:mod:`bastion.dimse.pdu`).
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from conftest import BastionServer, make_study, requires_dcmtk
from fuzzing import first_traceback, fuzz_settings, snapshot
from hypothesis import given
from hypothesis import strategies as st

pytestmark = [requires_dcmtk, pytest.mark.timeout(900)]

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = range(1, 8)
ANSWERS = {A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RP, A_ABORT}
VERIFICATION = "1.2.840.10008.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT, EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
#: How long a connection may stay open after the fuzzer half-closes it (the server sees the end at once).
CLOSE_DEADLINE = 30.0


def _pdu(kind: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BxI", kind, len(body) if length is None else length) + body


def _item(kind: int, payload: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BxH", kind, (len(payload) if length is None else length) & 0xFFFF) + payload


def _element(tag: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element of a command set (PS3.7 E.1), padded to even length."""
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def c_echo_rq(message_id: int = 1) -> bytes:
    """A C-ECHO-RQ command set (PS3.7 9.3.5.1)."""
    body = (_element(0x00000002, VERIFICATION.encode()) + _element(0x00000100, struct.pack("<H", 0x0030))
            + _element(0x00000110, struct.pack("<H", message_id)) + _element(0x00000800, struct.pack("<H", 0x0101)))
    return _element(0x00000000, struct.pack("<I", len(body))) + body


def c_store_rq(sop_uid: str = "1.2.3.4") -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1) announcing a dataset."""
    body = (_element(0x00000002, CT_STORAGE.encode()) + _element(0x00000100, struct.pack("<H", 0x0001))
            + _element(0x00000110, struct.pack("<H", 7)) + _element(0x00000700, struct.pack("<H", 0))
            + _element(0x00000800, struct.pack("<H", 0x0000)) + _element(0x00001000, sop_uid.encode()))
    return _element(0x00000000, struct.pack("<I", len(body))) + body


# -- strategies ------------------------------------------------------------------------------------------------
uids = st.one_of(st.sampled_from([VERIFICATION, CT_STORAGE, IMPLICIT, EXPLICIT, "1.2.840.10008.3.1.1.1", ""]),
                 st.text(alphabet="0123456789.", max_size=70), st.binary(max_size=80).map(lambda b: b.decode("latin-1")))


@st.composite
def presentation_context(draw: st.DrawFn) -> bytes:
    """A presentation context item (PS3.8 9.3.2.2): odd or even or zero id, any number of syntaxes."""
    pcid = draw(st.sampled_from([1, 3, 0, 2, 255]))
    subs = [_item(0x30, draw(uids).encode("latin-1"))] if draw(st.booleans()) or True else []
    subs += [_item(0x40, draw(uids).encode("latin-1")) for _ in range(draw(st.integers(0, 3)))]
    if draw(st.integers(0, 4)) == 0:
        subs.insert(draw(st.integers(0, len(subs))), _item(draw(st.integers(0, 255)), draw(st.binary(max_size=20))))
    payload = bytes([pcid, 0, 0, 0]) + b"".join(subs)
    return _item(0x20, payload, draw(st.sampled_from([None, None, None, 0, 3, len(payload) + 1, 0xFFFF])))


@st.composite
def user_information(draw: st.DrawFn) -> bytes:
    """A user information item (PS3.8 9.3.2.3, PS3.7 D.3.3): maximum length, UIDs, role selection, asynchronous
    operations, user identity, and unknown sub-items, each possibly with a wrong length."""
    subs = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from([0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x00, 0xFF]))
        if kind == 0x51:
            payload = struct.pack(">I", draw(st.sampled_from([0, 1, 16384, 0x7FFFFFFF, 0xFFFFFFFF])))
        elif kind == 0x54:
            uid = draw(uids).encode("latin-1")
            n = draw(st.sampled_from([len(uid), len(uid) + 5, 0, 0xFFFF]))
            payload = struct.pack(">H", n) + uid + bytes(draw(st.lists(st.integers(0, 255), max_size=2)))
        elif kind == 0x58:
            primary, secondary = draw(st.binary(max_size=40)), draw(st.binary(max_size=40))
            payload = (struct.pack(">BBH", draw(st.integers(0, 6)), draw(st.integers(0, 1)),
                                   draw(st.sampled_from([len(primary), 0xFFFF, 0])))
                       + primary + struct.pack(">H", draw(st.sampled_from([len(secondary), 0xFFFF]))) + secondary)
        else:
            payload = draw(st.binary(max_size=24))
        payload = payload[: draw(st.integers(0, len(payload)))] if draw(st.integers(0, 5)) == 0 else payload
        subs.append(_item(kind, payload, draw(st.sampled_from([None, None, None, 0, len(payload) + 2]))))
    body = b"".join(subs)
    return _item(0x50, body, draw(st.sampled_from([None, None, None, len(body) + 4, 2])))


@st.composite
def associate_rq(draw: st.DrawFn, contexts: list[bytes] | None = None) -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2), well-formed or not."""
    called = draw(st.one_of(st.just(b"BASTION"), st.binary(max_size=16))).ljust(16)[:16]
    calling = draw(st.one_of(st.just(b"FUZZER"), st.binary(max_size=16))).ljust(16)[:16]
    items = []
    if draw(st.integers(0, 5)):
        items.append(_item(0x10, draw(st.sampled_from([b"1.2.840.10008.3.1.1.1", b"1.2.3", b""]))))
    items += contexts if contexts is not None else draw(st.lists(presentation_context(), max_size=4))
    if draw(st.integers(0, 5)):
        items.append(draw(user_information()))
    if draw(st.integers(0, 6)) == 0:
        items.insert(draw(st.integers(0, len(items))), _item(draw(st.integers(0, 255)), draw(st.binary(max_size=30))))
    version = draw(st.sampled_from([1, 1, 1, 0, 2, 0xFFFF]))
    body = struct.pack(">H2x", version) + called + calling + bytes(32) + b"".join(items)
    return _pdu(A_ASSOCIATE_RQ, body)


def good_associate_rq() -> bytes:
    """A valid A-ASSOCIATE-RQ proposing Verification (id 1) and CT Image Storage (id 3)."""
    contexts = [_item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, VERIFICATION.encode()) + _item(0x40, IMPLICIT.encode())),
                _item(0x20, bytes([3, 0, 0, 0]) + _item(0x30, CT_STORAGE.encode()) + _item(0x40, EXPLICIT.encode()))]
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1"))
    body = (struct.pack(">H2x", 1) + b"BASTION".ljust(16) + b"FUZZER".ljust(16) + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + b"".join(contexts) + user)
    return _pdu(A_ASSOCIATE_RQ, body)


@st.composite
def command_sets(draw: st.DrawFn) -> bytes:
    """A C-ECHO-RQ or C-STORE-RQ command set with bytes overwritten (tags, lengths, values)."""
    data = bytearray(draw(st.sampled_from([c_echo_rq(), c_store_rq(), c_echo_rq(0xFFFF)])))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        data[at:at + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x01\x00",
                                                 bytes([draw(st.integers(0, 255))])]))
    return bytes(data)


@st.composite
def pdv(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A PDV item (PS3.8 9.3.5.1) and whether it keeps PS3.8's framing (its length covers exactly its bytes)."""
    data = draw(st.one_of(st.just(c_echo_rq()), st.just(c_store_rq()), st.binary(max_size=200),
                          st.just(c_echo_rq()).map(lambda b: b[: len(b) // 2]), command_sets()))
    context = draw(st.sampled_from([1, 1, 3, 5, 0, 255]))
    control = draw(st.sampled_from([0x03, 0x01, 0x00, 0x02, 0xFF]))
    length = draw(st.sampled_from([None, None, None, 0, 1, len(data) + 100, 0xFFFFFFFF]))
    framed = length is None
    return struct.pack(">IBB", len(data) + 2 if framed else length, context, control) + data, framed


@dataclass
class Script:
    """What one fuzzing connection sends, and the answer it must get (see the module)."""

    data: bytes
    #: Sent once the server has answered ``data`` with an A-ASSOCIATE-AC (a requestor sends nothing else before
    #: it, PS3.8 9.2 Sta5); not sent if the answer is anything else.
    then: bytes = b""
    #: The answer must include one of these PDU types before the close (empty: any answer, or none).
    expect: set[int] = field(default_factory=set)
    #: An A-ASSOCIATE-AC may appear in the answer.
    may_accept: bool = True


@st.composite
def scripts(draw: st.DrawFn) -> Script:
    """A connection's bytes: a mangled A-ASSOCIATE-RQ, another PDU first, a huge claimed length, or a good
    association followed by P-DATA-TF fragments, releases, aborts and garbage."""
    kind = draw(st.sampled_from(["associate", "associate", "mutated", "other-first", "huge", "pdata", "pdata"]))
    if kind == "associate":
        return Script(draw(associate_rq()))
    if kind == "mutated":
        data = bytearray(good_associate_rq())
        for _ in range(draw(st.integers(1, 6))):
            at = draw(st.integers(0, len(data) - 1))
            if draw(st.booleans()):
                data[at] = draw(st.integers(0, 255))
            else:
                data[at:at + 2] = draw(st.sampled_from([b"\x00\x00", b"\xff\xff", b"\x7f\xff", b"\x00\x01"]))
        if draw(st.integers(0, 3)) == 0:
            del data[draw(st.integers(0, len(data))):]
        return Script(bytes(data), may_accept=bool(data) and data[0] == A_ASSOCIATE_RQ)
    if kind == "other-first":
        pdu_type = draw(st.sampled_from([A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, 0, 8,
                                         0xFF]))
        body = draw(st.binary(max_size=64))
        return Script(_pdu(pdu_type, body), expect={A_ABORT}, may_accept=False)
    if kind == "huge":
        pdu_type = draw(st.sampled_from([A_ASSOCIATE_RQ, P_DATA_TF, 0x09]))
        length = draw(st.sampled_from([2**20, 2**24, 2**31, 2**32 - 1]))
        huge_pdu = _pdu(pdu_type, draw(st.binary(max_size=64)), length)
        return Script(huge_pdu, expect={A_ASSOCIATE_RJ if pdu_type == A_ASSOCIATE_RQ else A_ABORT}, may_accept=False)
    out = bytearray()
    expect: set[int] = set()
    for _ in range(draw(st.integers(1, 4))):
        step = draw(st.sampled_from(["pdata", "pdata", "pdata", "release", "abort", "garbage", "cut"]))
        if step == "pdata":
            pdvs = draw(st.lists(pdv(), min_size=0, max_size=3))
            body = b"".join(p for p, _ in pdvs)
            claimed = draw(st.sampled_from([None, None, None, len(body) + 1, max(len(body) - 1, 0)]))
            out += _pdu(P_DATA_TF, body, claimed)
            if (not pdvs or not all(ok for _, ok in pdvs)) and claimed is None and not expect:
                expect = {A_ABORT}  # a complete P-DATA-TF breaking PS3.8 9.3.5
            if claimed is not None:
                break  # the PDU boundaries are lost from here on
        elif step == "release":
            out += _pdu(A_RELEASE_RQ, bytes(4))
        elif step == "abort":
            out += _pdu(A_ABORT, bytes(4))
            break
        elif step == "garbage":
            out += draw(st.binary(min_size=1, max_size=64))
            break
        else:
            out += draw(st.binary(max_size=5))
            break
    return Script(good_associate_rq(), bytes(out), expect=expect if expect and _before_any_end(out) else set())


def _before_any_end(data: bytes | bytearray) -> bool:
    """Whether the first broken P-DATA-TF comes before any A-RELEASE-RQ or A-ABORT (which end the association
    first): the bytes are walked PDU by PDU."""
    pos = 0
    while pos + 6 <= len(data):
        kind, length = struct.unpack_from(">BxI", data, pos)
        if kind in (A_RELEASE_RQ, A_ABORT):
            return False
        if kind == P_DATA_TF:
            return True
        pos += 6 + length
    return True


# -- the harness -----------------------------------------------------------------------------------------------
def parse_answer(data: bytes) -> list[int]:
    """The PDU types of the server's answer; AssertionError unless it is whole PDUs of an acceptor's types."""
    kinds, pos = [], 0
    while pos < len(data):
        assert pos + 6 <= len(data), f"a truncated PDU header in the answer: {data[pos:pos + 16]!r}"
        kind, length = struct.unpack_from(">BxI", data, pos)
        assert kind in ANSWERS, f"the server sent PDU type 0x{kind:02x}"
        assert pos + 6 + length <= len(data), f"a truncated PDU 0x{kind:02x} in the answer"
        kinds.append(kind)
        pos += 6 + length
    return kinds


def _first_pdu(got: bytes) -> int | None:
    """The type of the first PDU in ``got`` once it is whole, else None."""
    if len(got) < 6:
        return None
    kind, length = struct.unpack_from(">BxI", got)
    return kind if len(got) >= 6 + length else None


def _pdu_types(got: bytes) -> list[int]:
    """The types of the whole PDUs at the start of ``got``."""
    kinds, pos = [], 0
    while pos + 6 <= len(got):
        kind, length = struct.unpack_from(">BxI", got, pos)
        if pos + 6 + length > len(got):
            break
        kinds.append(kind)
        pos += 6 + length
    return kinds


def exchange(host: str, port: int, data: bytes, then: bytes = b"", until: int | None = None) -> bytes:
    """Connect, send ``data`` (and ``then`` once an A-ASSOCIATE-AC has come), half-close, and read everything
    until the server closes the connection. With ``until`` (a PDU type), the connection is not half-closed: reading
    ends at the first PDU of that type (a peer's end of the connection is an A-P-ABORT to its acceptor, PS3.8 9.2
    Evt17, and drops the answers still to come)."""
    sock = socket.create_connection((host, port), timeout=CLOSE_DEADLINE)
    got = b""
    pending = then
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.sendall(data)
            if not pending and until is None:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pending = b""  # the server refused what came first and closed: its answer is still to be read
        deadline = time.monotonic() + CLOSE_DEADLINE
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"the server kept the connection open {CLOSE_DEADLINE} s after the end of {data[:64]!r}"
            if pending and _first_pdu(got) is not None:
                try:
                    if _first_pdu(got) == A_ASSOCIATE_AC:
                        sock.sendall(pending)
                    if until is None:
                        sock.shutdown(socket.SHUT_WR)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                pending = b""
            if not select.select([sock], [], [], min(left, 1.0))[0]:
                continue
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return got
            if not chunk:
                return got
            got += chunk
            if until is not None and until in _pdu_types(got):
                return got
    finally:
        sock.close()


def check_script(host: str, port: int, script: Script) -> None:
    """One connection of the fuzzing and the properties of its answer (see the module)."""
    kinds = parse_answer(exchange(host, port, script.data, script.then))
    if not script.may_accept:
        assert A_ASSOCIATE_AC not in kinds, (script.data[:64], kinds)
    if script.expect:
        assert script.expect & set(kinds), (script.data[:96], kinds, script.expect)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BastionServer]:
    """A server holding one study, with short ARTIM and idle timeouts (the fuzzer half-closes at once anyway)."""
    work = tmp_path_factory.mktemp("fuzz-dimse")
    srv = BastionServer(work / "data", settings={"BASTION_DICOM_ARTIM_TIMEOUT": "10",
                                                 "BASTION_DICOM_IDLE_TIMEOUT": "10"}).start()
    study = make_study(work / "study", series=1, per_series=2)
    assert srv.storescu(*study.files).returncode == 0
    yield srv
    srv.stop()


def test_fuzzed_pdus_never_break_the_server(server: BastionServer) -> None:
    before = snapshot(server)
    assert before.counts["instances"] == 2

    @given(script=scripts())
    @fuzz_settings()
    def check(script: Script) -> None:
        check_script(server.host, server.dicom_port, script)

    check()
    after = snapshot(server)
    assert not before.unchanged_in(after) and after.counts == before.counts, (before, after)
    assert server.echo().returncode == 0
    assert server.get_json("/health")["status"] == "ok"
    assert not first_traceback(server.log()), first_traceback(server.log())


@pytest.mark.parametrize("script", [
    Script(_pdu(P_DATA_TF, b"\x00" * 10), expect={A_ABORT}, may_accept=False),
    Script(_pdu(0x09, b""), expect={A_ABORT}, may_accept=False),
    Script(_pdu(A_ASSOCIATE_RQ, b"\x00" * 10, 2**32 - 1), expect={A_ASSOCIATE_RJ}, may_accept=False),
    Script(good_associate_rq(), _pdu(P_DATA_TF, struct.pack(">IBB", 0xFFFFFFFF, 1, 3)), expect={A_ABORT}),
    Script(good_associate_rq(), _pdu(P_DATA_TF, struct.pack(">IBB", len(c_echo_rq()) + 2, 5, 3) + c_echo_rq()),
           expect={A_ABORT}),
    Script(good_associate_rq(), _pdu(P_DATA_TF, b""), expect={A_ABORT}),
    Script(good_associate_rq(), _pdu(P_DATA_TF, struct.pack(">IBB", len(c_echo_rq()) + 2, 1, 3) + c_echo_rq())
           + _pdu(A_RELEASE_RQ, bytes(4)), expect={A_ASSOCIATE_AC, P_DATA_TF, A_RELEASE_RP}),
    Script(good_associate_rq() + _pdu(A_RELEASE_RQ, bytes(4)), expect={A_ABORT}),
], ids=["p-data-first", "unknown-type-first", "4gb-associate-rq", "pdv-overrun", "unknown-context", "empty-p-data",
        "echo", "pipelined-before-ac"])
def test_known_hostile_connections_get_their_answer(server: BastionServer, script: Script) -> None:
    """The oracle of the fuzzing, on inputs whose answer is known: without these passing, a fuzzing that finds
    nothing proves nothing."""
    kinds = parse_answer(exchange(server.host, server.dicom_port, script.data, script.then))
    assert script.expect <= set(kinds) if len(script.expect) > 1 else script.expect & set(kinds), kinds
    if not script.may_accept:
        assert A_ASSOCIATE_AC not in kinds
