"""SIGTERM while a modality is sending: the association in progress is allowed to finish, then a clean stop."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import DCMTK, corpus, dcmtk_env, requires_dcmtk, run_bastion

from bastion.archive import RUNNING_MARKER

pytestmark = [requires_dcmtk, pytest.mark.timeout(120)]

COUNT = 300


def test_sigterm_lets_the_association_in_progress_finish(bastion_factory: Any, tmp_path: Path,
                                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    files = corpus.ensure_corpus("small", COUNT, tmp_path_factory.getbasetemp() / f"shutdown-corpus-{COUNT}")
    server = bastion_factory(tmp_path / "data")
    sender = subprocess.Popen([DCMTK["storescu"], *server.addr(), *map(str, files)], env=dcmtk_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while server.stats()["instances"] < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)  # mid-stream

    output, _ = sender.communicate(timeout=60)
    assert sender.returncode == 0, output[-2000:]  # every store was answered with success
    assert server.proc.wait(30) == 0
    assert (server.data / RUNNING_MARKER).read_text() == "clean"
    assert "waiting up to" in server.log()
    verify = run_bastion("verify", "--data", str(server.data))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert f"verified {COUNT} object(s)" in verify.stdout


def test_associations_cut_short_by_the_shutdown_are_cleaned_up_before_close_returns(tmp_path: Path) -> None:
    """An association still receiving a 10 MB C-STORE (spooled) when the listener closes with no grace left:
    by the time ``DicomServer.close`` returns (and the archive is closed after it) the half-received object is
    gone from the spool and the association is no longer counted."""
    import asyncio
    import os
    import struct

    from bastion.archive import Archive
    from bastion.dimse.server import DicomServer
    from bastion.settings import load_settings

    def item(kind: int, payload: bytes) -> bytes:
        return struct.pack(">BxH", kind, len(payload)) + payload

    def element(tag: int, value: bytes) -> bytes:
        value += b"\0" * (len(value) % 2)
        return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value

    def pdata(control: int, data: bytes) -> bytes:
        return struct.pack(">BxIIBB", 0x04, len(data) + 6, len(data) + 2, 1, control) + data

    ct = b"1.2.840.10008.5.1.4.1.1.2"
    context = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, ct) + item(0x40, b"1.2.840.10008.1.2.1"))
    user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.826.0.1.3680043.9.7433.1"))
    body = (struct.pack(">H2x", 1) + b"BASTION".ljust(16) + b"LATE".ljust(16) + bytes(32)
            + item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
    rq = struct.pack(">BxI", 0x01, len(body)) + body
    fields = (element(0x00000002, ct) + element(0x00000100, struct.pack("<H", 1))
              + element(0x00000110, struct.pack("<H", 1)) + element(0x00000700, struct.pack("<H", 0))
              + element(0x00000800, struct.pack("<H", 0)) + element(0x00001000, b"1.2.3.4.5"))
    command = element(0x00000000, struct.pack("<I", len(fields))) + fields

    archive = Archive.open(load_settings(None, env={}, data=tmp_path / "data"))
    spool = Path(archive.blobs.stores[0].spool_dir)  # type: ignore[attr-defined]

    def spooled() -> list[str]:
        return [name for name in os.listdir(spool) if "-pool-" not in name]

    async def scenario() -> tuple[int, int, list[str]]:
        server = DicomServer(archive)
        sock = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        writer.write(rq)
        assert (await reader.readexactly(1)) == b"\x02"
        writer.write(pdata(0x03, command))
        for _ in range(10 * 64):  # 10 MB of the dataset, never its last fragment
            writer.write(pdata(0x00, bytes(16000)))
        await writer.drain()
        for _ in range(3000):
            if spooled():
                break
            await asyncio.sleep(0.01)
        assert spooled(), "the dataset never reached the spool"
        await server.close(grace=0)
        counted, on_board, left = server.active, server.board.total(), spooled()
        writer.close()
        return counted, on_board, left

    try:
        counted, on_board, left = asyncio.run(scenario())
    finally:
        archive.close()
    assert (counted, on_board) == (0, 0), "the association cut short is still counted"
    assert left == [], f"left in the spool: {left}"
