"""Versions of one SOP instance keep the order they were stored in when the clock goes backwards across a
restart (an NTP step, a virtual machine restored from a snapshot): live, and after ``bastion index rebuild``."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from conftest import make_study, run_bastion

from bastion.archive import STAMP_CEILING_FILE, Archive
from bastion.model.records import StoreStatus, parse_object_key
from bastion.settings import load_settings

pytestmark = pytest.mark.timeout(120)

HOUR_NS = 3600 * 1_000_000_000


def _an_hour_back() -> int:
    return time.time_ns() - HOUR_NS


@pytest.mark.parametrize("ceiling_kept", [True, False], ids=["ceiling-file", "index-only"])
def test_a_version_stored_after_the_clock_went_back_supersedes_the_older_one(tmp_path: Path,
                                                                             ceiling_kept: bool) -> None:
    """Without the ceiling file (an archive from before it) the newest stamp in the index is the floor."""
    settings = load_settings(None, env={}, data=tmp_path / "data")
    study = make_study(tmp_path / "study", series=1, per_series=1)
    v1 = study.files[0].read_bytes()
    ds = pydicom.dcmread(study.files[0])
    ds.StudyDescription = "CORRECTED AFTER THE CLOCK WENT BACK"
    changed = tmp_path / "v2.dcm"
    ds.save_as(changed, enforce_file_format=True)

    archive = Archive.open(settings)
    try:
        first = archive.ingest.store_bytes(v1, "test")
    finally:
        archive.close()
    if not ceiling_kept:
        (settings.data / STAMP_CEILING_FILE).unlink()

    archive = Archive.open(settings, clock=_an_hour_back)  # the restart finds the clock an hour back
    try:
        second = archive.ingest.store_bytes(changed.read_bytes(), "test")
        third = archive.ingest.store_bytes(make_study(tmp_path / "other", series=1, per_series=1).files[0]
                                           .read_bytes(), "test")
        assert second.status is StoreStatus.SUPERSEDED
        current = archive.index.current(study.sop_uids[0])
        assert current is not None and current.blob_key == second.record.blob_key
    finally:
        archive.close()
    stamps = [parse_object_key(r.record.blob_key)["stamp"] for r in (first, second, third)]  # type: ignore[index]
    assert stamps[0] < stamps[1] < stamps[2]

    rebuilt = run_bastion("index", "rebuild", "--data", str(settings.data))
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    archive = Archive.open(settings)
    try:
        current = archive.index.current(study.sop_uids[0])
        assert current is not None and current.blob_key == second.record.blob_key, "rebuild undid the order"
        assert archive.index.statistics().versions == 1
    finally:
        archive.close()


def test_nodes_sharing_an_index_follow_the_order_it_recorded_versions_in_whatever_their_clocks(tmp_path: Path) -> None:
    """Node B's clock is an hour behind node A's. A version B stores after A's is recorded is current (B stores it
    again above A's stamp, a Lamport clock's rule), B's later stamps stay above A's, and a rebuild agrees."""
    shared = {"index": str(tmp_path / "shared" / "index.sqlite3"), "blobs": str(tmp_path / "shared" / "blobs")}
    a_settings = load_settings(None, env={}, data=tmp_path / "a", node_id="node-a", **shared)
    b_settings = load_settings(None, env={}, data=tmp_path / "b", node_id="node-b", **shared)
    study = make_study(tmp_path / "study", series=1, per_series=1)
    ds = pydicom.dcmread(study.files[0])
    ds.StudyDescription = "CORRECTED ON NODE B"
    changed = tmp_path / "v2.dcm"
    ds.save_as(changed, enforce_file_format=True)

    a = Archive.open(a_settings)
    b = Archive.open(b_settings, clock=_an_hour_back)
    try:
        first = a.ingest.store_bytes(study.files[0].read_bytes(), "node a")
        second = b.ingest.store_bytes(changed.read_bytes(), "node b")
        later = b.ingest.store_bytes(make_study(tmp_path / "other", series=1, per_series=1).files[0].read_bytes(),
                                     "node b")
        assert second.status is StoreStatus.SUPERSEDED
        current = a.index.current(study.sop_uids[0])
        assert current is not None and current.blob_key == second.record.blob_key
        assert current.digest != first.record.digest
    finally:
        a.close()
        b.close()
    stamps = [parse_object_key(r.record.blob_key)["stamp"] for r in (first, second, later)]  # type: ignore[index]
    assert stamps[0] < stamps[1] < stamps[2]

    rebuilt = run_bastion("index", "rebuild", "--data", str(a_settings.data), "--index", shared["index"],
                          "--blobs", shared["blobs"])
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    archive = Archive.open(a_settings)
    try:
        current = archive.index.current(study.sop_uids[0])
        assert current is not None and current.blob_key == second.record.blob_key, "rebuild undid the order"
    finally:
        archive.close()
