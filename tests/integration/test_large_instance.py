"""A large multi-frame instance is streamed to disk (bounded memory) and retrieved byte-identically."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pydicom
import pytest
from conftest import dataset_part, requires_dcmtk, run_dcmtk
from large_instance import write_large_instance

pytestmark = [requires_dcmtk, pytest.mark.timeout(180)]

FRAMES = 600  # 600 x 512 x 512 x 2 bytes = 300 MiB of pixel data


def _group_rss_bytes(pgid: int) -> int:
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ProcessLookupError):
            continue
    return total


def test_large_multiframe_round_trip(bastion_factory, tmp_path: Path) -> None:
    server = bastion_factory()
    source = tmp_path / "large.dcm"
    sop_uid = write_large_instance(source, FRAMES)
    header = pydicom.dcmread(source, stop_before_pixels=True)

    assert server.proc is not None
    idle = _group_rss_bytes(server.proc.pid)  # the processes' own (more with the S3 and PostgreSQL clients)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _group_rss_bytes(server.proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        stored = server.storescu(source)
    finally:
        stop.set()
        sampler.join()
    assert stored.returncode == 0, stored.stdout
    assert server.stats()["instances"] == 1
    # The server (all its processes) never held the 300 MiB object in memory.
    assert peak - idle < 64 * 2**20, (f"peak RSS {peak / 2**20:.0f} MiB, {(peak - idle) / 2**20:.0f} MiB above idle, "
                                      "while receiving a 300 MiB instance")

    out = tmp_path / "got"
    out.mkdir()
    got = run_dcmtk("getscu", "-v", "-od", str(out), "-S", "-k", "QueryRetrieveLevel=IMAGE",
                    "-k", f"StudyInstanceUID={header.StudyInstanceUID}",
                    "-k", f"SeriesInstanceUID={header.SeriesInstanceUID}",
                    "-k", f"SOPInstanceUID={sop_uid}", *server.addr(), timeout=120)
    assert got.returncode == 0, got.stdout + got.stderr
    files = list(out.iterdir())
    assert len(files) == 1
    assert dataset_part(files[0].read_bytes()) == dataset_part(source.read_bytes())
    (stored_blob,) = server.blobs_of(sop_uid)
    assert dataset_part(stored_blob.read_bytes()) == dataset_part(source.read_bytes())
