"""``bastion index rebuild`` against a running server: the server rebuilds its index online.

A real ``bastion serve`` whose live index lost rows (deleted behind its back, so queries miss instances) is asked
to rebuild by the CLI: it builds a new index beside the live one while it goes on storing and answering, then its
supervisor switches the new index in during a short pause. Afterwards the answers are whole again and identical to
those before the damage, every C-STORE sent meanwhile was acknowledged and is indexed, and nothing stored is lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backends import embedded_only
from conftest import BASTION, BastionServer, make_study
from test_self_rebuild import answers

pytestmark = [embedded_only, pytest.mark.timeout(180)]

STUDY_UID = "0020000D"
SOP_UID = "00080018"


def rebuild_state(server: BastionServer) -> dict[str, Any]:
    return dict(server.get_json("/api/index/rebuild"))


def of_studies(found: list[Any], studies: set[str]) -> list[Any]:
    """The QIDO answers (per level) of the studies ``studies`` only."""
    return [[r for r in level if r[STUDY_UID]["Value"][0] in studies] for level in found]


def indexed_sop_uids(server: BastionServer) -> set[str]:
    return {r[SOP_UID]["Value"][0] for r in answers(server)[2]}


@contextlib.contextmanager
def build_held(index: Path) -> Iterator[None]:
    """Keep an online rebuild from starting its build while inside: the build first reads the live index's change-log
    mark (``<index>-seqmark``) under a shared ``flock``, which this holds exclusively. Live stores do not take it (the
    mark is kept far ahead of the log: :mod:`bastion.index.seqmark`)."""
    fd = os.open(f"{index}-seqmark", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def damage(index: Path, sop_uids: list[str]) -> None:
    """Delete instances' rows from the live index behind the server's back (holding the writers' lock, as every
    writer of the index does, and checkpointing nothing)."""
    lock = os.open(f"{index}-writer.lock", os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = sqlite3.connect(index, timeout=30)
        try:
            conn.execute("PRAGMA wal_autocheckpoint=0")
            with conn:
                conn.executemany("DELETE FROM instances WHERE sop_uid = ?", [(uid,) for uid in sop_uids])
        finally:
            conn.close()
    finally:
        os.close(lock)


def until(condition: Any, what: str, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Sender(threading.Thread):
    """Sends studies with storescu, one after the other, until told to stop; keeps every result."""

    def __init__(self, server: BastionServer, work: Path) -> None:
        super().__init__(daemon=True)
        self.server, self.work = server, work
        self.stop = threading.Event()
        self.sent: list[tuple[subprocess.CompletedProcess[str], list[str]]] = []

    def run(self) -> None:
        n = 0
        while not self.stop.is_set() or n < 2:
            study = make_study(self.work / f"during-{n}", series=1, per_series=4, patient_name=f"During^{n}")
            self.sent.append((self.server.storescu(*study.files), study.sop_uids))
            n += 1


def test_rebuild_online_while_storing(bastion_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = bastion_factory()
    index = server.data / "index.sqlite3"
    studies = [make_study(tmp_path / f"s{i}", series=2, per_series=5, patient_name=f"Before^{i}") for i in range(4)]
    for study in studies:
        assert server.storescu(*study.files).returncode == 0
    before = answers(server)
    assert sum(len(level) for level in before) == 4 + 8 + 40
    kept = {s.study_uid for s in studies}

    damage(index, studies[0].sop_uids[:6] + studies[2].sop_uids[:3])
    assert len(answers(server)[2]) == 40 - 9  # the queries notice
    assert rebuild_state(server)["state"] == "idle"

    # The CLI finds the archive in use and asks the server (settings from the environment: its HTTP port).
    monkeypatch.setenv("BASTION_HTTP_PORT", str(server.http_port))
    monkeypatch.setenv("BASTION_HOST", "0.0.0.0")  # a wildcard host is asked on loopback
    sender = Sender(server, tmp_path / "during")
    with build_held(index):
        cli = subprocess.Popen([BASTION, "index", "rebuild", "--data", str(server.data)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        until(lambda: rebuild_state(server)["state"] == "building", "the rebuild to start")
        sender.start()  # stores while the new index is built: the live index records them, queries answer
        until(lambda: len(sender.sent) >= 2, "two studies stored during the build")
        assert server.get_json("/health")["status"] == "ok"
        assert rebuild_state(server)["state"] == "building"
    out, err = cli.communicate(timeout=120)
    sender.stop.set()
    sender.join(120)
    assert cli.returncode == 0, err
    assert "index rebuilt from " in out and " 0 skipped" in out, out

    state = rebuild_state(server)
    assert state["state"] == "done" and state["error"] is None, state
    assert state["total"] >= 40 and state["done"] == state["total"], state
    assert state["pause_s"] is not None and state["pause_s"] >= 0
    print(f"online rebuild: {state['total']} replayed, {state['report']['caught_up']} caught up, "
          f"switch pause {state['pause_s']:.2f} s")  # the measured pause, in the test log

    for proc, _ in sender.sent:
        assert proc.returncode == 0, proc.stderr  # every C-STORE acknowledged, through the switch too
    assert of_studies(answers(server), kept) == before  # whole again, identical to before the damage
    sent = {uid for _, uids in sender.sent for uid in uids}
    stored = {uid for s in studies for uid in s.sop_uids}
    assert indexed_sop_uids(server) == stored | sent  # nothing stored is lost, nothing else appears
    assert server.get_json("/health")["status"] == "ok"


def test_rebuild_online_refuses_a_second_and_survives_a_restart(bastion_factory: Any, tmp_path: Path) -> None:
    server = bastion_factory()
    study = make_study(tmp_path / "s", series=1, per_series=3)
    assert server.storescu(*study.files).returncode == 0
    index = server.data / "index.sqlite3"

    def post() -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(server.url("/api/index/rebuild"), data=b"", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as rsp:
                return rsp.status, json.loads(rsp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    with build_held(index):
        code, first = post()
        assert code == 202 and first["state"] == "building"
        code, second = post()
        assert code == 409 and "already" in second["error"]
        server.stop()  # stopped while it builds: the build is dropped, the live index stays
    server = bastion_factory(server.data)
    state = rebuild_state(server)
    assert state["state"] == "failed" and "stopped" in state["error"], state
    assert not Path(f"{index}.rebuild").exists()
    assert len(answers(server)[2]) == 3
