"""The index rebuilds itself at start: a real ``bastion serve`` that finds its index missing, empty or corrupt
while the blob store holds objects says so in one WARNING line, rebuilds it in the background while it serves
(``/health`` says "rebuilding", then "ok") and answers exactly as before.

On the ``postgresql+s3`` leg "missing" is the index's schema dropped (a new, empty one is made at start); the
corrupt-file case is the embedded index's own.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import backends
import pydicom
import pytest
from backends import embedded_only
from conftest import BastionServer, make_study
from pydicom.data import get_testdata_file

BOUNDARY = "self-rebuild-boundary"
#: Where the server keeps the note of a rebuild under way (:data:`bastion.ingest.rebuild.REBUILD_FILE`).
REBUILD_FILE = "index-rebuild"
QUERIES = ("/dicom-web/studies?includefield=all", "/dicom-web/series?includefield=all",
           "/dicom-web/instances?includefield=all")


def stow(server: BastionServer, files: list[Path]) -> None:
    """STOW-RS ``files`` in one request; every one must be stored."""
    body = b"".join(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.read_bytes() + b"\r\n"
                    for f in files) + f"--{BOUNDARY}--\r\n".encode()
    request = urllib.request.Request(server.url("/dicom-web/studies"), data=body, method="POST", headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
        "Accept": "application/dicom+json"})
    with urllib.request.urlopen(request, timeout=60) as rsp:
        assert rsp.status == 200, rsp.read()
        answer = json.loads(rsp.read())
    assert "00081198" not in answer, answer  # FailedSOPSequence


def answers(server: BastionServer) -> list[Any]:
    """The full QIDO-RS answers at every level (but the Retrieve URL, which names the server's port)."""
    return [[{tag: value for tag, value in result.items() if tag != "00081190"} for result in server.get_json(q)]
            for q in QUERIES]


def health(server: BastionServer) -> dict[str, Any]:
    return dict(server.get_json("/health"))


def until_ok(server: BastionServer, timeout: float = 120.0) -> list[dict[str, Any]]:
    """Poll ``/health`` until it says "ok": every answer seen, the last one "ok"."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(health(server))
        if seen[-1]["status"] == "ok":
            return seen
        time.sleep(0.05)
    raise AssertionError(f"/health never said ok: {seen[-3:]}\n{server.log()}")


def versioned(src: Path, out: Path, comment: str) -> Path:
    """A copy of ``src`` (same SOP Instance UID) whose bytes differ: another version of the instance."""
    ds = pydicom.dcmread(src)
    ds.ImageComments = comment
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def drop_index(data: Path) -> None:
    """Lose the index: its SQLite database (and write-ahead log; the change log's mark stays), or its PostgreSQL
    schema (made again, empty, when the server starts)."""
    if backends.REMOTE:
        import psycopg

        schema = backends.remote_locations(data)["index"].rsplit("bastion_schema=", 1)[1]
        with psycopg.connect(backends.POSTGRESQL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        return
    for suffix in ("", "-wal", "-shm"):
        (data / f"index.sqlite3{suffix}").unlink(missing_ok=True)


def retrieve(server: BastionServer, study: str, series: str, sop: str) -> bytes:
    request = urllib.request.Request(server.url(f"/dicom-web/studies/{study}/series/{series}/instances/{sop}"),
                                     headers={"Accept": 'multipart/related; type="application/dicom"'})
    with urllib.request.urlopen(request, timeout=30) as rsp:
        return bytes(rsp.read())


@pytest.fixture
def stored(tmp_path: Path, bastion_factory: Any) -> Iterator[dict[str, Any]]:
    """A server's data directory holding two synthetic studies, pydicom's CT and MR samples and an instance stored
    in two versions; the answers and statistics it gave, and its change log's end, once it has stopped cleanly."""
    data = tmp_path / "data"
    server = bastion_factory(data)
    study = make_study(tmp_path / "a", series=2, per_series=3)
    other = make_study(tmp_path / "b", series=1, per_series=2, modality="MR")
    samples = [Path(get_testdata_file(name)) for name in ("CT_small.dcm", "MR_small.dcm")]
    stow(server, [*study.files, *other.files, *samples])
    first = study.series[next(iter(study.series))][0]
    stow(server, [versioned(first, tmp_path / "v2" / first.name, "A CORRECTED COPY")])
    before = answers(server)
    stats = server.stats()
    last = server.get_json("/api/changes?limit=10000")["last"]
    server.stop()
    assert stats["versions"] == 1 and stats["instances"] == 10, stats
    yield {"data": data, "answers": before, "stats": stats, "last_seq": last, "study": study}


def test_a_lost_index_is_rebuilt_at_start_with_identical_answers(stored: dict[str, Any],
                                                                   bastion_factory: Any) -> None:
    data = stored["data"]
    drop_index(data)
    server = bastion_factory(data)
    seen = until_ok(server)
    for answer in seen[:-1]:
        assert answer["status"] == "rebuilding", answer
        assert "rebuilt" in answer["reason"] and set(answer["rebuild"]) == {"done", "total"}, answer
    assert "rebuild" not in seen[-1]
    warnings = [line for line in server.log().splitlines()
                if " WARNING " in line and "rebuilding the index from the stored objects in the background" in line]
    assert len(warnings) == 1, server.log()
    assert ("is empty" if backends.REMOTE else "is missing") in warnings[0], warnings[0]
    # Once, by one process (the DICOM workers and the metadata warmer open the archive without rebuilding).
    assert server.log().count("index rebuilt from 11 stored object(s)") == 1, server.log()
    assert answers(server) == stored["answers"]
    stats = server.stats()
    for key in ("patients", "studies", "series", "instances", "versions", "stored_bytes"):
        assert stats[key] == stored["stats"][key], key
    changes = server.get_json("/api/changes?limit=10000")["changes"]
    assert len([c for c in changes if c["kind"] == "stored"]) == 11  # every version stored again, in a new log
    if not backends.REMOTE:  # the new log goes on after the lost one's mark: no seq is handed out twice
        assert min(c["seq"] for c in changes) > stored["last_seq"]
    assert not (data / REBUILD_FILE).exists()

    server.stop()  # a clean restart: nothing to rebuild
    server = bastion_factory(data)
    assert health(server)["status"] == "ok"
    assert "rebuilding the index" not in server.log()
    assert answers(server) == stored["answers"]


def test_stores_during_the_rebuild_are_kept_and_stay_current(stored: dict[str, Any], bastion_factory: Any,
                                                             tmp_path: Path) -> None:
    """A new version stored while the rebuild has not yet replayed the old one stays current; the replay counts
    what was recorded live once."""
    data = stored["data"]
    study = stored["study"]
    drop_index(data)
    # The rebuild waits while another process holds its note (as one opened alone before the server would):
    # the test holds it, so the server is surely still rebuilding while it stores.
    pending = data / REBUILD_FILE
    pending.write_text("the index was lost (test)\n")
    fd = os.open(pending, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        server = bastion_factory(data)
        answer = health(server)
        assert answer["status"] == "rebuilding", answer
        assert "the index was lost (test)" in answer["reason"]
        series_uid, files = next(iter(study.series.items()))
        first = files[0]
        sop = str(pydicom.dcmread(first, stop_before_pixels=True).SOPInstanceUID)
        newer = versioned(first, tmp_path / "v3" / first.name, "STORED DURING THE REBUILD")
        extra = make_study(tmp_path / "c", series=1, per_series=1)
        stow(server, [newer, *extra.files])
        partial = server.get_json("/dicom-web/instances?includefield=all")
        assert sorted(r["00080018"]["Value"][0] for r in partial) == sorted([sop, *extra.sop_uids])
        assert health(server)["status"] == "rebuilding"
    finally:
        os.close(fd)
    until_ok(server)
    body = retrieve(server, study.study_uid, series_uid, sop)
    assert b"STORED DURING THE REBUILD" in body and b"A CORRECTED COPY" not in body
    stats = server.stats()
    assert stats["instances"] == stored["stats"]["instances"] + 1, stats
    assert stats["versions"] == 2, stats  # the first and the corrected copy, superseded
    after = server.get_json("/dicom-web/instances?includefield=all")
    assert len(after) == len(stored["answers"][2]) + 1
    assert "2 indexed already" in server.log(), server.log()


def test_a_rebuild_cut_short_by_a_crash_goes_on_at_the_next_start(stored: dict[str, Any],
                                                                   bastion_factory: Any) -> None:
    data = stored["data"]
    drop_index(data)
    pending = data / REBUILD_FILE
    pending.write_text("the index was lost (test)\n")
    fd = os.open(pending, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the rebuild waits: it is surely under way when the server is killed
        server = bastion_factory(data)
        assert health(server)["status"] == "rebuilding"
        server.kill9()
    finally:
        os.close(fd)
    assert pending.exists()
    server = bastion_factory(data)
    until_ok(server)
    warnings = [line for line in server.log().splitlines() if " WARNING " in line and "rebuilding the index" in line]
    assert len(warnings) == 1 and "an earlier rebuild did not finish" in warnings[0], server.log()
    assert "did not shut down cleanly" in warnings[0], warnings[0]
    assert answers(server) == stored["answers"]
    assert not pending.exists()


@embedded_only  # the SQLite file's own corruption
def test_a_corrupt_index_file_is_set_aside_and_rebuilt(stored: dict[str, Any], bastion_factory: Any) -> None:
    data = stored["data"]
    for suffix in ("-wal", "-shm"):
        (data / f"index.sqlite3{suffix}").unlink(missing_ok=True)
    garbage = os.urandom(64 * 1024)
    (data / "index.sqlite3").write_bytes(garbage)
    server = bastion_factory(data)
    until_ok(server)
    aside = sorted(data.glob("index.sqlite3.corrupt-*"))
    assert [p.read_bytes() for p in aside if not p.name.endswith(("-wal", "-shm"))] == [garbage]
    warnings = [line for line in server.log().splitlines() if " WARNING " in line and "is corrupt" in line]
    assert len(warnings) == 1 and "moved aside to" in warnings[0], server.log()
    assert answers(server) == stored["answers"]
    assert server.stats()["versions"] == 1


@embedded_only
def test_damage_met_while_serving_is_reported_and_the_next_start_rebuilds_the_index(stored: dict[str, Any],
                                                                                     bastion_factory: Any) -> None:
    """A process of the server met SQLite's "malformed" (damage quick_check need not find, such as committed rows
    lost): the note it leaves makes /health say so, and the next start sets the file aside and rebuilds it."""
    from bastion.index.sqlite_damage import note_damage

    data = stored["data"]
    server = bastion_factory(data)
    until_ok(server)
    assert note_damage(str(data / "index.sqlite3"), "database disk image is malformed")  # as a DICOM worker would
    body = health(server)
    assert body["status"] == "degraded" and "the index is damaged (database disk image is malformed" in body["reason"]
    server.stop()
    server = bastion_factory(data)
    until_ok(server)
    assert sorted(p.name for p in data.glob("index.sqlite3.corrupt-*") if not p.name.endswith(("-wal", "-shm")))
    assert "found damaged while in use" in server.log()
    assert answers(server) == stored["answers"]
    assert not (data / "index.sqlite3-damaged").exists()
