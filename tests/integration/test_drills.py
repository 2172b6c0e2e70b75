"""``bastion drill``: each failure drill, run through the CLI at a small size, reports no loss.

The figures asserted are the zero-loss ones (``lost``, ``corrupt_served``, ``failed_reads``, ``ok``); the
seconds are reported by the drills, never asserted here. A drill that cannot run here (``skipped``: e.g. no right
to mount the full-disk drill's tmpfs) skips on a developer's machine and fails under ``CI=true``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import backends
import pytest
from conftest import BASTION, run_bastion, unavailable

from bastion.drills import harness, readback

pytestmark = [pytest.mark.timeout(420),
              pytest.mark.skipif(backends.REMOTE, reason="the drills run their own server on the embedded backends")]

SMALL = ("--instances", "60", "--timeout", "120", "--seed", "22")


def run_drill(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``bastion drill ARGS`` with its work directory under ``tmp_path`` (a drill that is not ok keeps it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_") or k == "BASTION_PURE_PYTHON"}
    return subprocess.run([BASTION, "drill", *args], capture_output=True, text=True, timeout=400, check=False,
                          env=env | {"TMPDIR": str(tmp_path)})


def drill(tmp_path: Path, scenario: str, *args: str) -> dict[str, Any]:
    """Run ``bastion drill SCENARIO --json`` at a small size; its JSON report, checked for the zero-loss figures."""
    proc = run_drill(tmp_path, scenario, *SMALL, *args, "--json")
    assert proc.stdout.strip(), f"no report (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    report: dict[str, Any] = json.loads(proc.stdout)
    if report.get("skipped"):  # no right to mount a tmpfs (full-disk), say: a skip, but not under CI=true
        unavailable(f"{scenario}: {report['skipped']}")
    detail = f"{json.dumps(report, indent=1)}\n{proc.stderr[-3000:]}"
    assert report["scenario"] == scenario
    assert report["instances"] == 60
    assert report["lost"] == 0, detail
    assert report["corrupt_served"] == 0, detail
    assert report["failed_reads"] == 0, detail
    assert report["ok"] is True, detail
    assert proc.returncode == 0, detail
    return report


def test_kill_node(tmp_path: Path) -> None:
    report = drill(tmp_path, "kill-node", "--rounds", "2")
    assert report["rounds"] == 2
    assert report["lost_per_round"] == [0, 0]
    assert report["acknowledged"] == 60
    assert report["verify_ok"] is True
    assert len(report["seconds_to_serve"]) == 2


def test_lose_index(tmp_path: Path) -> None:
    report = drill(tmp_path, "lose-index")
    assert report["acknowledged"] == 60
    assert report["qido_identical"] is True
    assert report["verify_ok"] is True


def test_lose_copy(tmp_path: Path) -> None:
    report = drill(tmp_path, "lose-copy")
    assert report["copies_store1"] == report["copies_store2"] == report["acknowledged"]


def test_bit_rot(tmp_path: Path) -> None:
    report = drill(tmp_path, "bit-rot", "--flips", "6")
    assert report["flipped"] == 6
    assert report["repaired"] == 6


def test_full_disk(tmp_path: Path) -> None:
    report = drill(tmp_path, "full-disk")
    assert report["store_failures"] == 0
    assert report["partial_files"] == 0
    assert report["acknowledged"] == 60


def test_an_instance_never_acknowledged_is_not_counted_and_the_drill_fails(tmp_path: Path) -> None:
    """A server refusing the drill's SOP class acknowledges nothing: the drill says so, exits 1 and keeps its work
    directory."""
    proc = run_drill(tmp_path, "kill-node", "--instances", "10", "--rounds", "1", "--timeout", "3", "--json",
                     "--setting", "storage_deny=1.2.840.10008.5.1.4.1.1.2")
    report = json.loads(proc.stdout)
    assert report["acknowledged"] == 0, report
    assert report["ok"] is False
    assert proc.returncode == 1
    assert report["workdir"] and (Path(report["workdir"]) / "server-1.log").exists()


def test_bad_arguments_exit_2() -> None:
    assert run_bastion("drill", "no-such-scenario").returncode == 2
    assert run_bastion("drill", "kill-node", "--setting", "novalue").returncode == 2


def test_the_measures_see_damage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The drills' own measuring sees what it must: a stored file changed in its pixels is a corrupt or failed read,
    a stored file removed a failed read; the intact ones read back byte for byte."""
    from pynetdicom import _config

    # The loader sends files as they are (a pynetdicom global): put it back for the other tests afterwards.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", _config.STORE_SEND_CHUNKED_DATASET)
    instances = harness.make_instances(4, tmp_path / "instances")
    server = harness.ServerProcess(tmp_path, tmp_path / "data")
    server.start()
    try:
        loader = harness.Loader(server.dicom_port, instances).start()
        loader.join(60)
        assert len(loader.acked) == 4, loader.statuses
        assert readback.indexed_sops(server.base_url) == {i.sop for i in instances}
        assert readback.check_all(server.base_url, instances) == (0, 0, [])
        files = {f.sop: f.path for f in harness.store_files(tmp_path / "data" / "blobs")}
        changed, removed = files[instances[0].sop], files[instances[1].sop]
        data = bytearray(changed.read_bytes())
        data[-1] ^= 0xFF  # the last pixel byte
        changed.write_bytes(bytes(data))
        removed.unlink()
        assert readback.retrieve(server.base_url, instances[0])[0] in ("corrupt", "failed")
        assert readback.retrieve(server.base_url, instances[1])[0] == "failed"
        failed, corrupt, _ = readback.check_all(server.base_url, instances)
        assert failed + corrupt == 2
    finally:
        server.stop()
