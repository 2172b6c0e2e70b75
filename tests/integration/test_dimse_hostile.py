"""Hostile DICOM clients meet the listener's bounds: memory before negotiation, ARTIM as a deadline, the idle
timeout (and what is not idle), and the association limits (PS3.8 9.1.5, 9.3.4).

Raw-socket clients written here, independent of Bastion's own PDU code; pynetdicom where a well-behaved peer
is needed. Every wait is on a condition with a generous deadline.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BastionServer, make_ct_series, make_study, requires_dcmtk
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association as PynetdicomAssociation
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

pytestmark = [requires_dcmtk, pytest.mark.timeout(180)]

SIXTY_MB = 60 * 1024 * 1024
A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT = 0x02, 0x03, 0x07


def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BxI", kind, len(body)) + body


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(payload)) + payload


def _associate_rq(calling: str = "HOSTILE", called: str = "BASTION") -> bytes:
    """A valid A-ASSOCIATE-RQ (PS3.8 9.3.2) proposing Verification in Implicit VR Little Endian."""
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, b"1.2.840.10008.1.1") + _item(0x40, b"1.2.840.10008.1.2"))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1"))
    body = (struct.pack(">H2x", 1) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
    return _pdu(0x01, body)


def _connect(server: BastionServer, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((source, 0))
    sock.connect((server.host, server.dicom_port))
    return sock


def _until_closed(sock: socket.socket, timeout: float = 30.0) -> bytes | None:
    """Everything the server sends until it closes the connection; None if it is still open after ``timeout``."""
    got = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([sock], [], [], 0.2)[0]:
            continue
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk
    return None


def _group_rss_kb(pgid: int) -> int:
    """The resident memory of every process in process group ``pgid`` (the server and its workers), in KiB."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            with open(f"/proc/{entry}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile, or a kernel thread
    return total


def _wait(condition: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def _rj(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BxIxBBB", A_ASSOCIATE_RJ, 4, result, source, reason)


# -- memory before negotiation ---------------------------------------------------------------------------
def test_claimed_pdu_lengths_cost_no_memory_before_the_association(bastion_factory: Any) -> None:
    """Eight connections claim 60 MB PDUs (A-ASSOCIATE-RQ and P-DATA-TF) and send a few bytes: the server's
    processes grow by at most 40 MB all along, each connection is answered (A-ASSOCIATE-RJ for the request,
    A-ABORT for the P-DATA) and closed, and the server keeps serving."""
    server: BastionServer = bastion_factory()
    assert server.proc is not None
    pgid = server.proc.pid
    assert server.echo().returncode == 0  # the baseline includes having served an association
    before = _group_rss_kb(pgid)

    kinds = [0x01, 0x04] * 4
    socks = [_connect(server) for _ in kinds]
    for sock, kind in zip(socks, kinds, strict=True):
        sock.sendall(struct.pack(">BxI", kind, SIXTY_MB) + b"\x00\x01" * 8)

    answers: dict[int, bytes | None] = {}
    threads = [threading.Thread(target=lambda i=i, s=s: answers.__setitem__(i, _until_closed(s)))
               for i, s in enumerate(socks)]
    for t in threads:
        t.start()
    peak = before
    while any(t.is_alive() for t in threads):  # each ends within its own 30 s deadline
        peak = max(peak, _group_rss_kb(pgid))
        time.sleep(0.02)
    peak = max(peak, _group_rss_kb(pgid))
    for sock in socks:
        sock.close()

    assert (peak - before) <= 40 * 1024, f"the server grew by {(peak - before) / 1024:.0f} MB"
    for i, kind in enumerate(kinds):
        assert answers[i] is not None, f"connection {i} (PDU 0x{kind:02x}) still open"
        if kind == 0x01:  # rejected-permanent, service-provider (presentation), local-limit-exceeded
            assert answers[i] == _rj(1, 3, 2), answers[i]
        else:  # A-ABORT from the service provider
            assert answers[i] == struct.pack(">BxIxxBB", A_ABORT, 4, 2, 0), answers[i]
    assert server.echo().returncode == 0
    log = server.log()
    assert sum(f"of {SIXTY_MB} bytes refused" in line and "WARNING" in line for line in log.splitlines()) == 8, log
    assert "Traceback" not in log


# -- ARTIM -------------------------------------------------------------------------------------------------
def test_a_trickled_associate_request_is_dropped_at_the_artim_deadline(bastion_factory: Any) -> None:
    """One byte a second of a valid A-ASSOCIATE-RQ never completes it within ARTIM (3 s): the server closes the
    connection (PS3.8 9.1.5) long before the last byte would come, without a restart of the timer per byte."""
    server: BastionServer = bastion_factory(settings={"BASTION_DICOM_ARTIM_TIMEOUT": "3"})
    rq = _associate_rq()
    assert len(rq) > 60  # the whole request would take longer than the test's deadline
    sock = _connect(server)
    closed_after: int | None = None
    deadline = time.monotonic() + 60
    try:
        for sent in range(1, len(rq) + 1):
            try:
                sock.sendall(rq[sent - 1: sent])
            except (BrokenPipeError, ConnectionResetError):
                closed_after = sent
                break
            if select.select([sock], [], [], 1.0)[0]:
                try:
                    data = sock.recv(100)
                except ConnectionResetError:
                    data = b""
                assert data == b"", f"expected the connection closed, got {data!r}"
                closed_after = sent
                break
            if time.monotonic() > deadline:
                break
    finally:
        sock.close()
    assert closed_after is not None and closed_after < len(rq), "the trickling connection was kept"
    assert "ARTIM" in server.log()
    assert server.echo().returncode == 0


# -- idle ------------------------------------------------------------------------------------------------
def test_an_idle_association_is_aborted(bastion_factory: Any) -> None:
    server: BastionServer = bastion_factory(settings={"BASTION_DICOM_IDLE_TIMEOUT": "2"})
    ae = AE(ae_title="IDLER")
    ae.add_requested_context(Verification)
    assoc = ae.associate(server.host, server.dicom_port, ae_title=server.aet)
    try:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assert _wait(lambda: assoc.is_aborted, timeout=60), "the idle association was kept"
        assert _wait(lambda: server.stats()["associations"] == 0)
        lines = [line for line in server.log().splitlines() if "aborting association from IDLER" in line]
        assert len(lines) == 1 and "WARNING" in lines[0], lines
    finally:
        if assoc.is_alive():
            assoc.abort()
        ae.shutdown()


class SlowStoreSCP:
    """A pynetdicom Storage SCP that takes ``delay`` s to answer each C-STORE (a slow destination)."""

    def __init__(self, aet: str, delay: float) -> None:
        self.delay = delay
        self.received: list[str] = []
        self.ae = AE(ae_title=aet)
        self.ae.supported_contexts = StoragePresentationContexts
        self.server: Any = None
        self.port = 0

    def _on_store(self, event: Any) -> int:
        time.sleep(self.delay)
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    @classmethod
    def running(cls, aet: str, delay: float) -> Iterator[SlowStoreSCP]:
        scp = cls(aet, delay)
        scp.server = scp.ae.start_server(("127.0.0.1", 0), block=False,
                                         evt_handlers=[(evt.EVT_C_STORE, scp._on_store)])
        scp.port = scp.server.server_address[1]
        try:
            yield scp
        finally:
            scp.server.shutdown()
            scp.ae.shutdown()


@pytest.fixture
def slow_scp() -> Iterator[SlowStoreSCP]:
    yield from SlowStoreSCP.running("SLOW", delay=0.5)


def test_a_c_move_longer_than_the_idle_timeout_is_not_aborted(bastion_factory: Any, slow_scp: SlowStoreSCP,
                                                               tmp_path: Path) -> None:
    """A C-MOVE to a destination that takes 0.5 s per instance runs 3 s on an association that receives nothing
    meanwhile, with an idle timeout of 1 s: it completes, and only once it is done does the association count
    as idle (and is then aborted, which shows the timeout was in force)."""
    server: BastionServer = bastion_factory(remotes=[f"SLOW@127.0.0.1:{slow_scp.port}"],
                                            settings={"BASTION_DICOM_IDLE_TIMEOUT": "1"})
    study = make_study(tmp_path / "study", series=1, per_series=6)
    assert server.storescu(*study.files).returncode == 0

    ae = AE(ae_title="MOVER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc: PynetdicomAssociation = ae.associate(server.host, server.dicom_port, ae_title=server.aet)
    try:
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study.study_uid
        statuses = [int(status.Status) for status, _ in
                    assoc.send_c_move(query, "SLOW", StudyRootQueryRetrieveInformationModelMove) if status]
        assert not assoc.is_aborted, "aborted during the C-MOVE"
        assert statuses and statuses[-1] == 0x0000, [hex(s) for s in statuses]
        assert sorted(slow_scp.received) == sorted(study.sop_uids)
        assert _wait(lambda: assoc.is_aborted, timeout=60), "idle after the C-MOVE, yet kept"
    finally:
        if assoc.is_alive():
            assoc.abort()
        ae.shutdown()


# -- association limits ------------------------------------------------------------------------------------
def _rq_answer(server: BastionServer, source: str) -> tuple[socket.socket, bytes]:
    """Send an A-ASSOCIATE-RQ from ``source``; the connection and the first 10 bytes of the answer."""
    sock = _connect(server, source)
    sock.settimeout(30)
    sock.sendall(_associate_rq())
    got = b""
    while len(got) < 10:
        chunk = sock.recv(10 - len(got))
        if not chunk:
            break
        got += chunk
    return sock, got


def _release(sock: socket.socket) -> None:
    """A-RELEASE-RQ, wait for the A-RELEASE-RP and the close."""
    sock.sendall(struct.pack(">BxI4x", 0x05, 4))
    assert _until_closed(sock) is not None
    sock.close()


def _admitted_again(server: BastionServer, source: str) -> bool:
    def attempt() -> bool:
        sock, answer = _rq_answer(server, source)
        if answer[:1] == bytes([A_ASSOCIATE_AC]):
            _release(sock)
            return True
        sock.close()
        return False
    return _wait(attempt, timeout=30, interval=0.2)


def test_associations_beyond_the_per_peer_limit_are_rejected_transient(bastion_factory: Any) -> None:
    """With two associations per peer address allowed (over both worker processes), a third from 127.0.0.1 is
    rejected transient, service-provider (presentation), local-limit-exceeded; one from 127.0.0.2 is another
    peer's; once one is released, 127.0.0.1 is admitted again."""
    server: BastionServer = bastion_factory(settings={"BASTION_MAX_ASSOCIATIONS_PER_PEER": "2"})
    held = [_rq_answer(server, "127.0.0.1") for _ in range(2)]
    try:
        assert [answer[:1] for _, answer in held] == [bytes([A_ASSOCIATE_AC])] * 2
        assert _wait(lambda: server.stats()["associations"] == 2)
        assert server.stats()["associations_per_worker"] == [1, 1]  # the limit holds across the workers

        sock, answer = _rq_answer(server, "127.0.0.1")
        assert answer == _rj(2, 3, 2)
        assert _until_closed(sock) == b""
        sock.close()

        other, answer = _rq_answer(server, "127.0.0.2")
        assert answer[:1] == bytes([A_ASSOCIATE_AC])
        _release(other)

        _release(held.pop()[0])
        assert _admitted_again(server, "127.0.0.1")
    finally:
        for sock, _ in held:
            sock.close()
    lines = [line for line in server.log().splitlines() if "max_associations_per_peer" in line]
    assert len(lines) == 1 and "WARNING" in lines[0] and "127.0.0.1" in lines[0], lines


def test_associations_beyond_the_total_limit_are_rejected_transient(bastion_factory: Any) -> None:
    server: BastionServer = bastion_factory(settings={"BASTION_MAX_ASSOCIATIONS": "2"})
    held = [_rq_answer(server, source) for source in ("127.0.0.1", "127.0.0.2")]
    try:
        assert [answer[:1] for _, answer in held] == [bytes([A_ASSOCIATE_AC])] * 2
        sock, answer = _rq_answer(server, "127.0.0.3")
        assert answer == _rj(2, 3, 2)
        sock.close()
        _release(held.pop()[0])
        assert _admitted_again(server, "127.0.0.3")
    finally:
        for sock, _ in held:
            sock.close()
    lines = [line for line in server.log().splitlines() if "(max_associations = 2)" in line]
    assert len(lines) == 1 and "WARNING" in lines[0] and "127.0.0.3" in lines[0], lines


def test_a_c_get_whose_peer_never_answers_its_c_store_is_not_held_forever(bastion_factory: Any,
                                                                          tmp_path: Path) -> None:
    """A C-GET whose peer receives the first C-STORE sub-operation and never answers it (nor sends anything
    else): the sub-operations end once the peer has been silent for the idle timeout (2 s), and the silent
    association is aborted, freeing its place; it is not kept alive by its own running request."""
    server: BastionServer = bastion_factory(settings={"BASTION_DICOM_IDLE_TIMEOUT": "2"})
    study = make_study(tmp_path / "study", series=1, per_series=3)
    assert server.storescu(*study.files).returncode == 0

    release = threading.Event()
    received: list[str] = []

    def on_store(event: Any) -> int:  # never answers until the test ends
        received.append(str(event.request.AffectedSOPInstanceUID))
        release.wait(120)
        return 0x0000

    ae = AE(ae_title="GETTER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(server.host, server.dicom_port, ae_title=server.aet,
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study.study_uid
    getter = threading.Thread(target=lambda: list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)),
                              daemon=True)
    try:
        assert assoc.is_established
        getter.start()
        assert _wait(lambda: bool(received), timeout=30)
        assert _wait(lambda: server.stats()["associations"] == 0, timeout=60), \
            "the association whose peer never answered its C-STORE was kept"
        assert len(received) == 1
    finally:
        release.set()
        if assoc.is_alive():
            assoc.abort()
        getter.join(30)
        ae.shutdown()


# -- what an aborted association leaves --------------------------------------------------------------------
def _element(tag: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element of a command set (PS3.7 E.1), its value padded to even length."""
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _c_store_rq(sop_class: str, sop_uid: str, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1) announcing a dataset."""
    body = (_element(0x00000002, sop_class.encode()) + _element(0x00000100, struct.pack("<H", 0x0001))
            + _element(0x00000110, struct.pack("<H", message_id)) + _element(0x00000700, struct.pack("<H", 0))
            + _element(0x00000800, struct.pack("<H", 0x0000)) + _element(0x00001000, sop_uid.encode()))
    return _element(0x00000000, struct.pack("<I", len(body))) + body


def _pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def test_a_dataset_completed_in_the_pdu_that_breaks_the_protocol_leaves_nothing(bastion_factory: Any,
                                                                                 tmp_path: Path) -> None:
    """A C-STORE of a 10 MB dataset (past the writer's memory, so spooled) whose last fragment shares its
    P-DATA-TF PDU with a PDV on a presentation context that was never accepted: the association is aborted, and
    neither the spooled object nor a stored one remains."""
    import pydicom
    from conftest import dataset_part, make_ct_series

    server: BastionServer = bastion_factory()
    study = make_ct_series(tmp_path / "big", slices=1, size=2300)
    (path,) = study.files
    meta = pydicom.dcmread(path, stop_before_pixels=True)
    dataset = dataset_part(path.read_bytes())
    assert len(dataset) > 9 * 1024 * 1024

    ct, explicit = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, ct.encode()) + _item(0x40, explicit.encode()))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1"))
    rq = _pdu(0x01, struct.pack(">H2x", 1) + server.aet.encode().ljust(16) + b"HOSTILE".ljust(16) + bytes(32)
              + _item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
    sock = _connect(server)
    try:
        sock.settimeout(30)
        sock.sendall(rq)
        assert sock.recv(1)[:1] == bytes([A_ASSOCIATE_AC])
        sock.sendall(_pdu(0x04, _pdv(1, 0x03, _c_store_rq(ct, str(meta.SOPInstanceUID)))))
        chunk = 16000
        for offset in range(0, len(dataset) - chunk, chunk):
            sock.sendall(_pdu(0x04, _pdv(1, 0x00, dataset[offset: offset + chunk])))
        last = dataset[(len(dataset) - 1) // chunk * chunk:]
        sock.sendall(_pdu(0x04, _pdv(1, 0x02, last) + _pdv(99, 0x03, b"\0\0")))  # context 99: never accepted
        assert _until_closed(sock) is not None
    finally:
        sock.close()
    assert _wait(lambda: server.stats()["associations"] == 0)
    assert _wait(lambda: not server.spool_files()), f"left in the spool: {server.spool_files()}"
    assert not server.blobs_of(str(meta.SOPInstanceUID))


# -- requests one association may have running -----------------------------------------------------------
GET_MODEL = "1.2.840.10008.5.1.4.1.2.2.3"  # Study Root Query/Retrieve Information Model - GET
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _command_fields(command: bytes) -> dict[int, bytes]:
    """The elements of an Implicit VR Little Endian command set, by tag."""
    fields, pos = {}, 0
    while pos + 8 <= len(command):
        group, elem, length = struct.unpack_from("<HHI", command, pos)
        fields[group << 16 | elem] = command[pos + 8: pos + 8 + length]
        pos += 8 + length
    return fields


class _CommandReader:
    """Reads the server's PDUs from a raw socket and collects the command sets it sends."""

    def __init__(self, sock: socket.socket, recv_size: int = 1 << 20, pause: float = 0.0) -> None:
        self.sock = sock
        self.recv_size, self.pause = recv_size, pause  # a slow reader: ``recv_size`` bytes, then a pause
        self.datasets = 0  # whole datasets received
        self.closed = False
        self.buffer = b""
        self.fragments = b""
        self.commands: list[dict[int, bytes]] = []
        self.kinds: list[int] = []  # of every PDU received

    def _recv(self) -> bool:
        try:
            chunk = self.sock.recv(self.recv_size)
        except (TimeoutError, BlockingIOError):
            return True
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed = True
            return False
        time.sleep(self.pause)
        self.buffer += chunk
        while len(self.buffer) >= 6:
            kind, length = struct.unpack_from(">BxI", self.buffer)
            if len(self.buffer) < 6 + length:
                break
            body, self.buffer = self.buffer[6: 6 + length], self.buffer[6 + length:]
            self.kinds.append(kind)
            pos = 0
            while kind == 0x04 and pos < len(body):
                (item,) = struct.unpack_from(">I", body, pos)
                control, data = body[pos + 5], body[pos + 6: pos + 4 + item]
                if control & 1:
                    self.fragments += data
                    if control & 2:
                        self.commands.append(_command_fields(self.fragments))
                        self.fragments = b""
                elif control & 2:
                    self.datasets += 1
                pos += 4 + item
        return True

    def until(self, condition: Callable[[], bool], timeout: float = 60.0) -> bool:
        self.sock.settimeout(0.2)
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            if not self._recv():
                break
        return condition()

def _associated(sock: socket.socket, rq: bytes) -> _CommandReader:
    """Send the A-ASSOCIATE-RQ ``rq`` on ``sock``; the reader of the server's PDUs once it has accepted."""
    sock.sendall(rq)
    reader = _CommandReader(sock)
    assert reader.until(lambda: bool(reader.kinds), timeout=30)
    assert reader.kinds == [A_ASSOCIATE_AC]
    return reader


def _get_associate_rq(called: str, calling: str) -> bytes:
    """An A-ASSOCIATE-RQ proposing Study Root C-GET (Implicit VR Little Endian) and CT Image Storage with us in
    the SCP role (PS3.7 D.3.3.4), for the C-STORE sub-operations."""
    implicit, explicit = b"1.2.840.10008.1.2", b"1.2.840.10008.1.2.1"
    contexts = (_item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, GET_MODEL.encode()) + _item(0x40, implicit))
                + _item(0x20, bytes([3, 0, 0, 0]) + _item(0x30, CT_STORAGE.encode()) + _item(0x40, explicit)
                        + _item(0x40, implicit)))
    role = _item(0x54, struct.pack(">H", len(CT_STORAGE)) + CT_STORAGE.encode() + bytes([0, 1]))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1") + role)
    return _pdu(0x01, struct.pack(">H2x", 1) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
                + _item(0x10, b"1.2.840.10008.3.1.1.1") + contexts + user)


def _c_get_rq(message_id: int, study_uid: str) -> bytes:
    """A C-GET-RQ (PS3.7 9.3.3.1) of one study, command and identifier, on presentation context 1."""
    from pynetdicom.dsutils import encode

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    identifier = encode(query, True, True)
    assert identifier is not None
    body = (_element(0x00000002, GET_MODEL.encode()) + _element(0x00000100, struct.pack("<H", 0x0010))
            + _element(0x00000110, struct.pack("<H", message_id)) + _element(0x00000700, struct.pack("<H", 0))
            + _element(0x00000800, struct.pack("<H", 0x0000)))
    command = _element(0x00000000, struct.pack("<I", len(body))) + body
    return _pdu(0x04, _pdv(1, 0x03, command)) + _pdu(0x04, _pdv(1, 0x02, identifier))


def test_requests_beyond_what_one_association_may_run_at_once_are_refused(bastion_factory: Any,
                                                                         tmp_path: Path) -> None:
    """A peer sends 100 C-GET requests at once and never answers the C-STORE sub-operations they start: the
    association does not run 100 retrievals at once (each holding its matches and waiting for the peer), the
    ones beyond its bound are refused out of resources (0xA701, PS3.4 C.4.3.1.4) at once."""
    server: BastionServer = bastion_factory(settings={"BASTION_DICOM_IDLE_TIMEOUT": "120"})
    study = make_study(tmp_path / "study", series=1, per_series=1)
    assert server.storescu(*study.files).returncode == 0

    rq = _get_associate_rq(server.aet, "GREEDY")

    def c_get_rq(message_id: int) -> bytes:
        return _c_get_rq(message_id, study.study_uid)

    sock = _connect(server)
    try:
        sock.settimeout(30)
        reader = _associated(sock, rq)
        sock.sendall(b"".join(c_get_rq(mid) for mid in range(1, 101)))

        def field(command: dict[int, bytes], tag: int) -> int:
            return int(struct.unpack("<H", command[tag])[0])

        stores = lambda: [c for c in reader.commands if field(c, 0x00000100) == 0x0001]  # noqa: E731
        refused = lambda: [c for c in reader.commands if field(c, 0x00000100) == 0x8010  # noqa: E731
                           and field(c, 0x00000900) == 0xA701]
        assert reader.until(lambda: len(stores()) + len(refused()) >= 100, timeout=60), \
            (len(stores()), len(refused()))
        assert len(stores()) <= 16, f"{len(stores())} retrievals of one association ran at once"
        # a request naming the Message ID of one still running is refused as a duplicate invocation (PS3.7 C.5.2)
        sock.sendall(c_get_rq(1))
        duplicate = lambda: [c for c in reader.commands if field(c, 0x00000100) == 0x8010  # noqa: E731
                             and field(c, 0x00000900) == 0x0210 and field(c, 0x00000120) == 1]
        assert reader.until(lambda: bool(duplicate()), timeout=60)
    finally:
        sock.close()
    assert _wait(lambda: server.stats()["associations"] == 0)


def test_a_peer_reading_slowly_but_steadily_is_not_aborted(bastion_factory: Any, tmp_path: Path) -> None:
    """A C-GET of a 12 MB instance to a peer that reads it at about 500 KB/s, with an idle timeout of 1 s: the
    peer reads something all along, so the send goes on until the whole dataset is there (it is not taken for
    a peer that reads nothing)."""
    server: BastionServer = bastion_factory(settings={"BASTION_DICOM_IDLE_TIMEOUT": "1"})
    study = make_ct_series(tmp_path / "big", slices=1, size=2500)
    assert server.storescu(*study.files).returncode == 0

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # little waits in our buffers
    sock.connect((server.host, server.dicom_port))
    try:
        reader = _associated(sock, _get_associate_rq(server.aet, "SLOWREADER"))
        sock.sendall(_c_get_rq(1, study.study_uid))
        reader.recv_size, reader.pause = 32 * 1024, 0.06
        assert reader.until(lambda: reader.datasets > 0 or reader.closed, timeout=120)
        assert reader.datasets > 0, "aborted while the peer was reading"
    finally:
        sock.close()


FIND_MODEL = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND


@pytest.mark.parametrize("what", ["command", "identifier"])
def test_a_message_that_never_ends_costs_no_memory(bastion_factory: Any, what: str) -> None:
    """After the association, a peer sends 200 MB of one command set (fragments never marked last) or of one
    C-FIND identifier: neither is held in memory without bound; the association is aborted."""
    server: BastionServer = bastion_factory()
    assert server.proc is not None
    pgid = server.proc.pid
    assert server.echo().returncode == 0
    before = _group_rss_kb(pgid)

    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, FIND_MODEL.encode()) + _item(0x40, b"1.2.840.10008.1.2"))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1"))
    rq = _pdu(0x01, struct.pack(">H2x", 1) + server.aet.encode().ljust(16) + b"ENDLESS".ljust(16) + bytes(32)
              + _item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
    sock = _connect(server)
    peak = before
    try:
        sock.settimeout(30)
        sock.sendall(rq)
        assert sock.recv(1)[:1] == bytes([A_ASSOCIATE_AC])
        if what == "identifier":
            body = (_element(0x00000002, FIND_MODEL.encode()) + _element(0x00000100, struct.pack("<H", 0x0020))
                    + _element(0x00000110, struct.pack("<H", 1)) + _element(0x00000700, struct.pack("<H", 0))
                    + _element(0x00000800, struct.pack("<H", 0x0000)))
            sock.sendall(_pdu(0x04, _pdv(1, 0x03, _element(0x00000000, struct.pack("<I", len(body))) + body)))
        control = 0x01 if what == "command" else 0x00  # never the last fragment
        pdu = _pdu(0x04, _pdv(1, control, b"\0" * (1024 * 1024 - 12)))
        try:
            for i in range(200):
                sock.sendall(pdu)
                if i % 20 == 0:
                    peak = max(peak, _group_rss_kb(pgid))
        except (BrokenPipeError, ConnectionResetError):
            pass  # aborted meanwhile
        peak = max(peak, _group_rss_kb(pgid))
        assert _until_closed(sock) is not None, "the association was kept"
    finally:
        sock.close()
    assert (peak - before) <= 64 * 1024, f"the server grew by {(peak - before) / 1024:.0f} MB"
    assert server.echo().returncode == 0


def test_claimed_pdu_lengths_cost_no_memory_without_a_maximum_pdu_length(bastion_factory: Any) -> None:
    """With ``max_pdu = 0`` (no maximum advertised, PS3.8 D.1), eight associations each claim a 60 MB P-DATA-TF
    PDU and send a few bytes of it: the server's processes grow by at most 40 MB (a PDU's buffer grows as its
    bytes arrive, whatever length is claimed)."""
    server: BastionServer = bastion_factory(settings={"BASTION_MAX_PDU": "0"})
    assert server.proc is not None
    pgid = server.proc.pid
    assert server.echo().returncode == 0
    before = _group_rss_kb(pgid)
    socks = [_connect(server) for _ in range(8)]
    try:
        for sock in socks:
            sock.settimeout(30)
            sock.sendall(_associate_rq())
            assert sock.recv(1)[:1] == bytes([A_ASSOCIATE_AC])
        for sock in socks:
            sock.sendall(struct.pack(">BxI", 0x04, SIXTY_MB) + b"\x00\x01" * 8)
        grown = lambda: _group_rss_kb(pgid) - before  # noqa: E731
        _wait(lambda: grown() > 40 * 1024, timeout=5)  # what it would reach, given the time to
        assert grown() <= 40 * 1024, f"the server grew by {grown() / 1024:.0f} MB"
    finally:
        for sock in socks:
            sock.close()



def test_requests_before_a_refused_pdu_are_served_once(bastion_factory: Any, tmp_path: Path) -> None:
    """Three C-STORE requests and then a PDU not allowed in an association (A-ASSOCIATE-RQ), sent at once; once
    the first is answered, one more request: each request is answered at most once before the association is
    aborted (the refused PDU stops reading for good: what came before it is not taken up again)."""
    import pydicom
    from conftest import dataset_part

    server: BastionServer = bastion_factory()
    study = make_study(tmp_path / "study", series=1, per_series=4)
    ct, explicit = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, ct.encode()) + _item(0x40, explicit.encode()))
    user = _item(0x50, _item(0x51, struct.pack(">I", 1 << 20)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1"))
    rq = _pdu(0x01, struct.pack(">H2x", 1) + server.aet.encode().ljust(16) + b"HOSTILE".ljust(16) + bytes(32)
              + _item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)

    def c_store(message_id: int, path: Path) -> bytes:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        return (_pdu(0x04, _pdv(1, 0x03, _c_store_rq(ct, uid, message_id)))
                + _pdu(0x04, _pdv(1, 0x02, dataset_part(path.read_bytes()))))

    sock = _connect(server)
    try:
        sock.settimeout(30)
        reader = _associated(sock, rq)
        sock.sendall(b"".join(c_store(mid, path) for mid, path in zip((1, 2, 3), study.files, strict=False)) + rq)
        assert reader.until(lambda: len(reader.commands) >= 1 or reader.closed, timeout=30)
        with contextlib.suppress(OSError):
            sock.sendall(c_store(4, study.files[3]))
        assert reader.until(lambda: reader.closed, timeout=30), "the association was kept"
    finally:
        sock.close()
    answered = [struct.unpack("<H", c[0x00000120])[0] for c in reader.commands]
    assert len(answered) == len(set(answered)), f"answered more than once: {answered}"
    assert 4 not in answered
