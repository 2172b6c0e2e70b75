"""A full disk: C-STORE answers 0xA700 (Out of Resources), nothing half-stored, the server keeps serving.

The data directory is a small tmpfs mounted for the test (needs root, as in CI).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from backends import embedded_only
from conftest import make_study, run_bastion, unavailable

pytestmark = [pytest.mark.timeout(120), embedded_only]  # a full filesystem under the blob directory


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0:
        unavailable("the disk-full test needs root to mount a tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        unavailable(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_store_on_a_full_disk_is_refused_cleanly(small_disk: Path, tmp_path: Path, bastion_factory) -> None:
    server = bastion_factory(small_disk / "data")
    # 64x64 instances are ~8 KB: start with room, then fill the disk with a ballast file.
    study = make_study(tmp_path / "study", series=1, per_series=6)
    # One CT-sized instance too (512 KB): written with O_DIRECT and flushed by a commit thread, not the journal.
    ct = make_study(tmp_path / "ct", series=1, per_series=1, kind="ct")
    first, rest = study.files[:2], [*study.files[2:], *ct.files]
    assert server.storescu(*first).returncode == 0
    stored_before = server.stats()["instances"]
    assert stored_before == 2

    ballast = small_disk / "ballast"
    with open(ballast, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass

    done = server.storescu(*rest, options=["-v"])
    output = (done.stdout or "") + (done.stderr or "")
    assert "Refused: OutOfResources" in output, output[-2000:]  # 0xA700 (PS3.4 B.2.3)
    ballast.unlink()

    # Nothing partial: the refused objects are neither indexed nor left in the blob store or spool.
    assert server.stats()["instances"] == stored_before
    assert server.spool_files() == []
    assert len(server.blob_files()) == stored_before
    assert "no space left" in server.log().lower()
    # The server keeps serving, and stores again once there is room.
    assert server.echo().returncode == 0
    assert server.storescu(*rest).returncode == 0
    assert server.stats()["instances"] == stored_before + len(rest)
    server.stop()
    verify = run_bastion("verify", "--data", str(small_disk / "data"))
    assert verify.returncode == 0, verify.stdout + verify.stderr
