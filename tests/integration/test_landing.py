"""The landing of small objects in PostgreSQL in front of the S3 bucket (:mod:`bastion.blobs.landing`, issue 21):
a real PostgreSQL, a real S3 (SeaweedFS), and for the nodes real DCMTK clients."""

from __future__ import annotations

import io
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pydicom
import pytest
from backends import remote_environment
from conftest import BastionServer, make_study, requires_dcmtk, run_dcmtk
from pgtest import landing_store, pg_location  # noqa: F401 - a fresh schema per test
from psycopg import sql
from s3test import Seaweed, seaweed  # noqa: F401 - the session's SeaweedFS

from bastion.blobs.landing import LandingStore, run_mover
from bastion.blobs.s3 import S3BlobStore
from bastion.dicomweb.multipart import parse_multipart
from bastion.errors import CorruptObject, NotFound, StorageError
from bastion.index.pg_schema import parse_location
from bastion.model import digest as content_digest
from bastion.model.records import object_key

pytestmark = pytest.mark.timeout(240)


def _key(data: bytes, n: int = 0) -> str:
    """A content-addressed object key for ``data``, as the ingest makes them."""
    return object_key(f"1.2.826.0.1.3680043.2.1125.{n}", f"{n:020d}", content_digest.text(content_digest.of_bytes(data)))


def wado_study(server: BastionServer, study_uid: str) -> list[bytes]:
    """Every instance of the study as WADO-RS returns it, as stored (``transfer-syntax=*``)."""
    req = urllib.request.Request(server.url(f"/dicom-web/studies/{study_uid}"),
                                 headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    with urllib.request.urlopen(req, timeout=60) as rsp:
        boundary = rsp.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"')
        return [bytes(part.body) for part in parse_multipart(rsp.read(), boundary)]


@pytest.fixture
def bucket(seaweed: Seaweed, tmp_path: Path) -> Iterator[S3BlobStore]:  # noqa: F811
    store = seaweed.store(spool_dir=str(tmp_path))
    yield store
    store.close()


@pytest.fixture
def landing(bucket: S3BlobStore, pg_location: str) -> Iterator[LandingStore]:  # noqa: F811
    store = landing_store(bucket, pg_location, max_bytes=64 * 1024)
    yield store
    store._pool.close()


def _commit(store: LandingStore, data: bytes, n: int = 0) -> str:
    key = _key(data, n)
    writer = store.writer()
    writer.write(data)
    writer.commit(key)
    return key


def test_a_small_object_lands_in_postgresql_and_a_large_one_goes_to_the_bucket(
        landing: LandingStore, bucket: S3BlobStore) -> None:
    small, large = os.urandom(10_000), os.urandom(200_000)
    small_key, large_key = _commit(landing, small, 1), _commit(landing, large, 2)
    assert landing.backlog() == (1, len(small))
    assert not bucket.exists(small_key) and bucket.get(large_key) == large
    assert landing.get(small_key) == small and landing.size(small_key) == len(small)
    assert sorted(landing.keys()) == sorted([small_key, large_key])


def test_the_mover_puts_each_landed_object_into_the_bucket_then_deletes_its_row(
        landing: LandingStore, bucket: S3BlobStore) -> None:
    objects = {_commit(landing, data, n): data for n, data in enumerate(os.urandom(3000) for _ in range(70))}
    assert landing.move(older_than_s=3600) == 0  # none is that old yet
    assert landing.move() == 64 and landing.move() == 6 and landing.move() == 0  # a batch at a time
    assert landing.backlog() == (0, 0)
    for key, data in objects.items():
        assert bucket.get(key) == data
        with landing.open_verified(key) as fh:  # read from the bucket now
            assert fh.read() == data


def test_two_movers_move_each_object_once(landing: LandingStore, bucket: S3BlobStore, pg_location: str) -> None:  # noqa: F811
    """Nodes share the landing: rows one mover holds are skipped by the other (``SKIP LOCKED``), and every
    object ends up in the bucket once, whatever the interleaving."""
    other = landing_store(bucket, pg_location, max_bytes=64 * 1024)
    keys = [_commit(landing, os.urandom(2000), n) for n in range(300)]
    moved: list[int] = []

    def drain(store: LandingStore) -> None:
        while (n := store.move(limit=16)) > 0:
            moved.append(n)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(drain, [landing, other]))
    other._pool.close()
    assert sum(moved) == len(keys) and landing.backlog() == (0, 0)
    assert sorted(bucket.keys()) == sorted(keys)


def test_rows_a_dead_mover_held_are_moved_by_another(landing: LandingStore, bucket: S3BlobStore,
                                                     pg_location: str) -> None:  # noqa: F811
    """A mover that dies mid-pass (its connection terminated, as when its node is killed) leaves its rows to the
    others once PostgreSQL rolls its transaction back."""
    keys = [_commit(landing, os.urandom(1000), n) for n in range(5)]
    where = parse_location(pg_location)
    holder = psycopg.connect(where.conninfo)
    holder.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(where.schema)))
    holder.execute("SELECT key FROM blob_landing FOR UPDATE").fetchall()  # a mover mid-pass
    assert landing.move() == 0  # its rows are skipped, not waited for
    with psycopg.connect(where.conninfo, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (holder.info.backend_pid,))
    holder.close()
    assert landing.move() == len(keys)
    assert all(bucket.exists(key) for key in keys)


def test_a_deleted_object_is_gone_from_both_and_never_moved_back(landing: LandingStore,
                                                                  bucket: S3BlobStore) -> None:
    key = _commit(landing, os.urandom(5000), 1)
    landing.delete(key)
    assert landing.move() == 0 and not landing.exists(key) and not bucket.exists(key)
    with pytest.raises(NotFound):
        landing.open(key)
    moved = _commit(landing, os.urandom(5000), 2)
    landing.move()
    landing.delete(moved)  # from the bucket, once moved
    assert not landing.exists(moved) and not bucket.exists(moved)


def test_a_full_landing_sends_objects_straight_to_the_bucket(bucket: S3BlobStore, pg_location: str) -> None:  # noqa: F811
    full = landing_store(bucket, pg_location, max_bytes=64 * 1024, total_bytes=4000)
    landed = _commit(full, os.urandom(4000), 1)  # fills it
    full._size_at = -1.0  # (its size is looked up again at most every second)
    straight = _commit(full, os.urandom(4000), 2)
    assert not bucket.exists(landed) and bucket.exists(straight) and full.backlog() == (1, 4000)
    full._pool.close()


def test_a_landed_copy_that_does_not_match_its_digest_is_never_served_nor_moved(
        landing: LandingStore, bucket: S3BlobStore, pg_location: str, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    data = os.urandom(4000)
    key = _commit(landing, data, 1)
    with landing._pool.connection() as conn:
        conn.execute("UPDATE blob_landing SET data = %s WHERE key = %s", (os.urandom(4000), key))
    with pytest.raises(CorruptObject, match="the landing holds other bytes under that key"):
        _commit(landing, data, 1)  # the same object again: refused, not put into the bucket beside it
    with pytest.raises(CorruptObject):
        landing.open_verified(key)
    assert landing.problem_with(key) == "corrupt"
    with caplog.at_level(logging.ERROR, logger="bastion.blobs"):
        assert landing.move() == 0
    assert "do not match its digest" in caplog.text and not bucket.exists(key)


def test_the_mover_keeps_trying_while_the_bucket_is_unreachable(landing: LandingStore, bucket: S3BlobStore,
                                                                caplog: pytest.LogCaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects stay landed (and served) while the bucket refuses them; the mover logs it once, then moves them
    once it answers again."""
    key = _commit(landing, os.urandom(4000), 1)
    real_upload = bucket.upload
    refusing = threading.Event()
    refusing.set()

    def upload(k: str, *args: object) -> None:
        if refusing.is_set():
            raise StorageError("the bucket is unreachable")
        real_upload(k, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(bucket, "upload", upload)
    monkeypatch.setattr("bastion.blobs.landing.FAILED_S", 0.05)
    stop = threading.Event()
    mover = threading.Thread(target=run_mover, args=(landing, stop, 0.0))
    with caplog.at_level(logging.WARNING, logger="bastion.blobs"):
        mover.start()
        deadline = time.monotonic() + 30
        while "unreachable" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert landing.get(key) and landing.backlog()[0] == 1
        refusing.clear()
        while landing.backlog()[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        mover.join(10)
    assert caplog.text.count("the bucket is unreachable") == 1
    assert landing.backlog() == (0, 0) and bucket.exists(key)


def test_an_object_the_bucket_refuses_does_not_hold_up_the_others(landing: LandingStore, bucket: S3BlobStore,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The oldest object refused (its key taken by other bytes, say): the rest are moved past it, and it is
    passed over for a while, then tried again."""
    first = _commit(landing, os.urandom(3000), 1)
    rest = [_commit(landing, os.urandom(3000), n) for n in range(2, 6)]
    real_upload = bucket.upload
    refuse = {first}

    def upload(k: str, *args: object) -> None:
        if k in refuse:
            raise StorageError(f"cannot commit {k}: refused")
        real_upload(k, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(bucket, "upload", upload)
    assert landing.move() == len(rest) and all(bucket.exists(k) for k in rest)
    refuse.clear()
    assert landing.move() == 0 and landing.backlog()[0] == 1  # passed over for now
    landing._passed_over.clear()  # ... until its time is up
    assert landing.move() == 1 and bucket.exists(first)


def test_a_node_that_lands_nothing_still_serves_deletes_and_moves_what_others_landed(
        landing: LandingStore, bucket: S3BlobStore, pg_location: str) -> None:  # noqa: F811
    """``max_kb = 0`` on one node (or turned off after objects landed): nothing new lands there, but it reads through
    the landing (the bucket first), deletes there too, and its mover moves what is left."""
    off = landing_store(bucket, pg_location, max_bytes=0)
    kept, deleted = _commit(landing, os.urandom(3000), 1), _commit(landing, os.urandom(3000), 2)
    assert off.get(kept) == landing.get(kept) and off.size(kept) == 3000
    with off.open_verified(kept) as fh:
        assert fh.read() == landing.get(kept)
    off.delete(deleted)
    assert not landing.exists(deleted)
    straight = _commit(off, os.urandom(3000), 3)  # lands nothing itself
    assert bucket.exists(straight)
    assert off.move() == 1 and landing.backlog() == (0, 0) and bucket.exists(kept)
    off._pool.close()


def test_reads_and_commits_carry_on_through_the_bucket_while_postgresql_fails(
        bucket: S3BlobStore, pg_location: str) -> None:  # noqa: F811
    """PostgreSQL unreachable: an object in the bucket is still served, and a new small object goes to the bucket;
    one only in the landing cannot be read (the error says why), rather than reported missing."""
    store = landing_store(bucket, pg_location, max_bytes=64 * 1024)
    large, small = _commit(store, os.urandom(100_000), 1), _commit(store, os.urandom(3000), 2)
    store._pool.close()  # as a database that no longer answers
    assert store.size(large) == 100_000 and len(store.get(large)) == 100_000
    with pytest.raises(StorageError, match="the landing in PostgreSQL failed"):
        store.get(small)
    store._size_at = -1.0
    written = _commit(store, os.urandom(3000), 3)
    assert bucket.exists(written)


# -- nodes -----------------------------------------------------------------------------------------------------
def _identity(data: bytes) -> tuple[str, bytes]:
    """An object's SOP Instance UID and pixel data (the archive writes its own File Meta Information)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    return str(ds.SOPInstanceUID), bytes(ds.PixelData)


def _landing_rows(index_url: str) -> int:
    where = parse_location(index_url)
    with psycopg.connect(where.conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(where.schema)))
        row = conn.execute("SELECT count(*) FROM blob_landing").fetchone()
        return int(row[0]) if row else 0


@requires_dcmtk
def test_objects_landed_by_a_killed_node_are_served_by_another_and_moved(
        tmp_path: Path, bastion_factory: Callable[..., BastionServer]) -> None:
    """Node A lands a study (its mover waits an hour) and is SIGKILLed: node B serves every instance, byte for
    byte, from the landing; node C, which lands nothing itself, moves them all into the bucket (no delay)."""
    shared = remote_environment(tmp_path / "shared") | {"BASTION_LANDING_MAX_KB": "1024"}
    a = bastion_factory(tmp_path / "a", settings=shared | {"BASTION_NODE_ID": "node-a",
                                                           "BASTION_LANDING_DELAY_S": "3600"})
    b = bastion_factory(tmp_path / "b", settings=shared | {"BASTION_NODE_ID": "node-b",
                                                           "BASTION_LANDING_DELAY_S": "3600"})
    study = make_study(tmp_path / "study", series=2, per_series=6, patient_id="PID-LANDING")
    run_dcmtk("storescu", "-aec", "BASTION", "127.0.0.1", str(a.dicom_port), *study.files, timeout=120)
    assert _landing_rows(shared["BASTION_INDEX"]) == len(study.files)
    deadline = time.monotonic() + 30  # what the admin page shows (looked up again every 5 s)
    while (landing := b.get_json("/api/statistics")["copies"]["stores"][0]["landing"])["objects"] != len(study.files):
        assert time.monotonic() < deadline, landing
        time.sleep(0.5)
    assert landing["oldest_s"] >= 0 and landing["max_bytes"] == 1024 * 1024
    a.kill9()
    served = wado_study(b, study.study_uid)
    assert sorted(map(_identity, served)) == sorted(_identity(f.read_bytes()) for f in study.files)
    c = bastion_factory(tmp_path / "c", settings=shared | {"BASTION_NODE_ID": "node-c",  # lands nothing itself
                                                           "BASTION_LANDING_MAX_KB": "0",
                                                           "BASTION_LANDING_DELAY_S": "0"})
    deadline = time.monotonic() + 60
    while _landing_rows(shared["BASTION_INDEX"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _landing_rows(shared["BASTION_INDEX"]) == 0
    assert sorted(wado_study(c, study.study_uid)) == sorted(served)  # the same bytes, from the bucket now
