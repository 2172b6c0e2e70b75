"""The metadata warmer (``bastion.dicomweb.metadata.MetadataWarmer``) gives way to ingest.

In process, with a real archive (SQLite index, filesystem blob store) and objects stored through the one ingest
pipeline while the warmer follows the change log.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from conftest import make_study, run_bastion

from bastion.archive import Archive
from bastion.dicomweb.metadata import MetadataCache, MetadataWarmer, cache_directory
from bastion.index import LogPosition
from bastion.settings import load_settings

pytestmark = pytest.mark.timeout(120)


class RecordingWarmer(MetadataWarmer):
    """The real warmer, noting how many changes each of its batches handled while objects kept arriving."""

    def __init__(self, *args: object, arriving: threading.Event, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.arriving = arriving
        self.batches_while_arriving: list[int] = []

    def run_once(self, since: LogPosition, limit: int | None = None) -> LogPosition:
        after = super().run_once(since, limit)
        if self.arriving.is_set() and after.seq > since.seq:
            self.batches_while_arriving.append(after.seq - since.seq)
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


def _caught_up(warmer: MetadataWarmer) -> LogPosition:
    """Run the warmer's batches (as its thread does) until the change log has nothing more for it."""
    position = warmer.position()
    while True:
        after = warmer.run_once(position)
        if after == position:
            return position
        position = after


def test_after_an_index_rebuild_the_warmer_warms_what_is_stored_next(tmp_path: Path) -> None:
    """`bastion index rebuild` makes a new change log. The warmer kept its position in the old one; before the
    log had epochs and a floor, the rebuilt log's seq started over at 1, and the warmer skipped every object
    stored after the rebuild until the new log passed its old position (here the old log is longer: objects
    whose files were removed are not in the rebuilt one)."""
    study = make_study(tmp_path / "study", series=1, per_series=12)
    data = tmp_path / "data"
    settings = load_settings(None, env={}, data=data)
    directory = cache_directory(data)
    checkpoint = directory.parent / "metadata-warmer.seq"

    def warmer_of(archive: Archive) -> MetadataWarmer:  # a new one per process, as `bastion serve` starts it
        return MetadataWarmer(archive.index, MetadataCache(archive.retriever, directory, max_entries=0),
                              checkpoint, quiet_s=0)

    archive = Archive.open(settings)
    try:
        stored = [archive.ingest.store_bytes(f.read_bytes(), "test").record for f in study.files[:10]]
        warmer = warmer_of(archive)
        position = _caught_up(warmer)
        assert warmer.built == 10 and LogPosition.parse(checkpoint.read_text()) == position
    finally:
        archive.close()
    for record in stored[:6]:  # their files are gone: the rebuilt index does not have them
        (data / "blobs" / record.blob_key).unlink()
    proc = run_bastion("index", "rebuild", "--data", str(data))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    archive = Archive.open(settings)
    try:
        assert archive.index.statistics().instances == 4
        later = [archive.ingest.store_bytes(f.read_bytes(), "test").record for f in study.files[10:]]
        warmer = warmer_of(archive)
        assert warmer.position() == position  # its old position, in a log that is gone
        after = _caught_up(warmer)
        assert after.epoch != position.epoch and after == archive.index.log_end()
        assert warmer.built == 2  # the four it had written already cost a stat each
    finally:
        archive.close()
    cache = MetadataCache.__new__(MetadataCache)
    cache.directory = directory
    for record in [*stored[6:], *later]:
        path = cache._file(record.blob_key)
        assert path is not None and path.exists(), record.sop_uid


def test_a_deleted_instance_loses_its_cache_entry(archive: Archive, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", series=1, per_series=2)
    records = [archive.ingest.store_bytes(f.read_bytes(), "test").record for f in study.files]
    directory = cache_directory(tmp_path / "data")
    cache = MetadataCache(archive.retriever, directory, max_entries=0)
    warmer = MetadataWarmer(archive.index, cache, directory.parent / "metadata-warmer.seq", quiet_s=0)
    _caught_up(warmer)
    entries = [cache._file(r.blob_key) for r in records]
    assert all(p is not None and p.exists() for p in entries)
    assert archive.index.delete_instance(records[0].sop_uid) is not None
    _caught_up(warmer)
    assert entries[0] is not None and not entries[0].exists()
    assert entries[1] is not None and entries[1].exists()


def test_where_nodes_share_the_index_each_warms_what_it_stored(tmp_path: Path) -> None:
    """Two nodes share one index and blob store: the warmer of node a builds the entries of what node a stored
    only (node b's warmer builds node b's); neither reads every object back."""
    shared = {"index": str(tmp_path / "shared" / "index.sqlite3"), "blobs": str(tmp_path / "shared" / "blobs")}
    nodes = [Archive.open(load_settings(None, env={}, data=tmp_path / name, node_id=name, **shared))
             for name in ("node-a", "node-b")]
    try:
        study = make_study(tmp_path / "study", series=1, per_series=2)
        records = [node.ingest.store_bytes(f.read_bytes(), "test").record for node, f in zip(nodes, study.files,
                                                                                              strict=True)]
        directory = cache_directory(tmp_path / "node-a")
        cache = MetadataCache(nodes[0].retriever, directory, max_entries=0)
        warmer = MetadataWarmer(nodes[0].index, cache, directory.parent / "metadata-warmer.seq", quiet_s=0,
                                only_node="node-a")
        _caught_up(warmer)
        built = [cache._file(r.blob_key) for r in records]
        assert built[0] is not None and built[0].exists()
        assert built[1] is not None and not built[1].exists()
        assert warmer.built == 1
    finally:
        for node in nodes:
            node.close()
