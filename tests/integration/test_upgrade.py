"""An archive written before BLAKE3 (SHA-256 in its blob keys, index schema 2) keeps working after an upgrade."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import blake3
import pytest
from conftest import make_study, run_bastion

from bastion.archive import Archive
from bastion.index.schema import SCHEMA_VERSION
from bastion.model.levels import QueryLevel
from bastion.model.records import StoreStatus, parse_object_key
from bastion.settings import load_settings

pytestmark = pytest.mark.timeout(120)


def _make_legacy(tmp_path: Path, count: int) -> tuple[Path, list[Path]]:
    """A data directory as Bastion wrote it before BLAKE3: SHA-256 keys, ``sha256`` index columns, schema 2."""
    study = make_study(tmp_path / "study", series=1, per_series=count)
    data = tmp_path / "data"
    settings = load_settings(None, env={}, data=data)
    archive = Archive.open(settings)
    for path in study.files:
        archive.ingest.store_bytes(path.read_bytes(), "test")
    archive.close()
    blobs = data / "blobs"
    renamed = []
    with sqlite3.connect(settings.index_location) as db:
        for path in sorted(p for p in blobs.rglob("*.dcm") if ".spool" not in p.parts):
            old_key = path.relative_to(blobs).as_posix()
            parts = parse_object_key(old_key)
            assert parts is not None and parts["digest"].startswith("b3-")
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            new_path = path.with_name(f"{parts['sop']}_{parts['stamp']}_{sha}.dcm")
            path.rename(new_path)
            renamed.append(new_path)
            new_key = new_path.relative_to(blobs).as_posix()
            db.execute("UPDATE instances SET blob_key = ?, digest = ? WHERE blob_key = ?", (new_key, sha, old_key))
            db.execute("UPDATE changes SET blob_key = ? WHERE blob_key = ?", (new_key, old_key))
        _as_schema_4(db)
        db.execute("ALTER TABLE instances RENAME COLUMN digest TO sha256")
        db.execute("ALTER TABLE versions RENAME COLUMN digest TO sha256")
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    return data, renamed


def _as_schema_4(db: sqlite3.Connection) -> None:
    """Give a current index the tables of schema 4: instance counts kept on studies and patients, the change
    log's ``seq`` an AUTOINCREMENT key."""
    db.execute("ALTER TABLE studies ADD COLUMN num_instances INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE patients ADD COLUMN num_instances INTEGER NOT NULL DEFAULT 0")
    db.execute("UPDATE studies SET num_instances = (SELECT sum(num_instances) FROM series x "
               "WHERE x.study_uid = studies.study_uid)")
    db.execute("UPDATE patients SET num_instances = (SELECT sum(num_instances) FROM studies y "
               "WHERE y.patient_id = patients.patient_id)")
    db.execute("ALTER TABLE changes RENAME TO changes_v5")
    db.execute("CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, "
               "sop_uid TEXT NOT NULL, series_uid TEXT NOT NULL, study_uid TEXT NOT NULL, blob_key TEXT NOT NULL, "
               "at TEXT NOT NULL)")
    db.execute("INSERT INTO changes SELECT * FROM changes_v5")
    db.execute("DROP TABLE changes_v5")
    db.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")


def test_a_schema_4_index_keeps_its_counts_and_change_log(tmp_path: Path) -> None:
    """Schema 5 stops writing the study's and patient's instance counts (summed from their series when asked)
    and makes a new change log without AUTOINCREMENT; an index made before keeps its tables as they are."""
    study = make_study(tmp_path / "study", series=2, per_series=3)
    settings = load_settings(None, env={}, data=tmp_path / "data")
    archive = Archive.open(settings)
    for path in study.files[:-1]:
        archive.ingest.store_bytes(path.read_bytes(), "test")
    archive.close()
    with sqlite3.connect(settings.index_location) as db:
        _as_schema_4(db)
        assert db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone() == (5,)

    archive = Archive.open(settings)  # migrates schema 4 to the current one
    try:
        [patient] = archive.index.find(QueryLevel.PATIENT, [])
        [found] = archive.index.find(QueryLevel.STUDY, [])
        assert [patient[t]["Value"] for t in ("00201200", "00201202", "00201204")] == [[1], [2], [5]]
        assert [found[t]["Value"] for t in ("00201206", "00201208")] == [[2], [5]]
        result = archive.ingest.store_bytes(study.files[-1].read_bytes(), "test")
        assert result.seq == 6  # the change log goes on from where it was
        [found] = archive.index.find(QueryLevel.STUDY, [])
        assert found["00201208"]["Value"] == [6]
        with sqlite3.connect(settings.index_location) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
            # nothing was rewritten: the old count column stays, unused
            assert "num_instances" in {row[1] for row in db.execute("PRAGMA table_info(studies)")}
    finally:
        archive.close()


def test_a_sha256_archive_is_migrated_served_verified_and_rebuilt(tmp_path: Path) -> None:
    data, legacy = _make_legacy(tmp_path, 3)
    settings = load_settings(None, env={}, data=data)

    archive = Archive.open(settings)  # migrates the index to the current schema
    try:
        records = archive.retriever.select(QueryLevel.IMAGE, [])
        assert len(records) == 3
        assert all(len(r.digest) == 64 and not r.digest.startswith("b3-") for r in records)
        # a byte-identical re-send of an old object is still a duplicate
        resent = archive.ingest.store_bytes(legacy[1].read_bytes(), "test")
        assert resent.status is StoreStatus.DUPLICATE, resent
        with sqlite3.connect(settings.index_location) as db:
            assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    finally:
        archive.close()

    proc = run_bastion("verify", "--data", str(data))
    assert proc.returncode == 0 and "verified 3 object(s): 0 missing, 0 corrupt" in proc.stdout, proc.stdout

    raw = bytearray(legacy[0].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    legacy[0].write_bytes(bytes(raw))
    proc = run_bastion("verify", "--data", str(data))
    assert proc.returncode == 1 and "1 corrupt" in proc.stdout, proc.stdout
    legacy[0].unlink()

    proc = run_bastion("index", "rebuild", "--data", str(data))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    archive = Archive.open(settings)
    try:
        assert archive.index.statistics().instances == 2
    finally:
        archive.close()


def test_new_objects_are_named_by_their_blake3_digest(tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", series=1, per_series=1)
    settings = load_settings(None, env={}, data=tmp_path / "data")
    archive = Archive.open(settings)
    try:
        result = archive.ingest.store_bytes(study.files[0].read_bytes(), "test")
        stored = (settings.data / "blobs" / result.record.blob_key).read_bytes()
    finally:
        archive.close()
    expected = "b3-" + blake3.blake3(stored).hexdigest()
    assert result.record.digest == expected
    assert result.record.blob_key.endswith(f"_{expected}.dcm")
