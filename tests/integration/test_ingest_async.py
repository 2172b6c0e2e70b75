"""``Ingest.finish_async``: the store path of every C-STORE, on a DICOM worker's event loop.

The blob's flush runs in ``_cwrite``'s threads (or the blob store's Python threads) and is awaited before the index
transaction, so the event loop serves others meanwhile. In process, with the real blob store and index: what it
stores is what ``finish`` would store, the loop is free while a flush is pending, and a store whose association goes
away meanwhile leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
from backends import embedded_only
from conftest import make_ct_series

from bastion.archive import Archive
from bastion.blobs import filesystem
from bastion.blobs.base import CommitInThread
from bastion.errors import CommandMismatch
from bastion.ingest.pipeline import PendingObject
from bastion.model.part10 import part10_bytes
from bastion.model.records import StoreStatus

pytestmark = [pytest.mark.timeout(60), embedded_only]  # the filesystem store's flush and its compiled writer


def _pending(archive: Archive, data: bytes) -> PendingObject:
    pending = archive.ingest.begin("test")
    pending.write(part10_bytes(data))
    return pending


def _blob_files(archive: Archive) -> list[Path]:
    root = Path(archive.blobs.stores[0].location)
    return [p for p in root.rglob("*.dcm") if not any(part.startswith(".") for part in p.relative_to(root).parts)]


@pytest.fixture
def objects(tmp_path: Path) -> list[bytes]:
    """Three journaled objects (64x64) and three written by a commit thread (512x512, from 128 KB)."""
    small = make_ct_series(tmp_path / "small", slices=3, size=64, patient_name="Async^Small")
    ct = make_ct_series(tmp_path / "ct", slices=3, size=512, patient_name="Async^CT")
    return [f.read_bytes() for f in (*small.files, *ct.files)]


def test_concurrent_stores_are_recorded_as_finish_records_them(archive: Archive, objects: list[bytes]) -> None:
    async def store_all() -> list[StoreStatus]:
        results = await asyncio.gather(*(archive.ingest.finish_async(_pending(archive, d)) for d in objects))
        return [r.status for r in results]

    assert asyncio.run(store_all()) == [StoreStatus.STORED] * len(objects)
    stats = archive.index.statistics()
    assert stats.instances == len(objects)
    stored = sorted(p.read_bytes() for p in _blob_files(archive))
    assert stored == sorted(part10_bytes(d) for d in objects)  # byte for byte what was received
    # Sent again, over the same path: duplicates, and no second blob.
    again = asyncio.run(archive.ingest.finish_async(_pending(archive, objects[0])))
    assert again.status is StoreStatus.DUPLICATE
    assert len(_blob_files(archive)) == len(objects)


def _notify_write_end(cwrite: object) -> int:
    """A descriptor writing into ``_cwrite``'s notify pipe (the module hands out only the read end): the pipe
    opened again through /proc, as the test process's own."""
    read_end = cwrite.notify_fd()  # type: ignore[attr-defined]
    return os.open(f"/proc/self/fd/{read_end}", os.O_WRONLY | os.O_NONBLOCK)


class _HeldC:
    """``_cwrite`` with its flushes (the journal's, and those of files flushed on their own) held back: each
    reports not done until ``let_go``, which then writes to the module's notify pipe as its threads do."""

    def __init__(self, real: object, release: threading.Event) -> None:
        self._real = real
        self._release = release

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def _held(self, job: object) -> object:
        release = self._release

        class Held:
            def done(self) -> bool:
                return release.is_set() and job.done()  # type: ignore[attr-defined]

            def wait(self) -> None:
                release.wait()
                job.wait()  # type: ignore[attr-defined]

        return Held()

    def submit_sync(self, fd: int, parallel: bool = False, notify: bool = False) -> object:
        return self._held(self._real.submit_sync(fd, parallel=parallel, notify=notify))  # type: ignore[attr-defined]

    def submit(self, path: str, data: bytes, **flags: bool) -> object:
        job = self._real.submit(path, data, **flags)  # type: ignore[attr-defined]
        return self._held(job) if flags.get("sync") else job

    def let_go(self) -> None:
        self._release.set()
        # the module's notify pipe: its read end is the one the loop watches; a byte written to it wakes the loop
        os.write(_notify_write_end(self._real), b"\0")


@pytest.mark.parametrize("which", ["journaled", "commit thread"])
def test_the_loop_runs_while_a_flush_is_pending(archive: Archive, objects: list[bytes], which: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data = objects[0] if which == "journaled" else objects[-1]
    release = threading.Event()
    held: list[Future[bool]] = []
    if filesystem.CWRITE is not None:  # the writer threads of _cwrite run the flush
        held_c = _HeldC(filesystem.CWRITE, release)
        monkeypatch.setattr(archive.blobs.stores[0], "cwrite", held_c)
        let_go = held_c.let_go
    else:  # hold the threads the flush will wait in: its future stays pending until the test lets go
        if which == "journaled":
            pytest.skip("without _cwrite a journaled commit is awaited in asyncio's default executor")
        pool, threads = archive.blobs.stores[0].committer(), filesystem.COMMIT_THREADS  # type: ignore[attr-defined]
        held = [pool.submit(release.wait, 10) for _ in range(threads)]
        let_go = release.set

    async def scenario() -> StoreStatus:
        store = asyncio.create_task(archive.ingest.finish_async(_pending(archive, data)))
        for _ in range(20):  # the loop keeps turning while the store waits for its flush
            await asyncio.sleep(0.005)
        assert not store.done()
        assert archive.index.statistics().instances == 0  # not recorded before its blob is durable
        let_go()
        return (await store).status

    assert asyncio.run(scenario()) is StoreStatus.STORED
    assert all(f.result() for f in held)
    assert archive.index.statistics().instances == 1


def test_a_store_abandoned_during_its_flush_leaves_nothing(archive: Archive, objects: list[bytes],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit threads of the store (where ``_cwrite`` is not built) finish the commit: one of them removes
    the blob."""
    monkeypatch.setattr(archive.blobs.stores[0], "cwrite", None)
    release = threading.Event()
    pool = archive.blobs.stores[0].committer()  # type: ignore[attr-defined]
    held = [pool.submit(release.wait, 10) for _ in range(filesystem.COMMIT_THREADS)]
    captured: list[CommitInThread] = []
    real_stage = archive.ingest._stage

    def stage(*args, **kwargs):  # type: ignore[no-untyped-def]
        staged = real_stage(*args, **kwargs)
        captured.append(staged.durable)
        return staged

    archive.ingest._stage = stage  # type: ignore[method-assign]

    async def scenario() -> None:
        store = asyncio.create_task(archive.ingest.finish_async(_pending(archive, objects[-1])))
        while not captured:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
        store.cancel()  # as when the association is aborted while the object is being flushed
        with pytest.raises(asyncio.CancelledError):
            await store

    asyncio.run(scenario())
    (flush,) = captured
    assert isinstance(flush, CommitInThread)
    release.set()
    flush.future.result(timeout=10)
    assert all(f.result() for f in held)
    # The commit finished after the client had gone: it was not recorded, and its blob is removed again.
    assert asyncio.run(_settled(archive)), f"blob left behind: {_blob_files(archive)}"
    assert archive.index.statistics().instances == 0


async def _settled(archive: Archive) -> bool:
    for _ in range(200):
        if not _blob_files(archive):
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.mark.skipif(filesystem.CWRITE is None, reason="flushes completed on the loop need _cwrite")
@pytest.mark.parametrize("which", ["journaled", "flushed on its own"])
def test_a_store_abandoned_during_a_flush_in_c_leaves_nothing(
        archive: Archive, objects: list[bytes], monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    """The flush that ``_cwrite``'s writer threads run completes on the loop, which removes the blob then."""
    held_c = _HeldC(filesystem.CWRITE, threading.Event())
    monkeypatch.setattr(archive.blobs.stores[0], "cwrite", held_c)
    data = objects[0] if which == "journaled" else objects[-1]

    async def scenario() -> None:
        store = asyncio.create_task(archive.ingest.finish_async(_pending(archive, data)))
        for _ in range(20):
            await asyncio.sleep(0.005)
        assert _blob_files(archive)  # written, its flush held back
        store.cancel()  # as when the association is aborted while the object is being flushed
        with pytest.raises(asyncio.CancelledError):
            await store
        held_c.let_go()
        assert await _settled(archive), f"blob left behind: {_blob_files(archive)}"

    asyncio.run(scenario())
    assert archive.index.statistics().instances == 0


@pytest.mark.skipif(filesystem.CWRITE is None, reason="flushes completed on the loop need _cwrite")
def test_a_store_failing_its_checks_does_not_make_the_loop_wait_for_its_flush(
        archive: Archive, objects: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """A C-STORE whose dataset names another SOP Instance UID than its command: its blob's commit started before
    the check, and is removed once done; the loop keeps serving others meanwhile, and the failure comes only once
    the blob is gone."""
    held_c = _HeldC(filesystem.CWRITE, threading.Event())
    monkeypatch.setattr(archive.blobs.stores[0], "cwrite", held_c)
    turns = [0]
    loop_turned = threading.Event()

    def let_go_once_the_loop_turns() -> None:
        loop_turned.wait(10)  # a loop made to wait for the flush never turns: let go all the same, later
        held_c.let_go()

    helper = threading.Thread(target=let_go_once_the_loop_turns)

    async def scenario() -> None:
        store = asyncio.create_task(archive.ingest.finish_async(_pending(archive, objects[0]), sop_uid="1.2.3.999"))
        helper.start()
        while not store.done():
            turns[0] += 1
            if turns[0] >= 20:
                loop_turned.set()
            await asyncio.sleep(0.005)
        with pytest.raises(CommandMismatch):
            await store
        assert not _blob_files(archive), "the failure was answered before its blob was removed"

    try:
        asyncio.run(scenario())
    finally:
        loop_turned.set()
        helper.join(30)
    assert turns[0] >= 20, f"the loop turned {turns[0]} times while the flush was held"
    assert archive.index.statistics().instances == 0


def test_a_duplicate_answer_naming_the_copy_just_stored_keeps_it(archive: Archive, objects: list[bytes],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The index answers DUPLICATE for the very copy it recorded (a record whose outcome it could not tell, found
    recorded when asked again: the PostgreSQL index's one-statement record after a lost connection): the copy is
    the one the index names, and stays. Any other duplicate's copy is removed."""
    record_async = archive.index.record_async

    async def recorded_then_duplicate(*args: object, **kwargs: object) -> tuple[StoreStatus, int | None]:
        await record_async(*args, **kwargs)  # type: ignore[arg-type]
        return StoreStatus.DUPLICATE, None

    monkeypatch.setattr(archive.index, "record_async", recorded_then_duplicate)
    result = asyncio.run(archive.ingest.finish_async(_pending(archive, objects[0])))
    assert result.status is StoreStatus.DUPLICATE
    current = archive.index.current(result.record.sop_uid)
    assert current is not None and current.blob_key == result.record.blob_key
    assert archive.blobs.get(current.blob_key) == part10_bytes(objects[0])
    assert len(_blob_files(archive)) == 1
