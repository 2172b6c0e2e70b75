"""C-MOVE sub-operations as leased jobs (PS3.4 C.4.2): a move goes on to its end when the node running it dies.

A C-MOVE request is a job (:mod:`bastion.jobs`) keyed by :func:`move_key`: the calling AE title, the move
destination and the identifier's matching keys. Its payload names the destination and the SOP Instance UIDs to
send, in order; its progress is the C-STORE status of each instance sent. Whoever holds the job's lease runs
its sub-operations (:meth:`Moves.run`): the node that received the request, or, once that node's lease ran out
(it died, or its requester left), a node's :class:`MoveRunner`. Instances the job already delivered are not
sent again but counted as they were; the instance being sent when a runner died is sent again, so every
instance reaches the destination at least once.

The same C-MOVE sent again (:meth:`Moves.request`) joins the job instead of starting a second: it waits while
another runner holds the job, takes it over once that lease runs out, and answers with the job's counts once it
finished. A job whose requester already had its final response is closed: the same C-MOVE after that is a new
job, which sends every instance again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from bastion.dimse.scu import StoreSCU, SubOperationError
from bastion.dimse.suboperations import Tally, delivered, run_suboperations
from bastion.errors import BastionError
from bastion.jobs import Job
from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition, MatchType
from bastion.model.records import InstanceRecord

if TYPE_CHECKING:
    from bastion.archive import Archive

log = logging.getLogger("bastion.dimse.moves")
T = TypeVar("T")

#: The kind of a C-MOVE job.
KIND = "c-move"
#: How often a request whose job another runner holds looks at it again.
POLL_SECONDS = 1.0
#: How often a node's runner looks for jobs whose lease ran out, and how many it runs at once.
RUNNER_POLL_SECONDS = 2.0
RUNNER_JOBS = 4
#: How often a node's runner deletes old finished jobs.
PRUNE_SECONDS = 3600.0

#: Called with the counts after each sub-operation of a job run for a requester (a pending response).
Progress = Callable[[Tally], Awaitable[None]]


def move_key(calling_aet: str, destination: str, level: QueryLevel, conditions: Sequence[Condition]) -> str:
    """The job key of a C-MOVE: a digest of the calling AE title, the move destination and the identifier's
    canonical form (its level and its matching keys as parsed, PS3.4 C.2.2.2; universal keys match anything
    and do not count), so that padding, element order and return keys do not make two requests differ."""
    keys = sorted(json.dumps([c.tag, c.kind.value, list(c.values), c.fuzzy])
                  for c in conditions if c.kind is not MatchType.UNIVERSAL)
    canonical = json.dumps([calling_aet.strip(), destination.strip(), level.value, keys])
    return f"{KIND}:{hashlib.sha256(canonical.encode()).hexdigest()}"


def move_payload(destination: str, records: Sequence[InstanceRecord], originator: tuple[str, int]) -> dict[str, Any]:
    """A C-MOVE job's payload: the destination AE title, the SOP Instance UIDs in order, and the requester's AE
    title and Message ID (sent as Move Originator with each C-STORE, PS3.7 9.1.1.1)."""
    return {"destination": destination, "sop_uids": [r.sop_uid for r in records],
            "originator": [originator[0], originator[1]]}


class Moves:
    """The C-MOVE jobs of one process: run for their requester, or taken over by the node's runner."""

    def __init__(self, archive: Archive, executor: Executor) -> None:
        self.archive = archive
        self.executor = executor
        self.jobs = archive.jobs

    def owner(self) -> str:
        """A lease owner token for one run of a job: the node, the process, and a run of its own."""
        return f"{self.archive.node_id}/{os.getpid()}/{uuid.uuid4().hex[:8]}"

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the executor (a database call)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args))

    async def request(self, key: str, payload: dict[str, Any], records: Sequence[InstanceRecord], *,
                      stop: Callable[[], bool], progress: Progress) -> tuple[Job, Tally]:
        """A C-MOVE request's job, run to its end, and its counts for the final response (PS3.4 C.4.2.1.4).

        A new job is run here (``records`` are its instances). Where another runner holds the job, this waits
        for it, calling ``progress`` as its counts change, and takes it over if the lease runs out; a finished
        job's stored counts are returned at once. ``stop()`` (a C-CANCEL) ends the sub-operations run here; while
        waiting it returns the counts so far, cancelled, and the job goes on with its runner.
        """
        owner = self.owner()
        job = await self.call(self.jobs.begin, KIND, key, payload, owner)
        shown: Tally | None = None
        while True:
            if job.outcome is not None:
                log.info("C-MOVE job %d (run by %s) answered from its outcome", job.id, job.owner)
                return job, Tally.of_outcome(job.outcome)
            if job.owner == owner:
                log.info("C-MOVE job %d to %s: %d instance(s), %d done before", job.id, job.payload["destination"],
                         len(job.payload["sop_uids"]), len(job.done))
                tally = await self.run(job, records, stop=stop, progress=progress)
                if tally is not None:
                    return job, tally
            else:
                tally = Tally.of_progress(job.payload["sop_uids"], job.done)
                if stop():
                    tally.cancelled = True
                    return job, tally
                if shown is None or tally != shown:
                    if shown is None:
                        log.info("C-MOVE job %d is run by %s: waiting for it", job.id, job.owner)
                    await progress(tally)
                    shown = tally
            await asyncio.sleep(POLL_SECONDS)
            job = await self.call(self.jobs.claim, job, owner)

    async def run(self, job: Job, records: Sequence[InstanceRecord] = (), *, stop: Callable[[], bool] = lambda: False,
                  progress: Progress | None = None) -> Tally | None:
        """Run the sub-operations of ``job``, whose lease is ``job.owner``'s, and finish it: its counts; None if
        the lease was lost to another runner meanwhile (nothing is finished then).

        Instances the job delivered before are counted as they were and not sent again; the others are sent to
        the destination (``records`` where they name them, else the index's current version; an instance gone
        from the index fails). The lease is renewed every third of its length while this runs. Ended by an
        error or cancelled, the job is released for a runner to take over.
        """
        lost = asyncio.Event()
        keeper = asyncio.ensure_future(self._keep_lease(job, lost))
        finished = False
        try:
            tally, todo = await self.call(self._remaining, job, {r.sop_uid: r for r in records})
            destination = str(job.payload["destination"])
            originator = (str(job.payload["originator"][0]), int(job.payload["originator"][1]))

            async def done(record: InstanceRecord, status: int) -> None:
                await self.call(self.jobs.record_progress, job, record.sop_uid, status)
                if progress is not None:
                    await progress(tally)

            if not await self._send(destination, todo, tally, originator, stop=lambda: stop() or lost.is_set(),
                                    done=done):
                if lost.is_set():
                    return None
                tally.cancelled = True
            keeper.cancel()
            finished = await self.call(self.jobs.finish, job, tally.outcome())
            if not finished:
                log.warning("C-MOVE job %d was taken over before it finished here", job.id)
                return None
            log.info("C-MOVE job %d finished: %d completed, %d failed, %d warning%s", job.id, tally.completed,
                     tally.failed, tally.warning, " (cancelled)" if tally.cancelled else "")
            return tally
        finally:
            keeper.cancel()
            if not finished and not lost.is_set():
                with contextlib.suppress(BastionError):
                    await self.call(self.jobs.release, job)

    def _remaining(self, job: Job, known: dict[str, InstanceRecord]) -> tuple[Tally, list[InstanceRecord]]:
        """The job's counts of the instances it delivered before, and the records of those left to send."""
        sop_uids = [str(uid) for uid in job.payload["sop_uids"]]
        tally = Tally(len(sop_uids))
        todo: list[InstanceRecord] = []
        for sop_uid in sop_uids:
            status = job.done.get(sop_uid)
            record = known.get(sop_uid)
            if status is not None and delivered(status):
                tally.count(sop_uid, status)
            elif record is not None or (record := self.archive.index.current(sop_uid)) is not None:
                todo.append(record)
            else:
                tally.count(sop_uid, 0xC000)  # deleted since the request
        return tally, todo

    async def _send(self, destination: str, records: list[InstanceRecord], tally: Tally,
                    originator: tuple[str, int], *, stop: Callable[[], bool],
                    done: Callable[[InstanceRecord, int], Awaitable[None]]) -> bool:
        """Send ``records`` to ``destination`` on one association (PS3.4 C.4.2.2); False if ``stop()`` ended it.
        A destination that is not configured here, or cannot be reached, fails every sub-operation."""
        if not records:
            return True
        remote = self.archive.settings.remote(destination)
        if remote is None:
            log.warning("move destination %s is not a configured remote AE: %d sub-operation(s) failed",
                        destination, len(records))
            tally.fail([r.sop_uid for r in records])
            return True
        scu = StoreSCU(self.archive, self.executor, calling_aet=self.archive.settings.aet, remote=remote)
        try:
            await scu.connect({r.sop_class_uid for r in records}, {r.transfer_syntax for r in records})
        except SubOperationError as exc:
            log.warning("cannot reach %s: %s", destination, exc)
            tally.fail([r.sop_uid for r in records])
            return True
        try:
            return await run_suboperations(records, scu.store, tally, originator, peer=destination, stop=stop,
                                           done=done)
        finally:
            await scu.release()

    async def _keep_lease(self, job: Job, lost: asyncio.Event) -> None:
        """Renew ``job``'s lease every third of its length; set ``lost`` once another runner has it."""
        while True:
            await asyncio.sleep(self.jobs.lease_seconds / 3)
            try:
                if not await self.call(self.jobs.renew, job):
                    log.warning("C-MOVE job %d: lease lost to another runner, stopping here", job.id)
                    lost.set()
                    return
            except BastionError as exc:
                log.warning("C-MOVE job %d: lease not renewed: %s", job.id, exc.message)


class MoveRunner:
    """A node's runner of C-MOVE jobs whose lease ran out (their node died, or their requester left): it claims
    them (:meth:`~bastion.jobs.base.Jobs.claim_expired`) every :data:`RUNNER_POLL_SECONDS`, at most
    :data:`RUNNER_JOBS` at once, and runs them to their end; their outcome waits for the requester to ask again.
    Run one per node."""

    def __init__(self, moves: Moves) -> None:
        self.moves = moves
        self._loop_task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._claim_loop())

    async def _claim_loop(self) -> None:
        jobs, pruned = self.moves.jobs, 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                while len(self._running) < RUNNER_JOBS:
                    job = await self.moves.call(jobs.claim_expired, self.moves.owner())
                    if job is None:
                        break
                    task = loop.create_task(self._take_over(job))
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
                if loop.time() - pruned > PRUNE_SECONDS:
                    await self.moves.call(jobs.prune)
                    pruned = loop.time()
            except BastionError as exc:  # the database failing over: try again at the next poll
                log.warning("C-MOVE job runner: %s", exc.message)
            except Exception:
                log.exception("C-MOVE job runner failed; trying again")
            await asyncio.sleep(RUNNER_POLL_SECONDS)

    async def _take_over(self, job: Job) -> None:
        log.info("C-MOVE job %d taken over (its lease ran out): %d of %d instance(s) done before", job.id,
                 len(job.done), len(job.payload["sop_uids"]))
        try:
            await self.moves.run(job)
        except Exception:
            log.exception("C-MOVE job %d failed here", job.id)

    async def stop(self) -> None:
        """Stop claiming; the jobs running here are released for another runner."""
        tasks = [t for t in (self._loop_task, *self._running) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
