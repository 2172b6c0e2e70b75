"""DICOM access control over real DCMTK clients: known peers, their hosts and services, C-MOVE destinations and
the called AE title (PS3.8 9.3.4 A-ASSOCIATE-RJ reasons, PS3.7 Annex C 0x0124), each audited.

The server lists four peers in ``[dimse.peers]`` (so unknown calling AEs are rejected): ``STORER`` (echo, store),
``VIEWER`` (echo, find, move to DEST only), ``FARAWAY`` (a network this machine is not on) and ``SECOND`` (only
from 127.0.0.2: a raw client binds its socket there, which DCMTK cannot).
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    BastionServer,
    StoreSCP,
    free_port,
    make_study,
    requires_dcmtk,
    run_dcmtk,
)

pytestmark = [requires_dcmtk, pytest.mark.timeout(300)]


def audit_entries(data: Path) -> list[dict[str, Any]]:
    """Every audit entry written under ``data`` (any ``audit*.jsonl`` file), read by its keys only."""
    entries = []
    for path in sorted(data.rglob("audit*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and "kind" in entry:
                entries.append(entry)
    return entries


def wait_for_audit(data: Path, match: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
    """The first audit entry ``match`` accepts, waiting for it (the log is written in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in audit_entries(data) if match(e)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            pytest.fail(f"no such audit entry; entries: {audit_entries(data)[-20:]}")
        time.sleep(0.2)


def association_entry(user: str, success: bool) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (e.get("kind") == "association" and e.get("user", "") == user
                      and (int(e.get("outcome", 0)) == 0) == success)


def not_authorized(output: str) -> bool:
    """Whether DCMTK's output shows a 0x0124 (Refused: Not Authorized) response: it prints "0x124"."""
    return re.search(r"Status: 0x0?124\b", output, re.IGNORECASE) is not None


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(payload)) + payload


def raw_associate(server: BastionServer, calling: str, source: str) -> bytes:
    """Send an A-ASSOCIATE-RQ (Verification) from a socket bound to ``source``; the first PDU answered (6+ bytes)."""
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, b"1.2.840.10008.1.1") + _item(0x40, b"1.2.840.10008.1.2"))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1"))
    body = (struct.pack(">H2x", 1) + server.aet.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.bind((source, 0))
        sock.connect((server.host, server.dicom_port))
        sock.sendall(struct.pack(">BxI", 0x01, len(body)) + body)
        got = b""
        while len(got) < 10:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        if got[:1] == b"\x02":  # A-ASSOCIATE-AC: release politely
            sock.sendall(struct.pack(">BxI", 0x05, 4) + bytes(4))
        return got


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, storescp: StoreSCP) -> Iterator[BastionServer]:
    """A server whose ``[dimse.peers]`` lists STORER, VIEWER, FARAWAY and SECOND."""
    root = tmp_path_factory.mktemp("guarded")
    config = root / "bastion.toml"
    config.write_text(f"""
[remotes]
DEST = "127.0.0.1:{storescp.port}"
ELSEWHERE = "127.0.0.1:{free_port()}"

[dimse.peers]
STORER = {{ host = "127.0.0.1", services = ["echo", "store"] }}
VIEWER = {{ host = ["127.0.0.0/8"], services = ["echo", "find", "move"], move_destinations = ["DEST"] }}
FARAWAY = {{ host = "192.0.2.0/24", services = ["*"] }}
SECOND = {{ host = "127.0.0.2", services = ["echo"] }}
""")
    server = BastionServer(root / "data", settings={"BASTION_CONFIG": str(config)}).start()
    yield server
    server.stop()


def echo(server: BastionServer, calling: str, called: str | None = None) -> Any:
    return run_dcmtk("echoscu", "-v", "-aet", calling, "-aec", called or server.aet, server.host,
                     str(server.dicom_port), timeout=30)


def test_an_unknown_calling_ae_is_rejected(guarded: BastionServer) -> None:
    proc = echo(guarded, "UNKNOWN")
    assert proc.returncode != 0, proc.stdout
    assert "Association Rejected" in proc.stdout, proc.stdout
    assert "Rejected Permanent" in proc.stdout and "Calling AE Title Not Recognized" in proc.stdout, proc.stdout
    entry = wait_for_audit(guarded.data, association_entry("UNKNOWN", success=False))
    assert "not a known peer" in entry.get("detail", "")
    assert "calling AE title 'UNKNOWN' is not a known peer" in guarded.log()


def test_a_listed_ae_is_accepted(guarded: BastionServer) -> None:
    proc = echo(guarded, "STORER")
    assert proc.returncode == 0, proc.stdout
    assert "Received Echo Response (Success)" in proc.stdout, proc.stdout
    entry = wait_for_audit(guarded.data, association_entry("STORER", success=True))
    assert entry.get("address") == "127.0.0.1" and entry.get("destination") == guarded.aet


def test_a_listed_ae_from_another_host_is_rejected(guarded: BastionServer) -> None:
    proc = echo(guarded, "FARAWAY")  # listed on 192.0.2.0/24, calls from 127.0.0.1
    assert proc.returncode != 0, proc.stdout
    assert "Calling AE Title Not Recognized" in proc.stdout, proc.stdout
    entry = wait_for_audit(guarded.data, association_entry("FARAWAY", success=False))
    assert "not allowed from 127.0.0.1" in entry.get("detail", "")


def test_the_source_address_decides(guarded: BastionServer) -> None:
    """SECOND is accepted from 127.0.0.2 only; STORER (127.0.0.1) is rejected from there: A-ASSOCIATE-RJ
    rejected-permanent (1), service-user (1), calling AE title not recognized (3)."""
    ac = raw_associate(guarded, "SECOND", "127.0.0.2")
    assert ac[:1] == b"\x02", ac[:16]
    rj = raw_associate(guarded, "SECOND", "127.0.0.1")
    assert rj[:1] == b"\x03" and rj[7:10] == bytes([1, 1, 3]), rj
    rj = raw_associate(guarded, "STORER", "127.0.0.2")
    assert rj[:1] == b"\x03" and rj[7:10] == bytes([1, 1, 3]), rj


def test_a_wrong_called_ae_is_rejected(guarded: BastionServer) -> None:
    proc = echo(guarded, "STORER", called="NOTBASTION")
    assert proc.returncode != 0, proc.stdout
    assert "Called AE Title Not Recognized" in proc.stdout, proc.stdout
    entry = wait_for_audit(guarded.data, lambda e: e.get("kind") == "association"
                           and e.get("destination") == "NOTBASTION")
    assert int(entry.get("outcome", 0)) != 0


def test_a_find_from_a_store_only_ae_is_refused(guarded: BastionServer, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", series=1, per_series=2)
    stored = run_dcmtk("storescu", "-v", "-aet", "STORER", *guarded.addr(), *study.files, timeout=120)
    assert stored.returncode == 0 and "Received Store Response (Success)" in stored.stdout, stored.stdout
    out = tmp_path / "find"
    out.mkdir()
    proc = run_dcmtk("findscu", "-v", "-S", "-aet", "STORER", "-k", "QueryRetrieveLevel=STUDY",
                     "-k", f"StudyInstanceUID={study.study_uid}", "-X", "-od", out, *guarded.addr(), timeout=60)
    assert not_authorized(proc.stdout), proc.stdout
    assert not list(out.glob("rsp*.dcm")), "a refused C-FIND answered matches"
    assert "refusing find from STORER" in guarded.log()
    wait_for_audit(guarded.data, lambda e: e.get("kind") == "query" and e.get("user") == "STORER"
                   and int(e.get("outcome", 0)) != 0)
    # VIEWER may find it
    proc = run_dcmtk("findscu", "-v", "-S", "-aet", "VIEWER", "-k", "QueryRetrieveLevel=STUDY",
                     "-k", f"StudyInstanceUID={study.study_uid}", "-X", "-od", out, *guarded.addr(), timeout=60)
    assert proc.returncode == 0 and len(list(out.glob("rsp*.dcm"))) == 1, proc.stdout


def test_a_store_from_an_ae_without_store_is_refused_and_nothing_is_stored(guarded: BastionServer,
                                                                          tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", series=1, per_series=2)
    proc = run_dcmtk("storescu", "-v", "-aet", "VIEWER", *guarded.addr(), *study.files, timeout=120)
    assert "Received Store Response (Success)" not in proc.stdout, proc.stdout
    assert not_authorized(proc.stdout), proc.stdout
    out = tmp_path / "find"
    out.mkdir()
    found = run_dcmtk("findscu", "-S", "-aet", "VIEWER", "-k", "QueryRetrieveLevel=IMAGE",
                      "-k", f"StudyInstanceUID={study.study_uid}", "-k", f"SeriesInstanceUID={next(iter(study.series))}",
                      "-k", "SOPInstanceUID", "-X", "-od", out, *guarded.addr(), timeout=60)
    assert found.returncode == 0, found.stdout
    assert not list(out.glob("rsp*.dcm")), "an instance from a refused C-STORE was stored"
    wait_for_audit(guarded.data, lambda e: e.get("kind") == "store" and e.get("user") == "VIEWER"
                   and int(e.get("outcome", 0)) != 0)


def test_a_move_to_a_destination_not_granted_is_refused(guarded: BastionServer, storescp: StoreSCP,
                                                        tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", series=1, per_series=2)
    stored = run_dcmtk("storescu", "-aet", "STORER", *guarded.addr(), *study.files, timeout=120)
    assert stored.returncode == 0, stored.stdout
    refused = run_dcmtk("movescu", "-v", "-S", "-aet", "VIEWER", "-aem", "ELSEWHERE", "-k", "QueryRetrieveLevel=STUDY",
                        "-k", f"StudyInstanceUID={study.study_uid}", *guarded.addr(), timeout=60)
    assert "Final Move Response (Refused: MoveDestinationUnknown)" in refused.stdout, refused.stdout  # 0xA801
    wait_for_audit(guarded.data, lambda e: e.get("kind") == "retrieve" and e.get("user") == "VIEWER"
                   and "ELSEWHERE" in e.get("detail", "") and int(e.get("outcome", 0)) != 0)
    storescp.clear()
    moved = run_dcmtk("movescu", "-v", "-S", "-aet", "VIEWER", "-aem", "DEST", "-k", "QueryRetrieveLevel=STUDY",
                      "-k", f"StudyInstanceUID={study.study_uid}", *guarded.addr(), timeout=120)
    assert moved.returncode == 0, moved.stdout
    assert set(storescp.received()) == set(study.sop_uids)
    # STORER has no move at all
    proc = run_dcmtk("movescu", "-v", "-S", "-aet", "STORER", "-aem", "DEST", "-k", "QueryRetrieveLevel=STUDY",
                     "-k", f"StudyInstanceUID={study.study_uid}", *guarded.addr(), timeout=60)
    assert not_authorized(proc.stdout), proc.stdout


def test_an_echo_not_granted_is_refused(tmp_path: Path) -> None:
    """A peer without ``echo``: C-ECHO answered 0x0124 (the association itself is accepted: its other services
    are granted)."""
    server = BastionServer(tmp_path / "data", settings={"BASTION_DIMSE_PEERS": "NOECHO@127.0.0.1=store"}).start()
    try:
        proc = echo(server, "NOECHO")
        assert not_authorized(proc.stdout), proc.stdout
        assert "refusing echo from NOECHO" in server.log()
        unknown = echo(server, "OTHER")  # a listed peer switches unknown AEs off ("auto")
        assert "Calling AE Title Not Recognized" in unknown.stdout, unknown.stdout
    finally:
        server.stop()


def test_without_peers_every_ae_is_accepted(bastion: BastionServer) -> None:
    """No ``[dimse.peers]``: any calling and called AE title associates, as before access control."""
    proc = echo(bastion, "ANYONE", called="ANYTHING")
    assert proc.returncode == 0, proc.stdout
    wait_for_audit(bastion.data, association_entry("ANYONE", success=True))
