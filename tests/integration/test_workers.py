"""Several DICOM worker processes share one listening socket and spread associations evenly."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import BastionServer, make_study, run_bastion
from pynetdicom import AE
from pynetdicom.sop_class import Verification

pytestmark = pytest.mark.timeout(120)


def test_parallel_associations_spread_evenly_over_the_workers(tmp_path: Path) -> None:
    server = BastionServer(tmp_path / "data").start()  # the default: two DICOM worker processes
    ae = AE(ae_title="SPREAD")
    ae.add_requested_context(Verification)
    assocs = []
    try:
        for _ in range(6):  # one after another, as scanners connect: whichever worker wakes first could take all
            assoc = ae.associate(server.host, server.dicom_port, ae_title=server.aet)
            assert assoc.is_established
            assocs.append(assoc)
        deadline = time.monotonic() + 10
        while (stats := server.stats())["associations"] < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stats["associations"] == 6, stats
        assert stats["associations_per_worker"] == [3, 3], stats
        for assoc in assocs:
            assert assoc.send_c_echo().Status == 0x0000  # every worker serves what it took
    finally:
        for assoc in assocs:
            assoc.release()
        ae.shutdown()
        server.stop()
    assert "Traceback" not in server.log()


def _stats_when(server: BastionServer, ready: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
    """``/api/statistics`` once ``ready`` holds (HTTP may be down meanwhile)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = server.stats()
            if ready(last):
                return last
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"not ready after {timeout} s: {last!r}")


def test_a_process_that_dies_is_replaced_while_the_others_keep_serving(tmp_path: Path) -> None:
    """kill -9 a DICOM worker, then the worker that also serves HTTP: each is replaced, the port never closes."""
    server = BastionServer(tmp_path / "data").start()
    study = make_study(tmp_path / "study", series=1, per_series=4)
    try:
        before = _stats_when(server, lambda s: all(s["worker_pids"]))["worker_pids"]
        os.kill(before[1], signal.SIGKILL)
        assert server.echo().returncode == 0  # the other worker answers meanwhile
        after = _stats_when(server, lambda s: s["worker_pids"][1] not in (0, before[1]))["worker_pids"]
        assert after[0] == before[0]
        os.kill(before[0], signal.SIGKILL)  # HTTP goes with it until the replacement listens
        assert server.storescu(*study.files[:2]).returncode == 0  # worker 1 (the replacement) stores meanwhile
        final = _stats_when(server, lambda s: s["worker_pids"][0] not in (0, before[0]) and all(s["worker_pids"]))
        assert server.storescu(*study.files[2:]).returncode == 0
        assert _stats_when(server, lambda s: s["instances"] == 4)["instances"] == 4
        assert final["worker_pids"][1] == after[1]
    finally:
        server.stop()
    log = server.log()
    assert f"DICOM worker 1 (pid {before[1]}) was killed by SIGKILL; starting a new one" in log
    assert f"DICOM worker 0 (and HTTP) (pid {before[0]}) was killed by SIGKILL; starting a new one" in log
    assert "did not shut down cleanly" not in log  # the supervisor kept the run marker: no recovery beside live ones
    assert "Traceback" not in log
    verify = run_bastion("verify", "--data", str(tmp_path / "data"))
    assert verify.returncode == 0, verify.stdout + verify.stderr
