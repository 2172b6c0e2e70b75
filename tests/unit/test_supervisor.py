"""The supervisor of ``bastion serve`` replaces a process that dies, waiting longer for one that keeps dying."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from bastion.cli.serve import Supervisor

pytestmark = pytest.mark.timeout(60)


def _crash(log: str) -> None:
    with open(log, "a") as fh:
        fh.write(f"{time.monotonic()}\n")
    os._exit(3)  # dies at once, every time


def _stay(log: str) -> None:
    with open(log, "a") as fh:
        fh.write(f"{time.monotonic()}\n")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        time.sleep(0.1)


def _supervise(crash_log: str, stay_log: str) -> None:
    Supervisor({"crasher": (_crash, (crash_log,)), "steady": (_stay, (stay_log,))}).run()


def test_a_process_that_keeps_dying_is_restarted_ever_more_slowly_and_the_others_are_left_alone(
        tmp_path: Path) -> None:
    crash_log, stay_log = tmp_path / "crash.log", tmp_path / "stay.log"
    ctx = multiprocessing.get_context("fork")
    sup = ctx.Process(target=_supervise, args=(str(crash_log), str(stay_log)))
    sup.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not crash_log.exists() or len(crash_log.read_text().split()) < 4):
            time.sleep(0.05)
        starts = [float(x) for x in crash_log.read_text().split()]
        assert len(starts) >= 4, starts
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        # Delays by deaths within a minute: 0, 0, 1 s, 5 s (RESTART_DELAYS_S). Only the waits are checked (a
        # busy machine makes every gap longer, never shorter).
        assert gaps[2] >= 0.9, gaps
        time.sleep(1.0)
        assert len(crash_log.read_text().split()) == 4, "the fifth start came before its 5 s delay"
        assert len(stay_log.read_text().split()) == 1  # the process that did not die was never restarted
    finally:
        os.kill(sup.pid, signal.SIGTERM)
        sup.join(30)
    assert sup.exitcode == 0
