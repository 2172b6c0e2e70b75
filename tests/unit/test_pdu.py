"""Upper-layer PDUs (PS3.8 9.3), P-DATA fragmentation and DIMSE command sets (PS3.7 E).

Round trips through Bastion's own codec, cross-checked against pynetdicom's and pydicom's
independent decoders.
"""

from __future__ import annotations

import io
import struct

import pytest
from pydicom.filereader import read_dataset
from pynetdicom.pdu import A_ASSOCIATE_RQ as PynetdicomAssociateRQ

from bastion.dimse.association import AcceptedContext, Association, BytesSink, Message
from bastion.dimse.messages import C_STORE_RQ, decode_command, encode_command, has_dataset
from bastion.dimse.pdu import (
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RQ,
    P_DATA_TF,
    AssociateRQ,
    PDUError,
    PresentationContext,
    RoleSelection,
    decode_associate,
    encode_abort,
    encode_associate,
    encode_reject,
    encode_release,
    iter_pdvs,
    pdv_header,
)

pytestmark = pytest.mark.timeout(10)

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT, IMPLICIT, J2K = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90"


def _rq() -> AssociateRQ:
    return AssociateRQ(
        called_aet="BASTION", calling_aet="MODALITY",
        contexts=[PresentationContext(1, "1.2.840.10008.1.1", [IMPLICIT]),
                  PresentationContext(3, CT, [J2K, EXPLICIT, IMPLICIT])],
        max_pdu=65536, implementation_uid="1.2.3.4.5", implementation_version="TEST_1",
        roles=[RoleSelection(CT, scu=False, scp=True)], async_ops=(2, 3),
        user_identity=(2, b"alice", b"secret"))


def _split(pdu: bytes) -> tuple[int, bytes]:
    kind, length = struct.unpack(">BxI", pdu[:6])
    assert length == len(pdu) - 6
    return kind, pdu[6:]


def test_associate_rq_round_trip() -> None:
    rq = _rq()
    kind, body = _split(encode_associate(rq, ac=False))
    assert kind == A_ASSOCIATE_RQ
    back = decode_associate(body)
    assert back == rq


def test_associate_rq_decodes_with_pynetdicom() -> None:
    pdu = PynetdicomAssociateRQ()
    pdu.decode(encode_associate(_rq(), ac=False))
    assert pdu.called_ae_title == "BASTION" and pdu.calling_ae_title == "MODALITY"
    contexts = pdu.presentation_context
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntax) for c in contexts] == [
        (1, "1.2.840.10008.1.1", [IMPLICIT]), (3, CT, [J2K, EXPLICIT, IMPLICIT])]
    user = pdu.user_information
    assert user.maximum_length == 65536
    assert user.implementation_class_uid == "1.2.3.4.5"
    assert user.implementation_version_name == "TEST_1"


def test_associate_ac_round_trip() -> None:
    ac = AssociateRQ("BASTION", "MODALITY",
                     [PresentationContext(1, "", [IMPLICIT], 0), PresentationContext(3, "", [EXPLICIT], 4)],
                     max_pdu=1048576, implementation_uid="1.2.3", implementation_version="BASTION",
                     roles=[RoleSelection(CT, scu=True, scp=True)])
    kind, body = _split(encode_associate(ac, ac=True))
    assert kind == A_ASSOCIATE_AC
    back = decode_associate(body)
    assert [(c.id, c.result, c.transfer_syntax) for c in back.contexts] == [(1, 0, IMPLICIT), (3, 4, EXPLICIT)]
    assert back.max_pdu == 1048576 and back.roles == ac.roles
    assert back.user_identity is None


def test_aet_is_padded_to_16_bytes_and_truncated() -> None:
    rq = AssociateRQ("A" * 20, "B")
    _, body = _split(encode_associate(rq, ac=False))
    assert body[4:20] == b"A" * 16 and body[20:36] == b"B" + b" " * 15
    assert decode_associate(body).calling_aet == "B"


@pytest.mark.parametrize("body", [b"\x00" * 10, b"\x00\x01" + b"\x00" * 66 + b"\x10\x00\x00\x10abc"])
def test_malformed_associate_is_an_error(body: bytes) -> None:
    with pytest.raises(PDUError):
        decode_associate(body)


def test_reject_release_abort_layouts() -> None:
    assert encode_reject(1, 1, 3) == bytes([0x03, 0, 0, 0, 0, 4, 0, 1, 1, 3])
    assert encode_release(rp=False) == bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])
    assert encode_release(rp=True) == bytes([0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0])
    assert encode_abort(2, 6) == bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6])


# -- P-DATA-TF ---------------------------------------------------------------------------------------
def test_pdv_round_trip_several_items() -> None:
    items = [(1, True, False, b"cmd-part-1"), (1, True, True, b"cmd-2"), (3, False, True, b"")]
    body = b""
    for ctx, is_cmd, last, data in items:
        pdu = pdv_header(ctx, is_cmd, last, len(data)) + data
        kind, one = _split(pdu)
        assert kind == P_DATA_TF
        body += one
    assert [(c, cmd, last, bytes(d)) for c, cmd, last, d in iter_pdvs(body)] == items


def test_pdv_message_control_header_bits() -> None:
    assert pdv_header(5, True, True, 4)[-2:] == bytes([5, 0x03])
    assert pdv_header(5, False, False, 4)[-2:] == bytes([5, 0x00])
    assert pdv_header(5, False, True, 4)[-2:] == bytes([5, 0x02])


@pytest.mark.parametrize("body", [b"\x00\x00\x00\x10\x01\x03abc", b"\x00\x00\x00\x01\x01", b"\x00\x00"])
def test_malformed_pdv_is_an_error(body: bytes) -> None:
    with pytest.raises(PDUError):
        iter_pdvs(body)


def _assoc() -> Association:
    assoc = Association(None, None)  # type: ignore[arg-type]  # feed_pdata does no I/O
    assoc.contexts = {1: AcceptedContext(1, CT, EXPLICIT), 3: AcceptedContext(3, CT, IMPLICIT)}
    return assoc


def _pdv(ctx: int, is_cmd: bool, last: bool, data: bytes) -> bytes:
    return _split(pdv_header(ctx, is_cmd, last, len(data)) + data)[1]


def test_fragmented_message_is_reassembled() -> None:
    cmd = encode_command({"CommandField": C_STORE_RQ, "MessageID": 9, "AffectedSOPClassUID": CT,
                          "AffectedSOPInstanceUID": "1.2.3", "Priority": 0, "CommandDataSetType": 0})
    dataset = bytes(range(256)) * 10
    sinks: list[BytesSink] = []

    def open_sink(msg: Message) -> BytesSink:
        sinks.append(BytesSink())
        return sinks[-1]

    assoc = _assoc()
    done: list[Message] = []
    done += assoc.feed_pdata(_pdv(1, True, False, cmd[:10]), open_sink)
    done += assoc.feed_pdata(_pdv(1, True, True, cmd[10:]) + _pdv(1, False, False, dataset[:1000]), open_sink)
    assert done == [] and assoc.pending_message() is not None
    done += assoc.feed_pdata(_pdv(1, False, False, dataset[1000:2000]), open_sink)
    done += assoc.feed_pdata(_pdv(1, False, True, dataset[2000:]), open_sink)
    assert len(done) == 1
    assert done[0].command["MessageID"] == 9 and done[0].context.id == 1
    assert bytes(sinks[0].buffer) == dataset
    assert assoc.pending_message() is None


def test_dataset_on_another_context_or_unknown_context_is_an_error() -> None:
    cmd = encode_command({"CommandField": C_STORE_RQ, "MessageID": 1, "CommandDataSetType": 0})
    assoc = _assoc()
    assoc.feed_pdata(_pdv(1, True, True, cmd), lambda m: BytesSink())
    with pytest.raises(PDUError):
        assoc.feed_pdata(_pdv(3, False, True, b"xx"), lambda m: BytesSink())
    with pytest.raises(PDUError):
        _assoc().feed_pdata(_pdv(7, True, True, cmd), lambda m: BytesSink())
    with pytest.raises(PDUError):
        _assoc().feed_pdata(_pdv(1, False, True, b"xx"), lambda m: BytesSink())


# -- command sets --------------------------------------------------------------------------------------
def test_command_round_trip() -> None:
    command = {"CommandField": 0x0021, "MessageID": 7, "AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.2.2.2",
               "Priority": 0, "MoveDestination": "DEST", "CommandDataSetType": 0x0000,
               "NumberOfRemainingSuboperations": 3, "ErrorComment": "näive", "OffendingElement": [0x00100010]}
    raw = encode_command(command)
    back = decode_command(raw)
    assert back.pop("CommandGroupLength") == len(raw) - 12
    assert back == command


def test_command_decodes_with_pydicom() -> None:
    raw = encode_command({"CommandField": 0x8001, "MessageIDBeingRespondedTo": 5, "Status": 0xA900,
                          "AffectedSOPInstanceUID": "1.2.3", "CommandDataSetType": 0x0101})
    ds = read_dataset(io.BytesIO(raw), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert ds.CommandField == 0x8001 and ds.MessageIDBeingRespondedTo == 5 and ds.Status == 0xA900
    assert ds.AffectedSOPInstanceUID == "1.2.3"
    assert len(ds[0x00001000].value) % 2 == 0 or len(raw) % 2 == 0  # UIDs padded to even length
    assert len(raw) % 2 == 0


def test_has_dataset() -> None:
    assert has_dataset({"CommandDataSetType": 0x0000})
    assert has_dataset({"CommandDataSetType": 0xFEFE})
    assert not has_dataset({"CommandDataSetType": 0x0101})
    assert not has_dataset({})


@pytest.mark.parametrize("raw", [
    encode_command({"MessageID": 1}),  # no Command Field
    encode_command({"CommandField": 1}) + struct.pack("<HHI", 0, 0x0110, 100) + b"\x01\x00",  # overruns
    encode_command({"CommandField": 1}) + struct.pack("<HHI", 8, 0x0018, 2) + b"ab",  # not group 0000
])
def test_malformed_command_is_an_error(raw: bytes) -> None:
    with pytest.raises(PDUError):
        decode_command(raw)
