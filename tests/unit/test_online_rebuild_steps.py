"""The online rebuild's steps in one process (:mod:`bastion.ingest.online_rebuild`): the build beside a live index
that goes on storing, the switch (what was stored since caught up, then the swap), a switch a crash cut short
after the swap, and a build the server's stop cut short. Real files, real SQLite; the server around them is
``tests/integration/test_online_rebuild.py``'s."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from backends import embedded_only
from conftest import make_study

from bastion.archive import Archive, open_blobs
from bastion.index import open_index
from bastion.ingest.online_rebuild import OnlineRebuild, RebuildState, read_state, switch_in, write_state
from bastion.model.records import parse_object_key
from bastion.settings import load_settings

pytestmark = [embedded_only, pytest.mark.timeout(120)]


def _store(archive: Archive, files: list[Path]) -> None:
    for f in files:
        assert archive.ingest.store_bytes(f.read_bytes(), "test").status.value == "stored"


def _built(archive: Archive) -> tuple[OnlineRebuild, threading.Event]:
    """An online rebuild of ``archive``'s index, begun; the event is set when it asks for the switch."""
    asked = threading.Event()
    online = OnlineRebuild(archive.blobs, archive.index, archive.settings.data, ask_switch=asked.set)
    online.begin()
    return online, asked


def _indexed(data: Path) -> set[str]:
    index = open_index(str(data / "index.sqlite3"))
    try:
        return {(parse_object_key(v.blob_key) or {})["sop"] for v in index.versions() if v.current}
    finally:
        index.close()


def test_what_is_stored_after_the_build_is_indexed_at_the_switch(tmp_path: Path) -> None:
    settings = load_settings(None, env={}, data=tmp_path / "data")
    before = make_study(tmp_path / "before", series=1, per_series=4)
    after = make_study(tmp_path / "after", series=1, per_series=3)
    archive = Archive.open(settings)
    _store(archive, before.files)
    online, asked = _built(archive)
    assert asked.wait(60)
    assert online.state().state == "switching" and online.state().report["indexed"] == 4
    _store(archive, after.files)  # stored after the build and its catch-up: the live index has them, the new not
    archive.close()

    blobs = open_blobs(settings)
    try:
        state = switch_in(blobs, settings.index_location, settings.data, began=1.0)
    finally:
        blobs.close()
    assert state.state == "done" and state.report["caught_up"] == 3 and state.switch_began == 1.0
    assert read_state(settings.data) == state
    assert _indexed(settings.data) == set(before.sop_uids) | set(after.sop_uids)
    assert not Path(settings.index_location + ".rebuild").exists()


def test_a_switch_cut_short_after_the_swap_is_done_at_the_next_try(tmp_path: Path) -> None:
    settings = load_settings(None, env={}, data=tmp_path / "data")
    settings.data.mkdir(parents=True)
    write_state(settings.data, RebuildState(state="switching", total=0))  # and no new index beside: swapped
    blobs = open_blobs(settings)
    try:
        assert switch_in(blobs, settings.index_location, settings.data).state == "done"
    finally:
        blobs.close()


def test_a_build_the_stop_cut_short_is_failed_and_dropped(tmp_path: Path) -> None:
    settings = load_settings(None, env={}, data=tmp_path / "data")
    study = make_study(tmp_path / "s", series=1, per_series=3)
    archive = Archive.open(settings)
    _store(archive, study.files)
    try:
        (settings.data / "index-rebuild-online.json").write_text('{"state": "building", "done": 7}')
        online = OnlineRebuild(archive.blobs, archive.index, settings.data, ask_switch=lambda: None)
        state = online.state()
        assert state.state == "failed" and "stopped" in (state.error or "") and state.done == 7
        online.begin()
        online.stop()  # the server stops: at once, or after the build asked for the switch
        assert online.state().state in ("failed", "switching")
    finally:
        archive.close()
    assert _indexed(settings.data) == set(study.sop_uids)  # the live index is as it was
