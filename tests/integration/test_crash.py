"""Bastion's promise: an acknowledged image is never lost, even on ``kill -9`` mid-stream."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import backends
import pydicom
import pytest
from conftest import DCMTK, BastionServer, corpus, dcmtk_env, requires_dcmtk, run_bastion

from bastion.blobs.journal import read_segment

pytestmark = [requires_dcmtk, pytest.mark.timeout(180)]

COUNT = 600  # small instances; the kill comes after ~50 of them are indexed


def _acknowledged(output: str) -> tuple[list[str], list[str]]:
    """(files acknowledged with Success, files sent) from ``storescu -v`` output, in order."""
    acked, sent, current = [], [], None
    for line in output.splitlines():
        m = re.match(r"I: Sending file: (.+)$", line)
        if m:
            current = m.group(1).strip()
            sent.append(current)
        elif "Received Store Response (Success)" in line:
            assert current is not None, "a response before any file was sent"
            acked.append(current)
            current = None
    return acked, sent


def _journaled(data: Path) -> list[Any]:
    """The valid records in the blob journal's segments under ``data``."""
    return [r for seg in sorted((data / "blobs" / ".journal").glob("*.wal")) for r in read_segment(str(seg))]


def test_kill_9_mid_stream_loses_no_acknowledged_instance(bastion_factory: Any, tmp_path: Path,
                                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    files = corpus.ensure_corpus("small", COUNT, tmp_path_factory.getbasetemp() / f"crash-corpus-{COUNT}")
    sop_of = {str(f): str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    data = tmp_path / "data"
    server: BastionServer = bastion_factory(data)

    log = open(tmp_path / "storescu.log", "w")  # noqa: SIM115
    sender = subprocess.Popen([DCMTK["storescu"], "-v", *server.addr(), *map(str, files)], env=dcmtk_env(),
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sender.poll() is None:
            # ... and records in the blob journal: a checkpoint (every second) voids the records before it, and
            # on a slow machine one could fall just before the kill and leave nothing for the test below
            if server.stats()["instances"] > 50 and (backends.REMOTE or _journaled(data)):
                break
            time.sleep(0.02)
        server.kill9()
        sender.wait(60)
    finally:
        if sender.poll() is None:
            sender.kill()
        log.close()
    output = (tmp_path / "storescu.log").read_text()
    acked, sent = _acknowledged(output)
    assert len(acked) > 50, output[-2000:]
    assert len(acked) < COUNT, "the kill came too late to test anything"
    assert sender.returncode != 0  # storescu saw the connection die

    if not backends.REMOTE:  # the embedded store's own durability chain (S3 and PostgreSQL have their own)
        # A power failure would also lose what the page cache held: every object still in the blob journal
        # (acknowledged, its file not yet flushed) loses its file or part of it. The restart must rewrite them.
        journaled = _journaled(data)
        assert journaled, "the kill left nothing in the blob journal to replay"
        for i, record in enumerate(journaled):
            path = data / "blobs" / record.key
            if i % 3 == 0:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(record.data[: len(record.data) * (i % 3 - 1) // 2])  # empty or half

        # The index opens cleanly, without repair, before the server touches it again.
        conn = sqlite3.connect(data / "index.sqlite3")
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()

    restarted: BastionServer = bastion_factory(data)
    assert restarted.spool_files() == []
    stats = restarted.stats()
    assert stats["instances"] >= len(acked)
    assert stats["instances"] <= len(sent)

    # Every acknowledged instance answers a C-FIND on its SOP Instance UID.
    wanted = [sop_of[f] for f in acked]
    found: set[str] = set()
    for i in range(0, len(wanted), 100):
        chunk = wanted[i: i + 100]
        proc, rsp = restarted.find({"QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": "\\".join(chunk)},
                                   out=tmp_path / f"find{i}")
        assert "Received Final Find Response (Success)" in proc.stdout, proc.stdout
        found |= {str(r.SOPInstanceUID) for r in rsp}
    missing = sorted(set(wanted) - found)
    assert not missing, f"{len(missing)} acknowledged instance(s) lost, e.g. {missing[:3]}"
    # ... and its stored bytes are the bytes sent.
    for f in acked[:: max(1, len(acked) // 20)]:
        (blob,) = restarted.blobs_of(sop_of[f])
        assert blob.read_bytes()[-4096:] == Path(f).read_bytes()[-4096:]
    restarted.stop()

    verify = run_bastion("verify", "--data", str(data))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # No torn leftovers either: recovery removed any file the kill cut short before its journal record.
    assert "0 missing, 0 corrupt, 0 stored but not indexed" in verify.stdout, verify.stdout
