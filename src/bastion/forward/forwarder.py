"""The forwarder of one node: follows the change log into the queues and sends each queue to its destination.

**Following.** Every :data:`POLL_S` (at once while there is more) it reads the change log after its cursor
(:meth:`Index.changes_after`), routes each ``stored`` or ``superseded`` instance (:class:`Router`) and enqueues
it for its destinations, moving the cursor in the same transaction. On its first start the cursor is the end of
the log: what was stored before forwarding was configured is not sent. A **reset** of the log (the index was
rebuilt, and its new log records every stored object again, oldest first) is followed from the new log's start,
but a ``stored`` change whose ingest stamp is not newer than the newest seen before the reset, less
:data:`RESET_MARGIN_NS`, is skipped: it was enqueued already (the margin re-sends a little rather than skip an
instance committed out of stamp order; the receiver treats it as the duplicate it is). With an index shared by
several nodes (PostgreSQL), each node forwards the instances it stored itself (the node in the blob key), from its
own ``<data>/forward.sqlite3``.

**Sending.** One task per destination takes up to :data:`BATCH` due entries, oldest study first, sends them
(:mod:`bastion.forward.delivery`) and records the outcome: delivered entries leave the queue, failed ones are
retried with exponential backoff and become dead letters after ``forward_max_attempts``. An instance deleted
before it was sent is a dead letter at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from bastion.errors import BastionError
from bastion.forward import backoff_of, open_queue
from bastion.forward.delivery import Destination, destination_for
from bastion.forward.queue import Backoff, Cursor, Entry, ForwardQueue, NewEntry
from bastion.forward.rules import Router
from bastion.index.base import STORED, SUPERSEDED, Change, Index
from bastion.model.records import InstanceRecord, parse_object_key

if TYPE_CHECKING:
    from bastion.archive import Archive

log = logging.getLogger("bastion.forward")
T = TypeVar("T")

#: How often the change log is read when it had nothing new, and how much of it at once.
POLL_S = 0.5
LOG_BATCH = 500
#: Entries a sender takes at once, and how long they stay in flight before they are pending again (its
#: process died; a restart puts them back at once, :meth:`ForwardQueue.recover`).
BATCH = 200
LEASE_S = 600.0
#: How long a sender with nothing due waits before looking again (a new entry wakes it at once).
IDLE_S = 1.0
#: After a log reset, a replayed ``stored`` change at most this much older than the newest seen is enqueued again.
RESET_MARGIN_NS = 60 * 10**9


def begin_forwarding(queue: ForwardQueue, index: Index) -> None:
    """On the first start with forwarding rules, set the cursor at the end of the change log: run before any
    process of the server accepts a store (``bastion serve`` does, before it starts them)."""
    cursor = queue.cursor()
    if cursor.position is None:
        queue.enqueue([], Cursor(index.log_end(), cursor.floor, cursor.seen))
        log.info("forwarding starts after change %s (instances stored before are not forwarded)",
                 index.log_end())


def _stamp(change: Change) -> str:
    parts = parse_object_key(change.blob_key)
    return parts["stamp"] if parts else ""


class Forwarder:
    """Follows the change log into the queues and sends them (see the module docstring). Run one per node."""

    def __init__(self, archive: Archive, *, node_id: str | None = None, executor: Executor | None = None) -> None:
        settings = archive.settings
        self.archive = archive
        self.node_id = node_id
        self.queue: ForwardQueue = open_queue(settings)
        self.router = Router(settings.forward, archive.index, archive.blobs)
        self.backoff: Backoff = backoff_of(settings)
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(4, thread_name_prefix="forward")
        rules = {rule.name: rule for rule in settings.forward}
        self.destinations: dict[str, Destination] = {
            name: destination_for(rule, archive, self.executor) for name, rule in rules.items()}
        self._wake = {name: asyncio.Event() for name in self.destinations}
        self._tasks: list[asyncio.Task[None]] = []

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the executor (a database call)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args))

    async def start(self) -> Forwarder:
        """Put entries left in flight back to pending, and start following and sending."""
        await self.call(self._begin)
        back = await self.call(self.queue.recover)
        if back:
            log.info("forwarding: %d instance(s) in flight at the last stop are pending again", back)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow())]
        self._tasks += [loop.create_task(self._send(d)) for d in self.destinations.values()]
        log.info("forwarding to %s", ", ".join(f"{d.name} ({d.to})" for d in self.destinations.values()))
        return self

    async def stop(self) -> None:
        """Stop following and sending; entries in flight go back to pending."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for destination in self.destinations.values():
            await destination.close()
        await self.call(self.queue.recover)
        self.queue.close()
        if self._own_executor:
            self.executor.shutdown(wait=False)

    # -- following the change log ------------------------------------------------------------------
    async def _follow(self) -> None:
        while True:
            try:
                more = await self.call(self.follow_once)
            except BastionError as exc:  # the index or the queue failing: try again at the next poll
                log.warning("forwarding: reading the change log failed: %s", exc.message)
                more = False
            except Exception:
                log.exception("forwarding: reading the change log failed; trying again")
                more = False
            if not more:
                await asyncio.sleep(POLL_S)

    def _begin(self) -> None:
        begin_forwarding(self.queue, self.archive.index)

    def follow_once(self) -> bool:
        """Enqueue the changes after the cursor (at most :data:`LOG_BATCH`); whether there may be more."""
        cursor = self.queue.cursor()
        if cursor.position is None:
            self._begin()
            return True
        read = self.archive.index.changes_after(cursor.position, LOG_BATCH)
        if read.reset:
            floor = str(max(0, int(cursor.seen or 0) - RESET_MARGIN_NS)).zfill(20) if cursor.seen else ""
            log.warning("forwarding: the change log was reset (the index was rebuilt): following the new log, "
                        "skipping instances stored before %s", floor or "nothing")
            self.queue.enqueue([], Cursor(read.position, floor, cursor.seen))
            return True
        entries: list[NewEntry] = []
        seen = cursor.seen
        for change in read.changes:
            if change.kind not in (STORED, SUPERSEDED):
                continue
            stamp = _stamp(change)
            if self.node_id is not None and (parse_object_key(change.blob_key) or {}).get("node") != self.node_id:
                continue  # another node's: it forwards it
            seen = max(seen, stamp)
            if cursor.floor and stamp and stamp <= cursor.floor:
                continue  # replayed after a reset, enqueued before it
            entries += [NewEntry(name, change.sop_uid, change.study_uid, change.seq)
                        for name in self.router.route(change)]
        if read.changes:
            self.queue.enqueue(entries, Cursor(read.position, cursor.floor, seen))
        for name in {e.destination for e in entries}:
            if name in self._wake:
                self._wake[name].set()
        return len(read.changes) == LOG_BATCH

    # -- sending ------------------------------------------------------------------------------------
    async def _send(self, destination: Destination) -> None:
        wake = self._wake[destination.name]
        while True:
            try:
                entries = await self.call(self.queue.take, destination.name, BATCH, LEASE_S)
                if entries:
                    await self._deliver(destination, entries)
                    continue
                await destination.idle()
                due = await self.call(self.queue.next_due, destination.name)
                wait = IDLE_S if due is None else min(IDLE_S, due)
            except BastionError as exc:
                log.warning("forwarding to %s: %s", destination.name, exc.message)
                wait = IDLE_S
            except Exception:
                log.exception("forwarding to %s failed; trying again", destination.name)
                wait = IDLE_S
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), wait)

    async def _deliver(self, destination: Destination, entries: Sequence[Entry]) -> None:
        """Send ``entries`` and record what became of each."""
        records: list[InstanceRecord] = []
        by_uid: dict[str, Entry] = {}
        gone: list[int] = []
        for entry, record in zip(entries, await self.call(self._records, entries), strict=True):
            if record is None:
                gone.append(entry.id)
            else:
                records.append(record)
                by_uid[record.sop_uid] = entry
        try:
            outcome = await destination.send(records) if records else None
        except BaseException:
            await self.call(self.queue.release, [e.id for e in entries])
            raise
        if gone:
            await self.call(self.queue.failed, gone, "deleted from the archive before it was sent", Backoff(1))
        if outcome is None:
            return
        await self.call(self.queue.delivered, [by_uid[uid].id for uid in outcome.delivered])
        errors: dict[str, list[int]] = {}
        for uid, error in outcome.failed.items():
            errors.setdefault(error, []).append(by_uid[uid].id)
        for error, ids in errors.items():
            died = await self.call(self.queue.failed, ids, error, self.backoff)
            log.warning("forwarding to %s: %d instance(s) failed%s: %s", destination.name, len(ids),
                        f" ({died} now dead letters)" if died else "", error)

    def _records(self, entries: Sequence[Entry]) -> list[InstanceRecord | None]:
        return [self.archive.index.current(e.sop_uid) for e in entries]
