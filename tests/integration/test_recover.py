"""After an unclean shutdown, objects whose index commits were lost are indexed again from the blobs.

Simulates a power failure that kept the fsync'd blobs but lost the index's last commits
(SQLite ``synchronous=NORMAL``): the index file is rolled back to an earlier copy and the
``.running`` marker is left behind.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from conftest import BastionServer, make_study, run_bastion
from pydicom.uid import generate_uid

from bastion.archive import RUNNING_MARKER, Archive
from bastion.model import digest
from bastion.model.levels import QueryLevel
from bastion.model.records import object_key
from bastion.settings import load_settings


def test_recover_indexes_what_the_index_lost(tmp_path: Path) -> None:
    settings = load_settings(None, env={}, data=tmp_path / "data")
    study = make_study(tmp_path / "study", series=1, per_series=5)
    files = study.files

    archive = Archive.open(settings)
    for path in files[:3]:
        archive.ingest.store_bytes(path.read_bytes(), "test")
    archive.close()
    index_file = Path(settings.index_location)
    shutil.copy(index_file, tmp_path / "index-before.sqlite3")

    archive = Archive.open(settings)
    for path in files[3:]:
        archive.ingest.store_bytes(path.read_bytes(), "test")
    expected = archive.index.statistics()
    archive.close()

    # The power fails: the last two index commits are lost, the blobs are not; no clean shutdown.
    shutil.copy(tmp_path / "index-before.sqlite3", index_file)
    (settings.data / RUNNING_MARKER).write_text("crashed")

    archive = Archive.open(settings)
    try:
        after = archive.index.statistics()
        assert (after.instances, after.series, after.studies) == (expected.instances, expected.series,
                                                                  expected.studies) == (5, 1, 1)
        assert {r.sop_uid for r in archive.retriever.select(QueryLevel.IMAGE, [])} == set(study.sop_uids)
    finally:
        archive.close()
    assert (settings.data / RUNNING_MARKER).read_text() == "clean"


def test_a_second_opener_does_not_mark_a_running_archive_clean(tmp_path: Path) -> None:
    """`bastion import` next to a running server must not hide a later crash of the server."""
    settings = load_settings(None, env={}, data=tmp_path / "data")
    marker = settings.data / RUNNING_MARKER
    server = Archive.open(settings)
    importer = Archive.open(settings)
    importer.close()
    assert marker.read_text().startswith("running"), "the importer marked a running archive clean"
    server.close()
    assert marker.read_text() == "clean"


def test_recover_does_not_index_an_incomplete_unacknowledged_file(tmp_path: Path) -> None:
    """The power failed after an object's file was written but before it was durable (so before it was
    acknowledged): the file may be cut short. Recovery checks each object against the digest in its key, and
    sets one that does not match aside in blobs/.quarantine (a kill -9 between creating an object's file and
    its journal record leaves the same: an empty file)."""
    settings = load_settings(None, env={}, data=tmp_path / "data")
    study = make_study(tmp_path / "study", series=1, per_series=3)
    archive = Archive.open(settings)
    for path in study.files[:2]:
        archive.ingest.store_bytes(path.read_bytes(), "test")
    index_file = Path(settings.index_location)
    archive.close()
    shutil.copy(index_file, tmp_path / "index-before.sqlite3")

    archive = Archive.open(settings)
    result = archive.ingest.store_bytes(study.files[2].read_bytes(), "test")
    archive.close()
    # Power failure: the last index commit is gone, and the third object's file has its full size but its
    # second half never reached the disk (zeros): its header still parses and its Pixel Data looks complete.
    shutil.copy(tmp_path / "index-before.sqlite3", index_file)
    blob = settings.data / "blobs" / result.record.blob_key
    data = blob.read_bytes()
    blob.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))
    (settings.data / RUNNING_MARKER).write_text("crashed")

    archive = Archive.open(settings)
    try:
        indexed = {r.sop_uid for r in archive.retriever.select(QueryLevel.IMAGE, [])}
        assert indexed == set(study.sop_uids[:2]), "a damaged, never-acknowledged object was indexed"
    finally:
        archive.close()
    assert not blob.exists(), "the torn file was left behind for verify to report"
    aside = settings.data / "blobs" / ".quarantine" / result.record.blob_key
    assert aside.read_bytes()[: len(data) // 2] == data[: len(data) // 2], "the torn file was not kept aside"
    verify = run_bastion("verify", "--data", str(settings.data))
    assert verify.returncode == 0 and "0 stored but not indexed" in verify.stdout, verify.stdout
    assert "1 torn or invalid write(s) that crash recovery set aside" in verify.stdout, verify.stdout
    server = BastionServer(settings.data).start()
    try:
        assert server.stats()["storage"]["set_aside"] == 1  # on the admin page too, for whoever is on call
    finally:
        server.stop()


def test_recover_sets_aside_an_object_that_failed_its_checks(tmp_path: Path) -> None:
    """A C-STORE's object is written under the command's SOP Instance UID before its header is checked, and one
    that fails is removed again once the check fails. If the power fails in between, recovery finds it
    unindexed under a key that its content contradicts: it was never acknowledged, and is set aside."""
    settings = load_settings(None, env={}, data=tmp_path / "data")
    study = make_study(tmp_path / "study", series=1, per_series=2)
    archive = Archive.open(settings)
    archive.ingest.store_bytes(study.files[0].read_bytes(), "test")
    data = study.files[1].read_bytes()
    command_uid = generate_uid()  # not the dataset's own
    key = object_key(command_uid, f"{time.time_ns():020d}", digest.text(digest.of_bytes(data)))
    archive.blobs.put(key, data)
    archive.close()
    (settings.data / RUNNING_MARKER).write_text("crashed")

    archive = Archive.open(settings)
    try:
        indexed = {r.sop_uid for r in archive.retriever.select(QueryLevel.IMAGE, [])}
        assert indexed == {study.sop_uids[0]}, "an object that differs from its key was indexed"
        assert not archive.blobs.exists(key)
    finally:
        archive.close()
    assert (settings.data / "blobs" / ".quarantine" / key).read_bytes() == data
