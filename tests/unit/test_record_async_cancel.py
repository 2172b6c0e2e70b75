"""``SqliteIndex.record_async`` when the task awaiting it is cancelled (a C-STORE whose association went away)
while its write waits for the index's writer thread: a cancelled record is not recorded, a record that has
started is awaited to its end and returned, and the writer thread goes on serving later writes. Real SQLite
files, a real event loop and the index's real writer thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from contract.test_index import obj

from bastion.index.sqlite import SqliteIndex
from bastion.model.records import StoredObject, StoreStatus

pytestmark = pytest.mark.timeout(60)

_DEADLINE_S = 30.0


def _hold_writes(index: SqliteIndex, sop: str) -> tuple[threading.Event, threading.Thread]:
    """A synchronous record of ``sop`` in a thread of its own that holds the index's write lock until the event
    returned is set (its ``durable`` waits for it): every other write of this process meanwhile is queued to the
    writer thread."""
    holding, release = threading.Event(), threading.Event()

    def durable() -> None:
        holding.set()
        assert release.wait(_DEADLINE_S)

    thread = threading.Thread(target=index.record, args=(obj(sop), durable), daemon=True)
    thread.start()
    assert holding.wait(_DEADLINE_S)
    return release, thread


def _queued_record(index: SqliteIndex, o: StoredObject) -> Future[tuple[StoreStatus, int | None]]:
    """``index.record(o)`` from a thread of its own (it queues while another write holds the lock)."""
    fut: Future[tuple[StoreStatus, int | None]] = Future()

    def run() -> None:
        try:
            fut.set_result(index.record(o))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            fut.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return fut


@pytest.fixture
def index(tmp_path: Path) -> Iterator[SqliteIndex]:
    idx = SqliteIndex(str(tmp_path / "index.sqlite3"))
    yield idx
    idx.close()


def test_a_record_cancelled_while_queued_is_not_recorded_and_the_writer_goes_on(index: SqliteIndex) -> None:
    async def scenario() -> None:
        release, holder = _hold_writes(index, "1.5.1")
        task = asyncio.ensure_future(index.record_async(obj("1.5.2")))
        await asyncio.sleep(0)  # the task has queued its write and awaits it
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await asyncio.to_thread(holder.join, _DEADLINE_S)

    asyncio.run(scenario())
    # The caller was told the record did not happen (it removes the blob): the index must not hold it.
    assert index.current("1.5.1") is not None
    assert index.current("1.5.2") is None
    # And the writer thread still commits queued writes.
    release, holder = _hold_writes(index, "1.5.3")
    later = _queued_record(index, obj("1.5.4"))
    release.set()
    holder.join(_DEADLINE_S)
    assert later.result(timeout=_DEADLINE_S)[0] is StoreStatus.STORED
    assert index.current("1.5.4") is not None


def test_a_record_cancelled_once_its_write_runs_is_awaited_and_returned(index: SqliteIndex) -> None:
    index.record(obj("1.6.1", content="old"))  # a digest of another algorithm: same_content is asked
    new = obj("1.6.1", content="new")
    running, go_on = threading.Event(), threading.Event()

    def same_content(_digest: str) -> bool:  # runs in the writer thread, inside the write
        running.set()
        assert go_on.wait(_DEADLINE_S)
        return False

    async def scenario() -> tuple[StoreStatus, int | None]:
        release, holder = _hold_writes(index, "1.6.0")
        task = asyncio.ensure_future(index.record_async(new, same_content))
        await asyncio.sleep(0)
        release.set()  # the writer thread takes the queued write and runs it
        await asyncio.to_thread(running.wait, _DEADLINE_S)
        task.cancel()
        await asyncio.sleep(0)
        go_on.set()
        result = await task  # not cancelled: the object is recorded, and the caller must know it
        await asyncio.to_thread(holder.join, _DEADLINE_S)
        return result

    status, seq = asyncio.run(scenario())
    assert status is StoreStatus.SUPERSEDED and seq is not None
    current = index.current("1.6.1")
    assert current is not None and current.blob_key == new.instance.blob_key
