"""The BlobStore contract, run against every backend (bastion.blobs.base)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import pytest
from pgtest import landing_store, pg_url
from s3test import seaweed  # noqa: F401 - the session's SeaweedFS, for the "s3" store

from bastion.blobs.base import BlobStore
from bastion.blobs.copies import Copies
from bastion.blobs.filesystem import FileBlobStore
from bastion.blobs.memory import MemoryBlobStore
from bastion.errors import BastionError, NotFound, StorageError

pytestmark = pytest.mark.timeout(20)


@pytest.fixture(params=["file", "file-python-write", "memory", "s3", "landing", "copies", "copies-s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    """Each backend; the file store also with its Python file write (where the C one, ``_cwrite``, is absent);
    the S3 store on a fresh prefix of a real SeaweedFS (:mod:`s3test`), also with the landing in a real PostgreSQL
    in front (:mod:`bastion.blobs.landing`, objects of up to 64 KiB); several stores holding a copy each
    (:class:`~bastion.blobs.copies.Copies`): two file stores, and a file store beside an S3 one."""
    stack = contextlib.ExitStack()
    s: BlobStore
    if request.param == "s3":
        s = request.getfixturevalue("seaweed").store(spool_dir=str(tmp_path))
    elif request.param == "landing":  # its schema dropped at the end (pg_url: no fixture, for the modules
        # that take this one up: test_deleted_studies, test_reports)
        location = stack.enter_context(pg_url())
        s = landing_store(request.getfixturevalue("seaweed").store(spool_dir=str(tmp_path)), location,
                          max_bytes=64 * 1024)
    elif request.param == "copies":
        s = Copies([FileBlobStore(str(tmp_path / "one")), FileBlobStore(str(tmp_path / "two"))])
    elif request.param == "copies-s3":
        s = Copies([FileBlobStore(str(tmp_path / "one")),
                    request.getfixturevalue("seaweed").store(spool_dir=str(tmp_path))])
    elif request.param == "memory":
        s = MemoryBlobStore()
    else:
        s = FileBlobStore(str(tmp_path / "blobs"), **({"cwrite": None} if request.param == "file-python-write" else {}))
    with stack:
        yield s
        s.close()


def test_new_store_is_empty(store: BlobStore) -> None:
    assert list(store.keys()) == []
    assert not store.exists("a/b.dcm")


def test_commit_makes_the_object_visible(store: BlobStore) -> None:
    data = os.urandom(10_000)
    w = store.writer()
    w.write(data[:3000])
    w.write(memoryview(data)[3000:])
    assert w.size == len(data)
    assert w.digest == "b3-" + blake3.blake3(data).hexdigest()
    assert list(store.keys()) == [] and not store.exists("x/y/obj.dcm")  # nothing visible before commit
    w.commit("x/y/obj.dcm")
    assert store.exists("x/y/obj.dcm")
    assert list(store.keys()) == ["x/y/obj.dcm"]
    assert store.get("x/y/obj.dcm") == data
    assert store.size("x/y/obj.dcm") == len(data)
    with store.open("x/y/obj.dcm") as fh:
        assert fh.read(100) == data[:100]


def test_writer_reader_sees_what_was_written(store: BlobStore) -> None:
    w = store.writer()
    w.write(b"hello ")
    w.write(b"world")
    with w.reader() as fh:
        assert fh.read() == b"hello world"
    w.abort()


def test_large_object(store: BlobStore) -> None:
    data = os.urandom(9 * 1024 * 1024)  # past in-memory buffering thresholds
    w = store.writer()
    for off in range(0, len(data), 1 << 20):
        w.write(data[off: off + (1 << 20)])
    with w.reader() as fh:
        assert fh.read() == data
    w.commit("big/obj.dcm")
    assert store.get("big/obj.dcm") == data


@pytest.mark.parametrize("size", [128 * 1024, 128 * 1024 + 1, 40 * 4096 - 1, 512 * 1024 + 1234, 3 * 1024 * 1024])
def test_objects_around_page_and_threshold_sizes_round_trip(store: BlobStore, size: int) -> None:
    """Sizes on both sides of page boundaries and of the in-memory, journal and direct-write thresholds."""
    first, second = os.urandom(size), os.urandom(size)
    store.put(f"sizes/{size}-a.dcm", first)
    store.put(f"sizes/{size}-b.dcm", second)  # the reused write buffer holds nothing of the first
    assert store.size(f"sizes/{size}-a.dcm") == size and store.get(f"sizes/{size}-a.dcm") == first
    assert store.size(f"sizes/{size}-b.dcm") == size and store.get(f"sizes/{size}-b.dcm") == second


def test_start_commit_returns_a_waiter_that_confirms_durability(store: BlobStore) -> None:
    data = os.urandom(300_000)
    w = store.writer()
    w.write(data)
    wait = w.start_commit("async/obj.dcm")
    wait()
    wait()  # asking twice is fine
    assert store.get("async/obj.dcm") == data


@pytest.mark.parametrize("size", [9_000, 300_000])
def test_a_key_committed_again_holds_the_object(store: BlobStore, size: int) -> None:
    """Two processes may commit the same key (the same object, in the same nanosecond): the second commit
    replaces the first's copy whole, small objects (journaled, their file written by a thread) as large."""
    data = os.urandom(size)
    for _ in range(2):
        w = store.writer()
        w.write(data)
        w.start_commit("same/obj.dcm")()
    assert store.get("same/obj.dcm") == data
    assert list(store.keys()) == ["same/obj.dcm"]


def test_abort_leaves_nothing(store: BlobStore, tmp_path: Path) -> None:
    w = store.writer()
    w.write(b"half an object")
    w.abort()
    w.abort()  # safe twice
    assert list(store.keys()) == []
    if isinstance(store, FileBlobStore):
        assert os.listdir(store.spool_dir) == []
        assert [p for p in Path(store.root).rglob("*") if p.is_file()] == []


def test_put_returns_the_blake3_digest(store: BlobStore) -> None:
    # the BLAKE3 known answer for "abc" (what b3sum prints)
    assert store.put("k/1.dcm", b"abc") == "b3-6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
    assert store.get("k/1.dcm") == b"abc"


def test_keys_with_prefix(store: BlobStore) -> None:
    for key in ("2024/01/a.dcm", "2024/01/b.dcm", "2024/02/c.dcm", "2025/01/d.dcm"):
        store.put(key, key.encode())
    assert sorted(store.keys()) == ["2024/01/a.dcm", "2024/01/b.dcm", "2024/02/c.dcm", "2025/01/d.dcm"]
    assert sorted(store.keys("2024/01")) == ["2024/01/a.dcm", "2024/01/b.dcm"]
    assert sorted(store.keys("2024")) == ["2024/01/a.dcm", "2024/01/b.dcm", "2024/02/c.dcm"]
    assert list(store.keys("2026")) == []


def test_delete(store: BlobStore) -> None:
    store.put("d/1.dcm", b"1")
    store.put("d/2.dcm", b"2")
    store.delete("d/1.dcm")
    store.delete("d/1.dcm")  # missing is fine
    store.delete("never/was.dcm")
    assert list(store.keys()) == ["d/2.dcm"]
    assert not store.exists("d/1.dcm")


def test_missing_object_is_not_found(store: BlobStore) -> None:
    with pytest.raises(NotFound):
        store.open("no/such.dcm")
    with pytest.raises(NotFound):
        store.size("no/such.dcm")
    with pytest.raises(NotFound):
        store.get("no/such.dcm")


def test_not_found_maps_to_protocol_statuses() -> None:
    exc = NotFound("x")
    assert isinstance(exc, BastionError) and exc.http_status == 404


def test_two_writers_are_independent(store: BlobStore) -> None:
    a, b = store.writer(), store.writer()
    a.write(b"A" * 100)
    b.write(b"B" * 50)
    b.commit("two/b.dcm")
    a.abort()
    assert list(store.keys()) == ["two/b.dcm"] and store.get("two/b.dcm") == b"B" * 50


def test_put_once_never_replaces_and_one_of_racing_writers_wins(store: BlobStore) -> None:
    """put_once (a report's version, bastion.blobs.reportlog): the first bytes stay; the same bytes again are fine;
    of eight threads racing for one key with bytes of their own exactly one stores them."""
    assert store.put_once("reports/r/v1.json", b'{"v": 1}') is True
    assert store.put_once("reports/r/v1.json", b'{"v": 1}') is True  # the same again: fine
    assert store.put_once("reports/r/v1.json", b'{"v": "other"}') is False
    assert store.get("reports/r/v1.json") == b'{"v": 1}'
    start = threading.Barrier(8)

    def race(n: int) -> bool:
        start.wait()
        return store.put_once("reports/r/v2.json", f'{{"writer": {n}}}'.encode())

    with ThreadPoolExecutor(8) as pool:
        won = [n for n, ok in enumerate(pool.map(race, range(8))) if ok]
    assert len(won) == 1 and store.get("reports/r/v2.json") == f'{{"writer": {won[0]}}}'.encode()
    assert sorted(store.keys("reports")) == ["reports/r/v1.json", "reports/r/v2.json"]
    if isinstance(store, FileBlobStore):
        assert os.listdir(store.spool_dir) == []  # no spool file left


def test_file_store_put_once_that_fails_leaves_nothing(tmp_path: Path) -> None:
    store = FileBlobStore(str(tmp_path / "blobs"))
    (tmp_path / "blobs" / "reports" / "r" / "v1.json").mkdir(parents=True)  # in the way: the key cannot be read
    with pytest.raises(StorageError):
        store.put_once("reports/r/v1.json", b"{}")
    assert os.listdir(store.spool_dir) == [] and list(store.keys("reports")) == []


# -- filesystem specifics ----------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["", "../escape.dcm", "a/../../b.dcm", "/abs.dcm", ".spool/x", "a//b", "a/./b", "a/",
                                 "a/.hidden", "..", ".", "a/.."])
def test_file_store_refuses_keys_that_leave_it(tmp_path: Path, key: str) -> None:
    store = FileBlobStore(str(tmp_path / "blobs"))
    with pytest.raises(StorageError):
        store.put(key, b"x")
    assert list(store.keys()) == []
    assert not (tmp_path / "escape.dcm").exists() and not (tmp_path / "b.dcm").exists()


def test_file_store_hides_spool_files(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    store = FileBlobStore(str(root))
    store.put("a/1.dcm", b"1")
    (root / ".spool" / "leftover-of-a-crash").write_bytes(b"partial")
    assert list(store.keys()) == ["a/1.dcm"]
    store.close()


def test_file_store_objects_are_plain_files(tmp_path: Path) -> None:
    store = FileBlobStore(str(tmp_path / "blobs"))
    store.put("p/q/r.dcm", b"content")
    assert (tmp_path / "blobs" / "p" / "q" / "r.dcm").read_bytes() == b"content"


def test_file_store_falls_back_to_the_page_cache_where_direct_io_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some filesystems refuse O_DIRECT (EINVAL from fcntl): large objects are then written buffered."""
    import errno
    import fcntl as real_fcntl

    from bastion.blobs import fileio

    refused: list[int] = []
    original = real_fcntl.fcntl

    def fcntl(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == real_fcntl.F_SETFL and arg & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return original(fd, cmd, arg)

    monkeypatch.setattr(fileio.fcntl, "fcntl", fcntl)
    store = FileBlobStore(str(tmp_path / "blobs"), cwrite=None)  # the Python write (tests/unit/test_cwrite.py: C)
    try:
        data = os.urandom(600_001)
        store.put("fallback/obj.dcm", data)
        assert refused, "the direct write was not attempted"
        assert store.get("fallback/obj.dcm") == data and store.size("fallback/obj.dcm") == len(data)
    finally:
        store.close()


def test_an_opened_object_reads_as_a_dicom_file(store: BlobStore) -> None:
    """What ``open`` returns is a file object that pydicom reads (it asks for ``name``, seeks and reads)."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    data = Path(path).read_bytes()
    store.put("d/ct.dcm", data)
    with store.open("d/ct.dcm") as fh:
        ds = dcmread(fh, stop_before_pixels=True)
        assert ds.SOPInstanceUID == dcmread(path).SOPInstanceUID


def test_finding_log_folds_in_what_was_appended(tmp_path: Path) -> None:
    """Two readers of one findings log (two processes' view of <data>/copies.jsonl): each reads only what was
    appended since it last looked, and agrees with a reader that reads it all afresh."""
    from bastion.blobs.findings import Finding, FindingLog

    path = str(tmp_path / "copies.jsonl")
    writer, reader = FindingLog(path), FindingLog(path)
    writer.record(Finding("a.dcm", "/one", "missing"))
    writer.record(Finding("b.dcm", "/one", "corrupt"))
    assert [(f.key, f.problem) for f in reader.outstanding()] == [("a.dcm", "missing"), ("b.dcm", "corrupt")]
    writer.record(Finding("a.dcm", "/one", "", repaired=True))
    with open(path, "ab") as fh:
        fh.write(b'{"key": "c.dcm", "store": "/two", "prob')  # a line being appended: waits for its end
    summary = reader.summary()
    assert (summary["found"], summary["repaired"], summary["outstanding"]) == (2, 1, 1)
    assert summary["outstanding_by_store"] == {"/one": 1}
    with open(path, "ab") as fh:
        fh.write(b'lem": "missing", "detail": "", "time": 1.0, "repaired": false}\n')
    assert {f.key for f in reader.outstanding()} == {"b.dcm", "c.dcm"} == {f.key for f in FindingLog(path).outstanding()}
    os.unlink(path)  # replaced by an empty log: read again from its start
    writer.record(Finding("d.dcm", "/two", "missing"))
    assert [f.key for f in reader.outstanding()] == ["d.dcm"]
