"""Edge mode: a node next to the scanners that forwards everything it stores to its ``upstream`` archive.

``upstream = "AET@HOST:PORT"`` (or a DICOMweb base URL) adds a forwarding rule named ``upstream`` that matches
everything (:attr:`bastion.settings.Settings.upstream_rule`), so the edge's backlog is that rule's durable queue:
the edge accepts and serves whatever upstream's state, and the queue drains once upstream answers again.
:class:`Edge` adds, in the server's primary process:

* **What upstream holds** (:class:`UpstreamDestination`, around the ``upstream`` queue's sender): each instance
  upstream acknowledged is recorded with its version (:mod:`.edge_store`); an instance that came from upstream
  (its File Meta Source AE Title is upstream's AE title: a C-MOVE of priors; or fetched by WADO-RS) is recorded as
  held and not sent back. Storage Commitment with ``commit_after_upstream`` asks it (:func:`upstream_holds`).
* **Reconnection**: while sending to upstream fails, upstream is asked every :data:`ECHO_S` seconds whether it
  answers (C-ECHO, or QIDO-RS); once it does, the backlog waiting for its backoff is due at once.
* **Reconciliation** (:mod:`.reconcile`) when a delivery succeeds after failures, every ``reconcile_interval``,
  and on ``bastion queue reconcile``. Before each (not the CLI's), the dead letters of the ``upstream`` queue are
  made pending again: however long upstream was down, everything goes once it answers.
* **Priors** (:mod:`.priors`): a patient's previous studies fetched when a study of theirs first arrives, the
  ``[prefetch] query`` run every ``prefetch_interval``, the daily eviction of prefetched studies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from bastion.errors import BastionError
from bastion.forward.delivery import Destination, Outcome
from bastion.forward.edge_store import EdgeStore, Held, edge_path
from bastion.forward.priors import DAY_S, evict, queue_priors, retry_delay, run_job, warm
from bastion.forward.reconcile import reconcile
from bastion.forward.rules import source_aet
from bastion.forward.upstream import Upstream, upstream_of
from bastion.model.records import InstanceRecord
from bastion.settings import UPSTREAM, Settings

if TYPE_CHECKING:
    from bastion.archive import Archive
    from bastion.dimse.commitment import UpstreamHolds
    from bastion.forward.forwarder import Forwarder

log = logging.getLogger("bastion.forward.edge")
T = TypeVar("T")
_HEAD = 4096
#: A prefetch worker with no job due looks again this often (a new job wakes it at once).
PREFETCH_IDLE_S = 5.0
#: While sending to upstream fails, whether it answers again is asked this often.
ECHO_S = 5.0


def open_edge_store(settings: Settings) -> EdgeStore:
    """The node's edge state (``<data>/edge.sqlite3``, made if missing)."""
    return EdgeStore(edge_path(settings))


def upstream_holds(archive: Archive) -> UpstreamHolds | None:
    """The Storage Commitment SCP's hook with ``commit_after_upstream``: whether upstream holds the current version
    of an instance (None when the setting is off or the node is not an edge). Any process may call it."""
    settings = archive.settings
    if not (settings.commit_after_upstream and settings.upstream_rule):
        return None
    opened: list[EdgeStore] = []

    def holds(sop_uid: str) -> bool:
        if not opened:
            opened.append(open_edge_store(settings))
        key = opened[0].held_key(sop_uid)
        current = archive.index.current(sop_uid) if key is not None else None
        return current is not None and current.blob_key == key

    return holds


class UpstreamDestination(Destination):
    """The ``upstream`` queue's sender, around the rule's own (C-STORE or STOW-RS): see the module docstring."""

    def __init__(self, inner: Destination, edge: Edge) -> None:
        self.name, self.to = inner.name, inner.to
        self.inner = inner
        self.edge = edge
        #: The last batch failed whole (upstream down), as it may have been before a start; and whether upstream
        #: was found answering since (:meth:`Edge._watch`).
        self.failing = True
        self.probed = False

    async def send(self, records: Sequence[InstanceRecord]) -> Outcome:
        held, to_send = await self.edge.call(self.edge.sort, records)
        out = await self.inner.send(to_send) if to_send else Outcome()
        delivered = set(out.delivered)
        if delivered:
            await self.edge.call(self.edge.store.record_held,
                                 [Held(r.sop_uid, r.study_uid, r.blob_key) for r in to_send if r.sop_uid in delivered])
            if self.failing:
                log.info("upstream takes what the edge sends (again): reconciling, and prefetching what waits")
                self.edge.reconcile_now.set()
                if await self.edge.call(self.edge.store.jobs_due_now):
                    self.edge.prefetch_now.set()
        if to_send:
            self.failing = not delivered and bool(out.failed)
            self.probed = self.probed and self.failing
        out.delivered += held
        return out

    async def idle(self) -> None:
        await self.inner.idle()

    async def close(self) -> None:
        await self.inner.close()


class Edge:
    """Edge mode's background work in the server's primary process (see the module docstring)."""

    def __init__(self, archive: Archive, forwarder: Forwarder) -> None:
        """Edge mode around ``forwarder`` (not started yet): its ``upstream`` sender is wrapped. In a coroutine."""
        self.archive = archive
        self.settings = archive.settings
        self.store = open_edge_store(self.settings)
        self.queue = forwarder.queue
        upstream = upstream_of(self.settings, self._store_fetched)
        assert upstream is not None, "not an edge: no upstream"
        self.upstream: Upstream = upstream
        rule = self.settings.upstream_rule
        self.upstream_aet = rule.remote.aet if rule is not None and rule.remote is not None else ""
        # Its own threads: a C-MOVE or a reconciliation may take minutes, the forwarder's threads must not wait.
        self.executor = ThreadPoolExecutor(3, thread_name_prefix="edge")
        self.reconcile_now = asyncio.Event()
        self.prefetch_now = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.archive_loop = asyncio.get_running_loop()
        self.destination = UpstreamDestination(forwarder.destinations[UPSTREAM], self)
        forwarder.destinations[UPSTREAM] = self.destination

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the edge's threads."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args))

    def _store_fetched(self, data: bytes) -> None:
        """Keep an instance fetched by WADO-RS: stored here, and held upstream (it came from there)."""
        result = self.archive.ingest.store_bytes(data, f"prefetch:{self.settings.upstream}")
        r = result.record
        self.store.record_held([Held(r.sop_uid, r.study_uid, r.blob_key)])

    def sort(self, records: Sequence[InstanceRecord]) -> tuple[list[str], list[InstanceRecord]]:
        """Which of ``records`` upstream holds already (a version it was sent, or one that came from it), and which
        to send; the studies of those to send seen for the first time queue their patient's priors."""
        held, came = [], []
        to_send = []
        for record in records:
            if self.store.held_key(record.sop_uid) == record.blob_key:
                held.append(record.sop_uid)
            elif self.upstream_aet and self._came_from_upstream(record):
                came.append(record)
            else:
                to_send.append(record)
        if came:
            self.store.record_held([Held(r.sop_uid, r.study_uid, r.blob_key) for r in came])
        if to_send and self.settings.prefetch_priors and \
                queue_priors(self.store, self.archive.index, (r.study_uid for r in to_send)):
            self.archive_loop.call_soon_threadsafe(self.prefetch_now.set)
        return held + [r.sop_uid for r in came], to_send

    def _came_from_upstream(self, record: InstanceRecord) -> bool:
        with self.archive.blobs.open(record.blob_key) as fh:
            return source_aet(fh.read(_HEAD)) == self.upstream_aet

    async def start(self) -> Edge:
        """Start reconciling, prefetching and evicting (before the forwarder starts sending)."""
        loop = self.archive_loop
        self._tasks = [loop.create_task(self._every(self.settings.reconcile_interval, self.reconcile_now,
                                                    "reconciling with upstream", self._reconcile)),
                       loop.create_task(self._prefetching()), loop.create_task(self._watch()),
                       loop.create_task(self._every(DAY_S, None, "evicting prefetched studies", self._evict))]
        if self.settings.prefetch:
            self._tasks.append(loop.create_task(self._every(self.settings.prefetch_interval, None,
                                                            "the prefetch query", self._warm)))
        log.info("edge mode: upstream %s", self.settings.upstream)
        return self

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    async def _every(self, interval: float, event: asyncio.Event | None, what: str,
                     work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` every ``interval`` seconds (0: never by time) and whenever ``event`` is set; without an
        ``event``, at start too."""
        wake = event or asyncio.Event()
        first = event is None  # eviction and the prefetch query run at start too
        while True:
            if not first:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), interval or None)
            first = False
            wake.clear()
            try:
                await work()
            except BastionError as exc:
                log.warning("edge: %s failed: %s", what, exc.message)
            except Exception:
                log.exception("edge: %s failed", what)

    async def _watch(self) -> None:
        """While sending to upstream fails (and at start), ask every :data:`ECHO_S` whether it answers; once it does, what waits
        for its backoff is due at once (once per outage: if sending still fails, the backoff rules again)."""
        while True:
            d = self.destination
            if not d.failing or d.probed:
                await asyncio.sleep(ECHO_S)
                continue
            try:
                answers = await self.call(self.upstream.answers)
                if answers:
                    d.probed = True
                    n = await self.call(self.queue.due_now, UPSTREAM)
                    log.info("upstream %s answers: %d instance(s) waiting for their backoff are due now",
                             self.settings.upstream, n)
            except Exception:
                log.exception("edge: asking whether upstream answers failed")
            await asyncio.sleep(ECHO_S)

    async def _reconcile(self) -> None:
        retried = await self.call(self.queue.retry, UPSTREAM)  # however long upstream was down: all go again
        if retried:
            log.info("edge: %d dead letter(s) to upstream pending again", retried)
        await self.call(reconcile, self.archive, self.store, self.queue, self.upstream, self.settings.reconcile_days)

    async def _evict(self) -> None:
        await self.call(evict, self.archive, self.store, self.settings.prefetch_keep_days)

    async def _warm(self) -> None:
        if await self.call(warm, self.archive.index, self.store, self.upstream, self.settings):
            self.prefetch_now.set()

    async def _prefetching(self) -> None:
        while True:
            job = None
            try:
                job = await self.call(self.store.next_job)
                if job is not None:
                    await self.call(run_job, job, self.archive.index, self.store, self.upstream, self.settings)
                    await self.call(self.store.job_done, job.id)
                    continue
            except BastionError as exc:
                log.warning("edge: prefetching failed: %s", exc.message)
                if job is not None:
                    await self.call(self.store.job_failed, job.id, exc.message, retry_delay(job.attempts))
            except Exception as exc:
                log.exception("edge: prefetching failed")
                if job is not None:
                    await self.call(self.store.job_failed, job.id, str(exc), retry_delay(job.attempts))
            self.prefetch_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.prefetch_now.wait(), PREFETCH_IDLE_S)
