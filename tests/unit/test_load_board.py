"""The load board the DICOM worker processes share (bastion.dimse.loadboard.LoadBoard)."""

from __future__ import annotations

import os
import signal
import time

from bastion.dimse.loadboard import LoadBoard


def _worker(board: LoadBoard, worker: int, active: int, *, stay: bool) -> int:
    """Fork a process that registers as ``worker`` serving ``active`` associations, then exits or stays."""
    pid = os.fork()
    if pid == 0:
        board.register(worker)
        board.set(worker, active)
        if stay:
            time.sleep(60)
        os._exit(0)
    return pid


def test_counts_are_shared_across_fork_and_only_live_listening_workers_count() -> None:
    board = LoadBoard(3)
    board.register(0)
    board.set(0, 2)
    assert board.least() == 2  # workers 1 and 2 never started listening: they do not count

    live = _worker(board, 1, 1, stay=True)
    deadline = time.monotonic() + 10
    while board.least() != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert board.counts() == [2, 1, 0] and board.least() == 1  # seen by this process: shared memory

    dead = _worker(board, 2, 0, stay=False)
    os.waitpid(dead, 0)
    assert board.counts()[2] == 0 and board.least() == 1, "a dead worker's idle slot held the others up"

    os.kill(live, signal.SIGKILL)
    os.waitpid(live, 0)
    assert board.least() == 2  # only this worker is left
