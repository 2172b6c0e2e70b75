"""C-MOVE as a leased job (PS3.4 C.4.2, :mod:`bastion.dimse.moves`) on one node: the same request twice, the
same request while the first runs, and a requester that leaves mid-move. (A node killed mid-move:
``test_nodes.py``.)"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import DCMTK, BastionServer, StoreSCP, Study, dcmtk_env, make_study, requires_dcmtk, run_dcmtk
from test_dimse_retrieve import move_responses, start_storescp

pytestmark = [requires_dcmtk, pytest.mark.timeout(180)]


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[StoreSCP]:
    """A destination ``SLOW`` that takes a second per instance."""
    scp = start_storescp("SLOW", tmp_path / "slow", "--sleep-after", "1")
    yield scp
    scp.stop()


@pytest.fixture
def server(bastion_factory: Callable[..., BastionServer], slow: StoreSCP, tmp_path: Path) -> BastionServer:
    return bastion_factory(remotes=[f"SLOW@127.0.0.1:{slow.port}"])


def _stored(server: BastionServer, tmp_path: Path, per_series: int) -> Study:
    study = make_study(tmp_path / "study", series=1, per_series=per_series)
    proc = server.storescu(*study.files)
    assert proc.stdout.count("Received Store Response (Success)") == per_series, proc.stdout
    return study


def _move(server: BastionServer, study: Study, aet: str = "MOVER") -> list[dict[str, str]]:
    proc = run_dcmtk("movescu", "-d", "-S", "-aet", aet, "-aem", "SLOW", "-k", "QueryRetrieveLevel=STUDY",
                     "-k", f"StudyInstanceUID={study.study_uid}", *server.addr(), timeout=120)
    rsps = move_responses(proc.stdout)
    assert rsps, proc.stdout
    return rsps


def _received(scp: StoreSCP) -> set[str]:
    return {p.name.split(".", 1)[1] for p in scp.files()}


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def test_the_same_c_move_after_its_answer_sends_everything_again(server: BastionServer, slow: StoreSCP,
                                                                tmp_path: Path) -> None:
    """A job whose requester had its final response is closed: the same C-MOVE again is a new job."""
    study = _stored(server, tmp_path, 2)
    for _ in range(2):
        slow.clear()
        final = _move(server, study)[-1]
        assert (final["status"], final["completed"], final["failed"]) == ("0x0000", "2", "0")
        assert _received(slow) == set(study.sop_uids)
    assert server.log().count("C-MOVE job") >= 4  # two jobs, each begun and finished


def test_the_same_c_move_while_it_runs_joins_the_job(server: BastionServer, slow: StoreSCP, tmp_path: Path) -> None:
    """A second identical request waits for the job the first runs, and both are answered with its counts."""
    study = _stored(server, tmp_path, 4)
    answers: list[list[dict[str, str]]] = []
    first = threading.Thread(target=lambda: answers.append(_move(server, study)))
    first.start()
    _wait_until(lambda: len(_received(slow)) >= 1, "the first instance at the destination")
    second = _move(server, study)
    first.join(120)
    assert "waiting for it" in server.log()
    assert server.log().count("to SLOW: 4 instance(s)") == 1  # one job, run once
    for rsps in (answers[0], second):
        assert (rsps[-1]["status"], rsps[-1]["completed"], rsps[-1]["failed"]) == ("0x0000", "4", "0")
    assert _received(slow) == set(study.sop_uids)


def test_a_requester_that_leaves_mid_move_still_has_every_instance_moved(server: BastionServer, slow: StoreSCP,
                                                                       tmp_path: Path) -> None:
    """The requester is killed once the first instance arrived (its connection drops): the node gives the job
    up and its runner takes it over, skipping what was delivered, so every instance reaches the destination."""
    study = _stored(server, tmp_path, 6)
    requester = subprocess.Popen([DCMTK["movescu"], "-S", "-aet", "LEAVER", "-aem", "SLOW", "-k",
                                  "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}",
                                  *server.addr()], env=dcmtk_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    try:
        _wait_until(lambda: len(_received(slow)) >= 1, "the first instance at the destination")
    finally:
        requester.kill()
        requester.wait(10)
    _wait_until(lambda: _received(slow) == set(study.sop_uids), "every instance at the destination")
    _wait_until(lambda: "finished: 6 completed" in server.log(), "the job finished by the runner")
    assert "taken over (its lease ran out): " in server.log()
