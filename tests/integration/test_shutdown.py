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
