"""The forwarding queue (:mod:`bastion.forward.sqlite`): order, backoff, dead letters, retry, purge, recovery."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.forward.queue import Backoff, Cursor, NewEntry
from bastion.forward.sqlite import SqliteForwardQueue
from bastion.index.base import LogPosition

pytestmark = pytest.mark.timeout(20)


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(tmp_path: Path, clock: Clock) -> Iterator[SqliteForwardQueue]:
    q = SqliteForwardQueue(tmp_path / "forward.sqlite3", clock=clock)
    yield q
    q.close()


def _cursor(seq: int) -> Cursor:
    return Cursor(LogPosition("epoch", seq))


def test_the_cursor_moves_with_the_entries_and_survives_a_reopen(queue: SqliteForwardQueue, tmp_path: Path) -> None:
    assert queue.cursor() == Cursor(None)
    assert queue.enqueue([NewEntry("a", "1.1", "1", 1), NewEntry("a", "1.1", "1", 2)], _cursor(2)) == 1
    reopened = SqliteForwardQueue(tmp_path / "forward.sqlite3")
    try:
        assert reopened.cursor().position == LogPosition("epoch", 2)
        assert reopened.stats(["a"])[0].pending == 1
    finally:
        reopened.close()


def test_take_goes_study_by_study_in_stored_order(queue: SqliteForwardQueue) -> None:
    entries = [NewEntry("a", "s1.1", "s1", 1), NewEntry("a", "s2.1", "s2", 2), NewEntry("a", "s1.2", "s1", 3),
               NewEntry("b", "s1.1", "s1", 4)]
    queue.enqueue(entries, _cursor(4))
    assert [e.sop_uid for e in queue.take("a", 10, 60)] == ["s1.1", "s1.2", "s2.1"]
    assert queue.take("a", 10, 60) == []  # in flight
    stats = {s.destination: s for s in queue.stats(["a", "b", "c"])}
    assert (stats["a"].in_flight, stats["b"].pending, stats["c"].pending) == (3, 1, 0)


def test_failures_back_off_then_die_and_retry_makes_them_pending(queue: SqliteForwardQueue, clock: Clock) -> None:
    backoff = Backoff(attempts=3, first=2.0, most=3.0)
    queue.enqueue([NewEntry("a", "1.1", "1", 1)], _cursor(1))
    [entry] = queue.take("a", 10, 60)
    assert queue.failed([entry.id], "refused", backoff) == 0
    assert queue.take("a", 10, 60) == [] and queue.next_due("a") == pytest.approx(2.0)
    clock.now += 2.0
    [entry] = queue.take("a", 10, 60)
    queue.failed([entry.id], "refused again", backoff)
    assert queue.next_due("a") == pytest.approx(3.0)  # 4 s, capped at 3
    clock.now += 3.0
    [entry] = queue.take("a", 10, 60)
    assert queue.failed([entry.id], "refused at last", backoff) == 1
    [stats] = queue.stats(["a"])
    assert (stats.pending, stats.dead, stats.last_error) == (0, 1, "refused at last")
    [dead] = queue.dead("a")
    assert (dead.attempts, dead.last_error) == (3, "refused at last")
    assert queue.retry("a") == 1
    [entry] = queue.take("a", 10, 60)
    assert entry.attempts == 0
    queue.delivered([entry.id])
    [stats] = queue.stats(["a"])
    assert (stats.pending, stats.in_flight, stats.dead, stats.delivered) == (0, 0, 0, 1)


def test_in_flight_entries_come_back_after_a_crash_or_their_lease(queue: SqliteForwardQueue, clock: Clock) -> None:
    queue.enqueue([NewEntry("a", "1.1", "1", 1), NewEntry("a", "1.2", "1", 2)], _cursor(2))
    assert len(queue.take("a", 1, 60)) == 1
    assert queue.recover() == 1
    assert len(queue.take("a", 10, 60)) == 2
    clock.now += 61
    assert [e.sop_uid for e in queue.take("a", 10, 60)] == ["1.1", "1.2"]


def test_an_instance_pending_anew_replaces_its_dead_letter(queue: SqliteForwardQueue) -> None:
    queue.enqueue([NewEntry("a", "1.1", "1", 1)], _cursor(1))
    [entry] = queue.take("a", 10, 60)
    queue.failed([entry.id], "gone", Backoff(attempts=1))
    queue.enqueue([NewEntry("a", "1.1", "1", 5)], _cursor(5))  # stored again
    assert queue.retry("a") == 1
    [stats] = queue.stats(["a"])
    assert (stats.pending, stats.dead) == (1, 0)


def test_purge_drops_dead_letters_or_everything(queue: SqliteForwardQueue) -> None:
    queue.enqueue([NewEntry("a", f"1.{i}", "1", i) for i in range(1, 4)], _cursor(3))
    [first, *_] = queue.take("a", 1, 60)
    queue.failed([first.id], "no", Backoff(attempts=1))
    assert queue.purge("a") == 1
    assert queue.purge("a", everything=True) == 2
    assert queue.stats(["a"])[0].pending == 0


def test_backoff_doubles_up_to_its_cap() -> None:
    b = Backoff(attempts=10, first=5.0, most=600.0)
    assert [b.delay(n) for n in (1, 2, 3, 8, 200)] == [5.0, 10.0, 20.0, 600.0, 600.0]
