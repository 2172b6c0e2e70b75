"""What the S3 blob store (bastion.blobs.s3) guarantees beyond the BlobStore contract, against a real SeaweedFS:
multipart uploads streamed from the spool, ranged reads, bounded memory, write-once keys, clear errors."""

from __future__ import annotations

import asyncio
import datetime
import io
import os
import re
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
from conftest import free_port
from s3test import Seaweed, seaweed  # noqa: F401 - the session's SeaweedFS

from bastion.blobs import open_blob_store
from bastion.blobs.s3 import QUARANTINE, READ_AHEAD, S3BlobStore
from bastion.blobs.spooling import MEMORY_LIMIT
from bastion.errors import NotFound, StorageError

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024


@pytest.fixture
def store(seaweed: Seaweed, tmp_path: Path) -> Iterator[S3BlobStore]:  # noqa: F811 - the fixture imported above
    s = seaweed.store(spool_dir=str(tmp_path))
    yield s
    s.close()


class Requests:
    """Counts the requests a store's boto3 client makes (botocore's events)."""

    def __init__(self, store: S3BlobStore) -> None:
        self.calls: dict[str, int] = {}
        store.client.meta.events.register("after-call.s3.*", self._after)

    def _after(self, model: Any, **_: Any) -> None:
        self.calls[model.name] = self.calls.get(model.name, 0) + 1


def _write(store: S3BlobStore, data: bytes, key: str, *, chunk: int = MiB) -> str:
    w = store.writer()
    try:
        for off in range(0, len(data), chunk):
            w.write(memoryview(data)[off: off + chunk])
        w.commit(key)
    except BaseException:
        w.abort()
        raise
    return w.digest


def _digest_of(fh: io.BufferedIOBase | Any) -> str:
    h = blake3.blake3()
    while block := fh.read(3 * MiB + 7):  # reads that do not line up with the read-ahead buffer
        h.update(block)
    return "b3-" + h.hexdigest()


def test_a_large_object_goes_through_a_multipart_upload_and_reads_back(store: S3BlobStore) -> None:
    data = os.urandom(40 * MiB)
    requests = Requests(store)
    digest = _write(store, data, "big/40.dcm")
    assert requests.calls.get("UploadPart", 0) >= 2 and requests.calls.get("CompleteMultipartUpload") == 1
    assert "PutObject" not in requests.calls
    assert digest == "b3-" + blake3.blake3(data).hexdigest()
    assert store.size("big/40.dcm") == len(data)
    with store.open("big/40.dcm") as fh:
        assert _digest_of(fh) == digest
    assert store.get("big/40.dcm") == data


def test_a_ranged_read_fetches_only_what_is_read(store: S3BlobStore) -> None:
    data = os.urandom(40 * MiB)
    _write(store, data, "big/ranged.dcm")
    before = dict(store.fetches)
    with store.open("big/ranged.dcm") as fh:
        assert fh.read(64 * 1024) == data[: 64 * 1024]  # a header
        assert store.fetches["bytes"] - before["bytes"] <= READ_AHEAD
        middle = 20 * MiB + 12345
        fh.seek(middle)
        assert fh.read(300_000) == data[middle: middle + 300_000]  # one frame
        assert fh.seek(0, io.SEEK_END) == len(data)
    assert store.fetches["bytes"] - before["bytes"] <= 2 * READ_AHEAD + 300_000
    assert store.fetches["requests"] - before["requests"] == 2


def test_reads_across_the_first_fetch_and_past_the_end(store: S3BlobStore) -> None:
    data = os.urandom(READ_AHEAD + 5000)
    store.put("r/edge.dcm", data)
    with store.open("r/edge.dcm") as fh:
        fh.seek(READ_AHEAD - 10)
        assert fh.read(20) == data[READ_AHEAD - 10: READ_AHEAD + 10]
        fh.seek(100)
        assert fh.read() == data[100:]
        assert fh.read(10) == b""
        fh.seek(len(data) + 50)
        assert fh.read(10) == b""
    store.put("r/empty.dcm", b"")
    with store.open("r/empty.dcm") as fh:
        assert fh.read() == b"" and fh.seek(0, io.SEEK_END) == 0
    assert store.get("r/empty.dcm") == b"" and store.size("r/empty.dcm") == 0


def test_memory_stays_bounded_while_a_large_object_is_written_and_committed(store: S3BlobStore) -> None:
    chunk = os.urandom(MiB)
    count = 105
    tracemalloc.start()
    try:
        w = store.writer()
        for _ in range(count):
            w.write(chunk)
        w.commit("big/105.dcm")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = count * MiB
    assert peak < size // 4, f"peak {peak / MiB:.1f} MiB for a {count} MiB object"
    assert store.size("big/105.dcm") == size
    with store.open("big/105.dcm") as fh:
        assert _digest_of(fh) == w.digest


def test_the_spool_is_anonymous_and_the_writer_reads_it(store: S3BlobStore, tmp_path: Path) -> None:
    data = os.urandom(MEMORY_LIMIT + 3 * MiB)
    w = store.writer()
    w.write(data)
    assert list(tmp_path.iterdir()) == []  # a crash leaves nothing behind
    with w.reader() as fh:
        assert fh.read() == data
    reader = w.reader()
    w.commit("spool/obj.dcm")
    with reader:  # still readable once the commit has closed the spool
        assert reader.read(1000) == data[:1000]
    assert store.get("spool/obj.dcm") == data


@pytest.mark.parametrize("size", [1000, MEMORY_LIMIT + MiB], ids=["put", "multipart"])
def test_keys_are_written_once(store: S3BlobStore, seaweed: Seaweed, size: int) -> None:  # noqa: F811
    first, other = os.urandom(size), os.urandom(size)  # same size: the recorded digest tells them apart
    _write(store, first, "once/obj.dcm")
    with pytest.raises(StorageError, match="already holds another object"):
        _write(store, other, "once/obj.dcm")
    assert store.get("once/obj.dcm") == first
    _write(store, first, "once/obj.dcm")  # the same object again: durable, so fine
    assert store.get("once/obj.dcm") == first
    uploads = seaweed.client().list_multipart_uploads(Bucket=store.bucket, Prefix=f"{store.prefix}/")
    assert uploads.get("Uploads", []) == []  # the refused multipart upload was aborted


def test_start_commit_is_awaited_on_an_event_loop(store: S3BlobStore) -> None:
    small, large = os.urandom(300_000), os.urandom(MEMORY_LIMIT + MiB)

    async def store_both() -> None:
        commits = []
        for key, data in (("loop/small.dcm", small), ("loop/large.dcm", large)):
            w = store.writer()
            w.write(data)
            commits.append(w.start_commit(key))
        for commit in commits:
            await commit.wait_async()
            assert commit.done()

    asyncio.run(store_both())
    assert store.get("loop/small.dcm") == small and store.get("loop/large.dcm") == large


def test_set_aside_moves_the_object_out_of_sight(store: S3BlobStore, seaweed: Seaweed) -> None:  # noqa: F811
    store.put("a/torn.dcm", b"torn")
    store.put("a/kept.dcm", b"kept")
    assert store.set_aside("a/torn.dcm") == f"{QUARANTINE}/a/torn.dcm"
    assert list(store.keys()) == ["a/kept.dcm"] and not store.exists("a/torn.dcm")
    assert store.set_aside_count() == 1
    kept = seaweed.client().get_object(Bucket=store.bucket, Key=f"{store.prefix}/{QUARANTINE}/a/torn.dcm")
    assert kept["Body"].read() == b"torn"


def test_stale_multipart_uploads_are_aborted(store: S3BlobStore, seaweed: Seaweed) -> None:  # noqa: F811
    client = seaweed.client()
    client.create_multipart_upload(Bucket=store.bucket, Key=f"{store.prefix}/died/mid-upload.dcm")
    other = client.create_multipart_upload(Bucket=store.bucket, Key="elsewhere/mid-upload.dcm")
    try:
        # any age (a negative one: the server's clock and timestamps' rounding cannot matter)
        assert store.abort_stale_uploads(datetime.timedelta(seconds=-60)) == 1
        assert client.list_multipart_uploads(Bucket=store.bucket, Prefix=f"{store.prefix}/").get("Uploads", []) == []
    finally:  # the other prefix's upload is not this store's
        client.abort_multipart_upload(Bucket=store.bucket, Key="elsewhere/mid-upload.dcm",
                                      UploadId=other["UploadId"])


@pytest.mark.parametrize("key", ["", "../escape.dcm", "/abs.dcm", "a//b", "a/./b", "a/", ".quarantine/x"])
def test_invalid_keys_are_refused(store: S3BlobStore, key: str) -> None:
    with pytest.raises(StorageError, match="invalid blob key"):
        store.put(key, b"x")
    with pytest.raises(StorageError, match="invalid blob key"):
        store.open(key)
    assert list(store.keys()) == [] and store.set_aside_count() == 0


@pytest.mark.parametrize(("bucket", "credentials", "message"), [
    ("no-such-bucket", None, "bucket no-such-bucket does not exist at {endpoint}"),
    (None, ("bastion-test-key", "wrong secret"), "access denied to bucket bastion-tests at {endpoint}"),
    (None, ("unknown-key", "whatever"), "access denied to bucket bastion-tests at {endpoint}"),
], ids=["missing-bucket", "wrong-secret", "unknown-key"])
def test_a_missing_bucket_or_refused_credentials_are_a_clear_storage_error(
        seaweed: Seaweed, bucket: str | None, credentials: tuple[str, str] | None, message: str) -> None:  # noqa: F811
    expected = message.format(endpoint=seaweed.endpoint)
    store = seaweed.store(bucket=bucket, credentials=credentials)
    try:
        with pytest.raises(StorageError) as caught:
            store.check()
        assert expected in caught.value.message and "\n" not in caught.value.message
        with pytest.raises(StorageError, match=re.escape(expected)):
            store.put("a/b.dcm", b"x")
    finally:
        store.close()


def test_an_unreachable_endpoint_is_a_clear_storage_error() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3BlobStore("bucket", endpoint=endpoint, credentials=("k", "s"))
    try:
        with pytest.raises(StorageError, match=f"cannot reach S3 at {endpoint}") as caught:
            store.check()
        assert "\n" not in caught.value.message
    finally:
        store.close()


def test_open_blob_store_opens_s3_locations(seaweed: Seaweed, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)  # credentials from the environment
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    store = open_blob_store(seaweed.location(prefix="opened/here"))
    try:
        assert isinstance(store, S3BlobStore) and store.prefix == "opened/here"
        assert store.location == seaweed.location(prefix="opened/here")
        store.put("x/1.dcm", b"one")
        assert list(store.keys()) == ["x/1.dcm"]
        assert seaweed.client().head_object(Bucket=seaweed.bucket, Key="opened/here/x/1.dcm")["ContentLength"] == 3
        with pytest.raises(NotFound):
            store.open("x/2.dcm")
    finally:
        store.close()
    with pytest.raises(StorageError, match="bucket no-such-bucket does not exist"):  # checked when opened
        open_blob_store(seaweed.location("no-such-bucket"))
    with pytest.raises(ValueError, match="unknown parameter"):
        open_blob_store(seaweed.location() + "&colour=blue")
    with pytest.raises(ValueError, match="invalid S3 blob store location"):
        open_blob_store("s3:///prefix")


def test_small_objects_and_reads_go_through_obstore_with_the_same_requests(
        store: S3BlobStore, seaweed: Seaweed) -> None:  # noqa: F811
    requests = Requests(store)
    data = os.urandom(9_000)
    digest = _write(store, data, "fast/one.dcm")
    with store.open("fast/one.dcm") as fh:
        assert fh.read() == data
    assert "PutObject" not in requests.calls and "GetObject" not in requests.calls  # not boto3's
    head = seaweed.client().head_object(Bucket=store.bucket, Key=f"{store.prefix}/fast/one.dcm")
    assert head["ContentLength"] == len(data) and head["Metadata"] == {"bastion-digest": digest}
    assert _write(store, data, "fast/one.dcm") == digest  # the same object again: settled as boto3's 412 is
    with pytest.raises(StorageError, match="already holds another object"):
        _write(store, os.urandom(9_000), "fast/one.dcm")
    assert store.get("fast/one.dcm") == data


def test_without_obstore_puts_and_reads_go_through_boto3(seaweed: Seaweed, tmp_path: Path) -> None:  # noqa: F811
    store = seaweed.store(spool_dir=str(tmp_path), fast=False)
    try:
        requests = Requests(store)
        data = os.urandom(9_000)
        _write(store, data, "slow/one.dcm")
        assert store.get("slow/one.dcm") == data
        with store.open("slow/one.dcm") as fh:
            assert fh.read(100) == data[:100] and fh.seek(0, io.SEEK_END) == len(data)
        assert requests.calls == {"PutObject": 1, "GetObject": 2}
    finally:
        store.close()


def test_a_process_forked_after_obstore_started_puts_through_boto3(store: S3BlobStore, seaweed: Seaweed  # noqa: F811
                                                                   ) -> None:
    """obstore's runtime threads do not survive fork: a child that used it would wait for ever (s3fast)."""
    from bastion.blobs import s3fast

    store.put("fork/parent.dcm", b"parent")  # starts obstore's runtime in this process
    assert s3fast.usable()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a store of its own, as each Bastion process opens
        code = 1
        try:
            os.close(read)
            child = seaweed.store(prefix=store.prefix)
            child.put("fork/child.dcm", b"child")
            os.write(write, b"ok" if not s3fast.usable() and child.get("fork/child.dcm") == b"child" else b"no")
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as answer:
            said = answer.read()  # the child's end closes when it exits, whatever happened
    finally:
        _, status = os.waitpid(pid, 0)
    assert said == b"ok" and os.waitstatus_to_exitcode(status) == 0
    assert store.get("fork/child.dcm") == b"child"


def test_a_held_off_process_keeps_boto3_and_its_children_use_obstore() -> None:
    """``bastion serve``'s supervisor holds obstore off before its start-up work, then forks the servers."""
    from bastion.blobs import s3fast

    pid = os.fork()
    if pid == 0:  # a process of its own, so that this one's state stays as it was
        code = 1
        try:
            s3fast.hold_off()
            held = not s3fast.usable()
            grandchild = os.fork()
            if grandchild == 0:
                os._exit(0 if s3fast.usable() else 1)
            _, status = os.waitpid(grandchild, 0)
            code = 0 if held and os.waitstatus_to_exitcode(status) == 0 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
