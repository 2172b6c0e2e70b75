"""The forwarding queues: per destination, the instances waiting to be sent, in flight, delivered and dead.

A queue entry names an instance (its SOP Instance UID), not a version: whatever version is current when it is
sent goes out. Its life::

    enqueue ──► pending ──take──► in flight ──delivered──► (counted, removed)
                  ▲  ▲               │ failed: attempts < max, due again after the backoff
                  │  └───────────────┘
                  │ retry            │ failed: attempts == max
                  └──── dead ◄───────┘          (kept with its last error until retried or purged)

Guarantees: an instance the change log stored after the consumer's position is enqueued once per destination
(the position is kept in the same transaction as the entries it produced); an entry leaves the queue only once
the destination answered success (or a warning) for it, or is purged: delivery is at least once. An entry in
flight when its sender died goes back to pending (:meth:`ForwardQueue.recover`, or its lease running out).

The queue is kept in ``<data>/forward.sqlite3`` (:mod:`bastion.forward.sqlite`), never in the index, which is a
cache that a rebuild replaces.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from bastion.index.base import LogPosition

PENDING, IN_FLIGHT, DEAD = "pending", "in_flight", "dead"


@dataclass(frozen=True)
class NewEntry:
    """An instance to enqueue for ``destination`` (from a change-log entry of ``seq``)."""

    destination: str
    sop_uid: str
    study_uid: str
    seq: int


@dataclass(frozen=True)
class Entry:
    """A queued instance, as :meth:`ForwardQueue.take` hands it to a sender or :meth:`ForwardQueue.dead` lists it."""

    id: int
    destination: str
    sop_uid: str
    study_uid: str
    attempts: int
    last_error: str = ""


@dataclass(frozen=True)
class Backoff:
    """When a failed entry is due again: ``first`` seconds after its first failure, twice as long after each
    further one, at most ``most``; after ``attempts`` failures it is dead."""

    attempts: int = 10
    first: float = 5.0
    most: float = 600.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure (1, 2, ...)."""
        return min(self.most, self.first * 2.0 ** min(failures - 1, 40))


@dataclass(frozen=True)
class QueueStats:
    """One destination's queue, for ``bastion queue list``, ``/api/queues`` and the admin page."""

    destination: str
    pending: int = 0
    in_flight: int = 0
    delivered: int = 0
    dead: int = 0
    #: Seconds since the oldest pending or in-flight entry was enqueued (None: nothing waits).
    oldest_pending_age_s: float | None = None
    last_error: str = ""
    #: Unix time of the last error, and of the last delivery (None: never).
    last_error_at: float | None = None
    last_delivered_at: float | None = None


@dataclass(frozen=True)
class Cursor:
    """Where the consumer of the change log is: its position (None before its first start), the ingest stamp at
    or below which a replayed change was enqueued already (set at a log reset), and the newest stamp it has seen
    (see :mod:`bastion.forward.forwarder`)."""

    position: LogPosition | None
    floor: str = ""
    seen: str = ""


class ForwardQueue(ABC):
    """The durable queues of every destination (see the module docstring). Each method is one transaction."""

    @abstractmethod
    def cursor(self) -> Cursor:
        """The change-log consumer's cursor."""

    @abstractmethod
    def enqueue(self, entries: Sequence[NewEntry], cursor: Cursor) -> int:
        """Add ``entries`` (one already pending for its destination is not added twice) and move the cursor to
        ``cursor``, at once; how many were added."""

    @abstractmethod
    def requeue(self, entries: Sequence[NewEntry]) -> int:
        """Add ``entries`` (one already pending for its destination is not added twice), the cursor left where it
        is: instances sent before that must go again (edge mode's reconciliation); how many were added."""

    @abstractmethod
    def due_now(self, destination: str) -> int:
        """Make the pending entries of ``destination`` that wait for their backoff due now (it answers again);
        how many."""

    @abstractmethod
    def recover(self) -> int:
        """Put every entry in flight back to pending (at start: their sender is gone); how many."""

    @abstractmethod
    def take(self, destination: str, limit: int, lease_s: float) -> list[Entry]:
        """Up to ``limit`` pending entries of ``destination`` that are due, oldest study first and in the order
        they were stored within it, now in flight for ``lease_s`` seconds (after which they are pending again)."""

    @abstractmethod
    def delivered(self, ids: Sequence[int]) -> None:
        """The destination accepted these entries: count them delivered and remove them."""

    @abstractmethod
    def failed(self, ids: Sequence[int], error: str, backoff: Backoff) -> int:
        """These entries failed with ``error``: pending again after the backoff, or dead after the last
        attempt; how many died."""

    @abstractmethod
    def release(self, ids: Sequence[int]) -> None:
        """Put these entries in flight back to pending, due now, without counting an attempt (a sender stopped)."""

    @abstractmethod
    def next_due(self, destination: str) -> float | None:
        """Seconds until the next pending entry of ``destination`` is due (0: now); None if there is none."""

    @abstractmethod
    def stats(self, destinations: Sequence[str] = ()) -> list[QueueStats]:
        """Every destination's counts: those named (in that order, also when empty), then any other the queue
        holds entries or counts for (a rule since removed)."""

    @abstractmethod
    def dead(self, destination: str | None = None, limit: int = 100) -> list[Entry]:
        """The dead letters (of ``destination``, else all), oldest first."""

    @abstractmethod
    def retry(self, destination: str | None = None) -> int:
        """Make the dead letters (of ``destination``, else all) pending again, due now, their attempts reset;
        how many."""

    @abstractmethod
    def purge(self, destination: str | None = None, *, everything: bool = False) -> int:
        """Drop the dead letters (``everything``: every entry, pending and in flight too) of ``destination``,
        else of all; how many."""

    @abstractmethod
    def close(self) -> None:
        """Close the database."""
