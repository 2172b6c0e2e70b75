"""The metadata warmer (``bastion.dicomweb.metadata.MetadataWarmer``) gives way to ingest.

In process, with a real archive (SQLite index, filesystem blob store) and objects stored through the one ingest
pipeline while the warmer follows the change log.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_study

from bastion.archive import Archive
from bastion.dicomweb.metadata import MetadataCache, MetadataWarmer, cache_directory
from bastion.settings import load_settings

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    opened = Archive.open(load_settings(None, env={}, data=tmp_path / "data"))
    yield opened
    opened.close()


class RecordingWarmer(MetadataWarmer):
    """The real warmer, noting how many changes each of its batches handled while objects kept arriving."""

    def __init__(self, *args: object, arriving: threading.Event, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.arriving = arriving
        self.batches_while_arriving: list[int] = []

    def run_once(self, since: int, limit: int | None = None) -> int:
        after = super().run_once(since, limit)
        if self.arriving.is_set() and after > since:
            self.batches_while_arriving.append(after - since)
        return after


def test_rest_after_keeps_the_warmer_to_its_share() -> None:
    warmer = MetadataWarmer.__new__(MetadataWarmer)
    warmer.busy_share = 0.1
    assert warmer.rest_after(0.05) == pytest.approx(0.45)
    warmer.busy_share = 0.5
    assert warmer.rest_after(0.2) == pytest.approx(0.2)


def test_busy_share_out_of_range_is_refused(archive: Archive, tmp_path: Path) -> None:
    cache = MetadataCache(archive.retriever, tmp_path / "cache", max_entries=0)
    with pytest.raises(ValueError):
        MetadataWarmer(archive.index, cache, tmp_path / "seq", busy_share=0)


def test_under_long_ingest_the_warmer_works_in_small_batches_and_catches_up_after(
        archive: Archive, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", series=6, per_series=20)
    data = [f.read_bytes() for f in study.files]
    arriving = threading.Event()
    arriving.set()
    directory = cache_directory(tmp_path / "data")
    warmer = RecordingWarmer(archive.index, MetadataCache(archive.retriever, directory, max_entries=0),
                             directory.parent / "metadata-warmer.seq", backlog=0, interval_s=0.01,
                             quiet_s=0.01, max_lag_s=0.0, busy_batch=3, busy_share=0.2, arriving=arriving)
    warmer.start()
    try:
        # Objects keep arriving, one after another: every look at the change log finds new ones.
        for blob in data:
            assert archive.ingest.store_bytes(blob, "test").status.name == "STORED"
        arriving.clear()
        done = threading.Event()
        for _ in range(600):
            if warmer.built >= len(data) - 1:
                break
            done.wait(0.1)
    finally:
        warmer.stop()
    assert warmer.batches_while_arriving, "the warmer made no progress while objects kept arriving"
    assert max(warmer.batches_while_arriving) <= 3
    cached = list(directory.rglob("*.json"))
    assert len(cached) >= len(data) - 1  # everything after the first change it saw, once arrivals stopped
