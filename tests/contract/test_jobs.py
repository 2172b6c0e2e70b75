"""The Jobs contract (leased work that outlives a request), run unchanged on both backends: SQLite in a file of
its own and PostgreSQL (a schema of its own in the test database). Several ``Jobs`` on one location stand for
several processes or nodes: each has its own connections."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pgtest import pg_url

from bastion.jobs import Job, Jobs, open_jobs
from bastion.jobs.postgresql import PostgresJobs
from bastion.jobs.sqlite import SqliteJobs
from bastion.settings import load_settings

pytestmark = pytest.mark.timeout(60)

#: A lease that runs out while a test waits for it; one that does not within a test.
SHORT, LONG = 0.3, 600.0

OpenJobs = Callable[..., Jobs]


@pytest.fixture(params=["sqlite", "postgresql"])
def open_(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenJobs]:
    """Opens ``Jobs`` on one location (each call: new connections, as another process would have)."""
    with contextlib.ExitStack() as stack:
        location = stack.enter_context(pg_url()) if request.param == "postgresql" else str(tmp_path / "jobs.sqlite3")
        opened: list[Jobs] = []

        def open_jobs_here(lease: float = LONG) -> Jobs:
            jobs: Jobs = PostgresJobs(location, lease) if request.param == "postgresql" else SqliteJobs(location, lease)
            opened.append(jobs)
            return jobs

        yield open_jobs_here
        for jobs in opened:
            jobs.close()


@pytest.fixture
def jobs(open_: OpenJobs) -> Jobs:
    return open_()


def wait_for(condition: Callable[[], Job | None], what: str, timeout: float = 20.0) -> Job:
    """Poll ``condition`` until it returns a job (a generous deadline: leases are the database's clock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found is not None:
            return found
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


PAYLOAD = {"destination": "DEST", "sop_uids": ["1.2.3.1", "1.2.3.2", "1.2.3.3"]}


def test_begin_makes_one_job_per_key_leased_to_its_first_owner(jobs: Jobs) -> None:
    first = jobs.begin("c-move", "k1", PAYLOAD, "owner-a")
    assert (first.kind, first.key, dict(first.payload), first.owner) == ("c-move", "k1", PAYLOAD, "owner-a")
    assert not first.finished and not first.closed and first.done == {}
    again = jobs.begin("c-move", "k1", {"other": "payload"}, "owner-b")
    assert (again.id, again.owner, dict(again.payload)) == (first.id, "owner-a", PAYLOAD)  # held: left as it is
    other = jobs.begin("c-move", "k2", PAYLOAD, "owner-b")
    assert other.id != first.id and other.owner == "owner-b"
    got = jobs.get("k1")
    assert got is not None and got.id == first.id
    assert jobs.get("nothing") is None


def test_progress_is_kept_per_item_and_seen_by_every_reader(open_: OpenJobs) -> None:
    a, b = open_(), open_()
    job = a.begin("c-move", "k", PAYLOAD, "owner-a")
    a.record_progress(job, "1.2.3.1", 0x0000)
    a.record_progress(job, "1.2.3.2", 0xC000)
    a.record_progress(job, "1.2.3.2", 0xB000)  # the later record replaces
    seen = b.get("k")
    assert seen is not None and dict(seen.done) == {"1.2.3.1": 0x0000, "1.2.3.2": 0xB000}


def test_a_valid_lease_is_never_claimed_and_is_renewed_only_by_its_owner(open_: OpenJobs) -> None:
    holder, other = open_(LONG), open_(SHORT)
    job = holder.begin("c-move", "k", PAYLOAD, "owner-a")
    assert other.claim_expired("owner-b") is None
    assert holder.renew(job)
    assert not holder.renew(dataclasses.replace(job, owner="owner-b"))
    assert not other.finish(dataclasses.replace(job, owner="owner-b"), {"completed": 0})
    assert not holder.get("k").finished  # type: ignore[union-attr]


def test_an_expired_lease_is_taken_over_with_its_progress_and_the_old_owner_is_out(open_: OpenJobs) -> None:
    dying, runner = open_(SHORT), open_(LONG)
    job = dying.begin("c-move", "k", PAYLOAD, "owner-a")
    dying.record_progress(job, "1.2.3.1", 0x0000)
    taken = wait_for(lambda: runner.claim_expired("runner-b"), "the expired job claimed")
    assert (taken.id, taken.owner, dict(taken.done)) == (job.id, "runner-b", {"1.2.3.1": 0x0000})
    assert taken.lease_until > job.lease_until
    assert runner.claim_expired("runner-c") is None  # held again
    assert not dying.renew(job)  # the old owner learns it lost the job ...
    assert not dying.finish(job, {"completed": 1})  # ... and cannot finish it
    assert runner.renew(taken)
    assert runner.finish(taken, {"completed": 3, "failed": 0})
    assert not runner.finish(taken, {"completed": 0})  # once
    assert not runner.renew(taken)  # a finished job has no lease to renew
    assert runner.claim_expired("runner-c") is None
    done = runner.get("k")
    assert done is not None and done.finished and dict(done.outcome or {}) == {"completed": 3, "failed": 0}


def test_begin_takes_over_an_expired_job_with_the_same_key(open_: OpenJobs) -> None:
    dying, requester = open_(SHORT), open_(LONG)
    job = dying.begin("c-move", "k", PAYLOAD, "owner-a")
    dying.record_progress(job, "1.2.3.2", 0x0000)

    def taken_over() -> Job | None:
        found = requester.begin("c-move", "k", PAYLOAD, "owner-b")
        return found if found.owner == "owner-b" else None

    taken = wait_for(taken_over, "the expired job taken over by begin")
    assert taken.id == job.id and dict(taken.done) == {"1.2.3.2": 0x0000}
    assert requester.claim_expired("runner") is None


def test_claim_reads_a_job_and_takes_it_over_only_once_its_lease_ran_out(open_: OpenJobs) -> None:
    dying, waiter = open_(SHORT), open_(LONG)
    job = dying.begin("c-move", "k", PAYLOAD, "owner-a")
    held = waiter.claim(job, "owner-b")
    assert held.id == job.id and held.owner in ("owner-a", "owner-b")  # "owner-b" only if the lease already ran out
    taken = wait_for(lambda: found if (found := waiter.claim(job, "owner-b")).owner == "owner-b" else None,
                     "the expired job claimed by its waiter")
    assert waiter.finish(taken, {"completed": 3})
    waiter.answered(taken)  # its requester was answered: closed, and a new job may begin with its key
    assert waiter.begin("c-move", "k", PAYLOAD, "owner-c").id != job.id
    ended = waiter.claim(job, "owner-d")  # the job waited for, not the new one of its key
    assert (ended.id, ended.owner, ended.closed, dict(ended.outcome or {})) == (job.id, "owner-b", True,
                                                                                {"completed": 3})


def test_a_released_job_is_claimed_at_once(open_: OpenJobs) -> None:
    owner, runner = open_(LONG), open_(LONG)
    job = owner.begin("c-move", "k", PAYLOAD, "owner-a")
    owner.release(job)
    taken = runner.claim_expired("runner-b")
    assert taken is not None and taken.id == job.id and taken.owner == "runner-b"
    assert not owner.renew(job)


def test_a_finished_job_answers_its_key_until_it_is_answered_then_the_key_begins_anew(jobs: Jobs) -> None:
    job = jobs.begin("c-move", "k", PAYLOAD, "owner-a")
    assert jobs.finish(job, {"completed": 3})
    replay = jobs.begin("c-move", "k", PAYLOAD, "owner-b")
    assert replay.id == job.id and replay.finished and dict(replay.outcome or {}) == {"completed": 3}
    assert replay.owner == "owner-a"  # a finished job is not taken over
    jobs.answered(replay)
    closed = jobs.get("k")
    assert closed is not None and closed.id == job.id and closed.closed
    fresh = jobs.begin("c-move", "k", PAYLOAD, "owner-b")
    assert fresh.id != job.id and fresh.owner == "owner-b" and not fresh.finished and fresh.done == {}
    got = jobs.get("k")
    assert got is not None and got.id == fresh.id  # the open job before the closed one
    assert jobs.prune() == 0  # finished a moment ago: kept


def test_jobs_outlive_the_process_that_made_them(open_: OpenJobs) -> None:
    first = open_()
    job = first.begin("c-move", "k", PAYLOAD, "owner-a")
    first.record_progress(job, "1.2.3.3", 0x0000)
    first.close()
    got = open_().get("k")
    assert got is not None and got.id == job.id and dict(got.done) == {"1.2.3.3": 0x0000}


def test_two_claimers_at_once_never_get_the_same_job(open_: OpenJobs) -> None:
    """Two claimers on connections of their own, racing for 40 expired jobs: each job is claimed exactly once
    (PostgreSQL: ``FOR UPDATE SKIP LOCKED``; SQLite: one writer at a time)."""
    maker = open_(LONG)
    made = [maker.begin("c-move", f"k{n}", PAYLOAD, "dead-node") for n in range(40)]
    for job in made:
        maker.release(job)
    claimers = [open_(LONG), open_(LONG)]
    claimed: list[list[int]] = [[], []]
    start = threading.Barrier(2)

    def claim(n: int) -> None:
        start.wait()
        while (job := claimers[n].claim_expired(f"runner-{n}")) is not None:
            assert job.owner == f"runner-{n}"
            claimed[n].append(job.id)

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not set(claimed[0]) & set(claimed[1])
    assert sorted(claimed[0] + claimed[1]) == sorted(job.id for job in made)


def test_two_requests_beginning_one_key_at_once_make_one_job(open_: OpenJobs) -> None:
    starters = [open_(), open_()]
    begun: list[Job] = []
    start = threading.Barrier(2)

    def begin(n: int) -> None:
        start.wait()
        begun.append(starters[n].begin("c-move", "k", PAYLOAD, f"owner-{n}"))

    threads = [threading.Thread(target=begin, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(begun) == 2 and begun[0].id == begun[1].id and begun[0].owner == begun[1].owner


def test_open_jobs_follows_the_index_location(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    embedded = open_jobs(load_settings(None, env={}, data=tmp_path / "data"))
    try:
        assert isinstance(embedded, SqliteJobs) and embedded.path == str(tmp_path / "data" / "jobs.sqlite3")
    finally:
        embedded.close()
    with pg_url() as location:
        shared = open_jobs(load_settings(None, env={}, data=tmp_path / "data", index=location))
        try:
            assert isinstance(shared, PostgresJobs)
            assert shared.begin("c-move", "k", PAYLOAD, "owner").owner == "owner"
        finally:
            shared.close()
