"""Re-sent objects through the store pipeline, in process: a duplicate is recorded once and leaves one blob,
whether the index transaction finds it (small objects: the copy is written, then removed) or the pipeline looks
it up before writing (objects from ``PRECHECK_BYTES``: nothing is written)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import make_ct_series

from bastion.archive import Archive
from bastion.blobs.file_writer import FileWriter
from bastion.blobs.s3 import S3Writer
from bastion.cli import main as cli
from bastion.ingest import pipeline
from bastion.model.records import StoreStatus
from bastion.settings import load_settings


@pytest.fixture
def commits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys the blob store (filesystem or S3) was asked to commit."""
    keys: list[str] = []
    for writer in (FileWriter, S3Writer):
        real = writer.start_commit

        def start_commit(self: Any, key: str, real: Any = real, **options: Any) -> Any:
            keys.append(key)
            return real(self, key, **options)

        monkeypatch.setattr(writer, "start_commit", start_commit)
    return keys


def _blob_files(archive: Archive) -> list[Path]:
    """The stored objects (their keys, as paths)."""
    return [Path(key) for key in archive.blobs.keys()]


@pytest.mark.parametrize("size", [64, 768])  # 64x64: ~9 KB, journaled; 768x768: ~1.2 MB, from PRECHECK_BYTES
def test_a_resent_object_is_a_duplicate_with_one_blob(archive: Archive, commits: list[str], tmp_path: Path,
                                                      size: int) -> None:
    study = make_ct_series(tmp_path / "study", slices=1, size=size)
    data = study.files[0].read_bytes()
    large = len(data) >= pipeline.PRECHECK_BYTES
    assert large == (size == 768)
    first = archive.ingest.store_bytes(data, "test")
    again = archive.ingest.store_bytes(data, "test")
    assert first.status is StoreStatus.STORED
    assert again.status is StoreStatus.DUPLICATE and again.record == first.record
    assert len(commits) == (1 if large else 2)  # a large copy is not written again; a small one is, then removed
    assert [p.name for p in _blob_files(archive)] == [first.record.blob_key.rsplit("/", 1)[1]]
    stats = archive.index.statistics()
    assert (stats.instances, stats.versions) == (1, 0)


def test_importing_a_stored_folder_again_writes_nothing(commits: list[str], tmp_path: Path) -> None:
    """``bastion import`` asks the index first whatever the size: a folder imported twice is not written (and its
    copies removed) a second time, which would also slow file creation after the mass deletion."""
    study = make_ct_series(tmp_path / "study", slices=4, size=64)
    data = tmp_path / "data"
    assert cli.main(["import", "--data", str(data), str(tmp_path / "study")]) == 0
    assert len(commits) == len(study.files)
    assert cli.main(["import", "--data", str(data), str(tmp_path / "study")]) == 0
    assert len(commits) == len(study.files)  # the second import found every object in the index first
    archive = Archive.open(load_settings(None, env={}, data=data))  # the import's embedded archive
    try:
        assert archive.index.statistics().instances == len(study.files)
        assert len(_blob_files(archive)) == len(study.files)
    finally:
        archive.close()
