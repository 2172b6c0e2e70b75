"""The ``bastion`` command line: import, index rebuild, verify, serve --help."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import backends
import pydicom
import pytest
from backends import embedded_only
from conftest import BASTION, BastionServer, free_port, make_study, requires_dcmtk, run_bastion

pytestmark = pytest.mark.timeout(120)


def _summary(stdout: str) -> dict[str, int]:
    m = re.search(r"(\d+) file\(s\): (\d+) stored, (\d+) duplicate, (\d+) superseded, (\d+) rejected", stdout)
    assert m, stdout
    return dict(zip(("total", "stored", "duplicate", "superseded", "rejected"), map(int, m.groups()), strict=True))


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A data dir filled by one ``bastion import`` of a folder, a zip archive and a garbage file."""
    root = tmp_path_factory.mktemp("cli")
    folder = root / "folder"
    a = make_study(folder / "a", series=2, per_series=2, patient_id="CLIPAT1", study_date="20200202")
    (folder / "copies").mkdir()
    shutil.copy(a.files[0], folder / "copies" / "same-as-a0.dcm")  # a duplicate
    b = make_study(root / "b", series=1, per_series=3, patient_id="CLIPAT2", study_date="20210303", modality="MR")
    changed = pydicom.dcmread(a.files[1])
    changed.StudyDescription = "A CORRECTED COPY"  # same SOP Instance UID, new content: a new version
    changed.save_as(root / "changed.dcm", enforce_file_format=True)
    archive = root / "b.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in b.files:
            zf.write(f, f"zipped/{f.name}")
        zf.write(root / "changed.dcm", "zipped/changed.dcm")
    garbage = root / "garbage.dcm"
    garbage.write_bytes(b"this is not DICOM at all" * 50)
    data = root / "data"
    proc = run_bastion("import", "--data", str(data), str(folder), str(archive), str(garbage))
    return {"proc": proc, "data": data, "a": a, "b": b, "garbage": garbage}


def test_import_reports_counts_and_reasons(imported: dict[str, Any]) -> None:
    proc = imported["proc"]
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the garbage file was rejected
    a, b = imported["a"], imported["b"]
    counts = _summary(proc.stdout)
    assert counts == {"total": len(a.files) + 1 + len(b.files) + 1 + 1,
                      "stored": len(a.files) + len(b.files), "duplicate": 1, "superseded": 1, "rejected": 1}
    reasons = [line for line in proc.stdout.splitlines() if line.strip().startswith("rejected 1:")]
    assert len(reasons) == 1 and str(imported["garbage"]) in reasons[0], proc.stdout


def test_import_of_good_files_only_exits_0(tmp_path: Path) -> None:
    study = make_study(tmp_path / "s", series=1, per_series=2)
    proc = run_bastion("import", "--data", str(tmp_path / "data"), str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _summary(proc.stdout)["stored"] == len(study.files)
    proc = run_bastion("import", "--data", str(tmp_path / "data"), str(tmp_path / "s"))
    assert proc.returncode == 0 and _summary(proc.stdout)["duplicate"] == len(study.files)


QUERIES: list[tuple[str, dict[str, str | None]]] = [
    ("-P", {"QueryRetrieveLevel": "PATIENT", "PatientID": None, "PatientName": None,
            "NumberOfPatientRelatedStudies": None, "NumberOfPatientRelatedInstances": None}),
    ("-S", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": None, "StudyDate": None, "StudyDescription": None,
            "PatientID": None, "ModalitiesInStudy": None, "NumberOfStudyRelatedInstances": None,
            "NumberOfStudyRelatedSeries": None}),
    ("-S", {"QueryRetrieveLevel": "STUDY", "StudyDate": "20210101-", "StudyInstanceUID": None}),
    ("-S", {"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": None, "Modality": None, "StudyInstanceUID": None,
            "NumberOfSeriesRelatedInstances": None}),
    ("-S", {"QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": None, "SeriesInstanceUID": None,
            "StudyInstanceUID": None, "InstanceNumber": None, "StudyDescription": None}),
]


def _answers(server: BastionServer, out: Path) -> list[list[dict[str, Any]]]:
    answers = []
    for i, (model, keys) in enumerate(QUERIES):
        proc, rsp = server.find(keys, model=model, out=out / f"q{i}")
        assert "Received Final Find Response (Success)" in proc.stdout, proc.stdout
        answers.append([json.loads(r.to_json()) for r in rsp])
    return answers


@requires_dcmtk
def test_index_rebuild_gives_identical_answers(imported: dict[str, Any], bastion_factory: Any,
                                               tmp_path: Path) -> None:
    data = imported["data"]
    server = bastion_factory(data)
    before = _answers(server, tmp_path / "before")
    stats_before = server.stats()
    built = "python" if os.environ.get("BASTION_PURE_PYTHON") else "compiled"  # the pure-Python leg
    assert stats_before["ingest"]["header_scan"] == built
    assert stats_before["storage"]["file_write"] == ("none" if backends.REMOTE else built)  # S3 writes no file
    assert stats_before["ingest"]["index_record"] == built
    server.stop()
    assert [len(a) for a in before] and all(before), "every query should match something"
    # The superseded instance answers with its current version's description.
    descriptions = [str(r.get("00081030", {}).get("Value", [""])[0]) for r in before[4]]
    assert descriptions.count("A CORRECTED COPY") + descriptions.count("TEST STUDY") == len(descriptions)
    assert stats_before["versions"] == 1

    proc = run_bastion("index", "rebuild", "--data", str(data))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 superseding an older version" in proc.stdout, proc.stdout

    server = bastion_factory(data)
    after = _answers(server, tmp_path / "after")
    stats_after = server.stats()
    assert after == before
    for key in ("patients", "studies", "series", "instances", "versions", "stored_bytes"):
        assert stats_after[key] == stats_before[key], key


@embedded_only  # it damages the stored files themselves
def test_verify_detects_corrupt_and_missing_blobs(tmp_path: Path) -> None:
    make_study(tmp_path / "s", series=1, per_series=3)
    data = tmp_path / "data"
    assert run_bastion("import", "--data", str(data), str(tmp_path / "s")).returncode == 0
    proc = run_bastion("verify", "--data", str(data))
    assert proc.returncode == 0 and "verified 3 object(s): 0 missing, 0 corrupt" in proc.stdout, proc.stdout

    blobs = sorted(p for p in (data / "blobs").rglob("*.dcm") if ".spool" not in p.parts)
    assert len(blobs) == 3
    corrupt, deleted = blobs[0], blobs[1]
    raw = bytearray(corrupt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(raw))
    deleted.unlink()
    proc = run_bastion("verify", "--data", str(data))
    assert proc.returncode == 1, proc.stdout
    key = lambda p: p.relative_to(data / "blobs").as_posix()  # noqa: E731
    assert f"CORRUPT {key(corrupt)}" in proc.stdout, proc.stdout
    assert f"MISSING {key(deleted)}" in proc.stdout, proc.stdout
    assert "1 missing, 1 corrupt" in proc.stdout


def test_serve_help_mentions_environment_variables() -> None:
    proc = run_bastion("serve", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for name in ("BASTION_DATA", "BASTION_AET", "BASTION_DICOM_PORT", "BASTION_HTTP_PORT", "BASTION_REMOTES"):
        assert name in text, name


def test_index_rebuild_while_a_server_it_cannot_reach_runs_says_so(bastion_factory: Any, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    server = bastion_factory(tmp_path / "busy")
    port = free_port()  # the command's settings name another port than the server's: nobody answers there
    monkeypatch.setenv("BASTION_HTTP_PORT", str(port))
    done = run_bastion("index", "rebuild", "--data", str(server.data))
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"in use, and the server did not answer at http://127.0.0.1:{port}/" in done.stderr
    assert server.echo().returncode == 0  # the running server was left alone
    server.stop()
    done = run_bastion("index", "rebuild", "--data", str(server.data))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("taken", ["http", "dicom"])
def test_serve_on_a_port_in_use_fails_at_once_with_one_clear_line(tmp_path: Path, taken: str) -> None:
    import socket

    from conftest import free_port

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        other = free_port()
        http, dicom = (port, other) if taken == "http" else (other, port)
        done = run_bastion("serve", "--data", tmp_path / "data", "--http-port", str(http), "--dicom-port", str(dicom),
                           timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    what = "HTTP" if taken == "http" else "DICOM"
    assert f"bastion: cannot listen for {what} on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert (tmp_path / "data" / ".running").read_text() == "clean"  # nothing ran: no recovery next time


def test_a_change_log_consumer_across_index_rebuild_skips_and_repeats_nothing(tmp_path: Path) -> None:
    """A consumer (the metadata warmer; replication later) keeps its position in the change log across
    `bastion index rebuild`: told that its log is gone, it reads the rebuilt one from its start, and every seq it
    sees, across both logs, is larger than the one before."""
    from bastion.archive import Archive
    from bastion.index import Change, Index, LogPosition
    from bastion.settings import load_settings

    def follow(index: Index, position: LogPosition) -> tuple[list[Change], LogPosition, int]:
        seen, resets = [], 0
        while True:
            read = index.changes_after(position, limit=3)
            resets += read.reset
            if not read.reset and not read.changes:
                return seen, position, resets
            seen.extend(read.changes)
            position = read.position

    study = make_study(tmp_path / "s", series=2, per_series=4)
    settings = load_settings(None, env={}, data=tmp_path / "data")
    archive = Archive.open(settings)
    try:
        for f in study.files[:5]:
            archive.ingest.store_bytes(f.read_bytes(), "test")
        before, position, _ = follow(archive.index, archive.index.log_start())
        archive.ingest.store_bytes(study.files[5].read_bytes(), "test")  # not read before the rebuild
    finally:
        archive.close()
    saved = str(position)  # as a consumer keeps it in a file

    proc = run_bastion("index", "rebuild", "--data", str(settings.data))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    archive = Archive.open(settings)
    try:
        for f in study.files[6:]:
            archive.ingest.store_bytes(f.read_bytes(), "test")
        after, end, resets = follow(archive.index, LogPosition.parse(saved))
        assert resets == 1 and end == archive.index.log_end()
        seqs = [c.seq for c in before + after]
        assert seqs == sorted(set(seqs))
        assert after == archive.index.changes(0, 1000)  # the whole new log, each change once
        assert sorted(c.sop_uid for c in after if c.kind == "stored") == sorted(study.sop_uids)
    finally:
        archive.close()


def test_serve_with_an_unreachable_or_misconfigured_backend_says_so_in_one_line(tmp_path: Path) -> None:
    """An index or blob store that cannot be used stops ``bastion serve`` at once: one line naming what is wrong
    (host, database, bucket, credentials), exit status 2, no traceback."""
    import s3test

    seaweed = s3test.acquire()
    try:
        endpoint = f"endpoint={seaweed.endpoint}&region=us-east-1"
        credentials = {"AWS_ACCESS_KEY_ID": seaweed.access_key, "AWS_SECRET_ACCESS_KEY": seaweed.secret_key}
        cases = [
            (["--index", "postgresql://postgres@127.0.0.1:1/test?connect_timeout=3"], {}, "127.0.0.1:1/test"),
            (["--index", "postgresql://postgres@127.0.0.1:5432/no_such_database"], {}, "no_such_database"),
            (["--blobs", f"s3://no-such-bucket/p?{endpoint}"], credentials, "no-such-bucket does not exist"),
            (["--blobs", f"s3://{seaweed.bucket}/p?{endpoint}"],
             {"AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong"}, "access denied"),
        ]
        for flags, env, expected in cases:
            proc = subprocess.run([BASTION, "serve", "--data", str(tmp_path / "data"), "--dicom-port", "0",
                                   "--http-port", "0", *flags], capture_output=True, text=True, timeout=60,
                                  env={**os.environ, **env}, check=False)
            lines = [line for line in proc.stderr.splitlines() if line.startswith("bastion:")]
            assert proc.returncode == 2, (flags, proc.stderr)
            assert len(lines) == 1 and expected in lines[0], (flags, proc.stderr)
            assert "Traceback" not in proc.stderr, proc.stderr
    finally:
        s3test.release()
