"""Jobs: work that outlives the request that started it, leased in a database so that it finishes when the
node running it dies.

A job is a row keyed by what it does (a digest of the request): starting the same work again finds the job
that is doing it instead of starting a second one (:meth:`Jobs.begin`). Whoever runs a job holds its *lease*:
its ``owner`` and a ``lease_until`` time, renewed while it runs (:meth:`Jobs.renew`, every
:data:`LEASE_SECONDS` / 3). When the owner dies the lease runs out, and any node's runner takes the job over
(:meth:`Jobs.claim_expired`, no two at once; or a request waiting for the job, :meth:`Jobs.claim`) and
finishes it, skipping the items the job already recorded
(:meth:`Jobs.record_progress`). Times are the database's clock, never a node's.

A job's life::

    begin ──► running (outcome NULL, leased) ──finish──► finished ──answered──► closed
                 ▲   │ lease runs out / release                 │ REPLAY_SECONDS pass
                 └───┘ claim_expired or begin take it over       └──────────────────────► closed

A finished job whose requester was not told the outcome (its node died, the requester left) answers the next
request with the same key from its stored outcome (:meth:`Jobs.begin` returns it), once, within
:data:`REPLAY_SECONDS`; a closed job is history: the same request after it begins a new job. Finished jobs are
deleted :data:`KEEP_SECONDS` after they finished (:meth:`Jobs.prune`).

Guarantees: at most one open (not closed) job per key; a job's lease has one owner at a time; only the owner
finishes it, and only once; progress is recorded at least once per item delivered (an item whose delivery was
under way when its owner died is delivered again).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: How long a lease lasts without renewal: a dead owner's job is taken over within this plus a runner's poll.
LEASE_SECONDS = 20.0
#: How long after it finished a job whose requester was not answered answers the same request again.
REPLAY_SECONDS = 600.0
#: How long after it finished a job is kept (for :meth:`Jobs.get`), before :meth:`Jobs.prune` deletes it.
KEEP_SECONDS = 86400.0


@dataclass(frozen=True)
class Job:
    """One job as read from the database."""

    id: int
    kind: str
    #: What the job does, as a digest: one open job per key.
    key: str
    payload: Mapping[str, Any]
    #: Who holds (or last held) the lease: a token of one runner of the job, never shared by two.
    owner: str
    lease_until: datetime
    #: The status recorded for each item done so far (SOP Instance UID -> status).
    done: Mapping[str, int] = field(default_factory=dict)
    #: The final result, once finished (None while running).
    outcome: Mapping[str, Any] | None = None
    #: True once its requester was answered, or :data:`REPLAY_SECONDS` after it finished unanswered.
    closed: bool = False

    @property
    def finished(self) -> bool:
        return self.outcome is not None


class Jobs(ABC):
    """Leased jobs in a database shared by every node of the archive (see the module docstring).

    Every method is one short transaction; a database failure is an :class:`~bastion.errors.IndexFailure`.
    Methods are safe to call from several threads and processes at once.
    """

    def __init__(self, lease_seconds: float = LEASE_SECONDS) -> None:
        self.lease_seconds = lease_seconds

    @abstractmethod
    def begin(self, kind: str, key: str, payload: Mapping[str, Any], owner: str) -> Job:
        """The open job with ``key``: a new one leased to ``owner`` if there is none; an unfinished one whose
        lease ran out, taken over by ``owner``; else the job as it is (another's lease, or finished: compare
        ``job.owner`` and ``job.finished``)."""

    @abstractmethod
    def claim(self, job: Job, owner: str) -> Job:
        """``job`` as it is now, taken over by ``owner`` if it is unfinished and its lease ran out (a request
        waiting for a job polls it so: it never begins another job, even once ``job`` was closed)."""

    @abstractmethod
    def claim_expired(self, owner: str) -> Job | None:
        """An unfinished job whose lease ran out, now leased to ``owner``; None if there is none. Two claimers
        at once never get the same job (``FOR UPDATE SKIP LOCKED``)."""

    @abstractmethod
    def renew(self, job: Job) -> bool:
        """Extend ``job.owner``'s lease by ``lease_seconds`` from now; False if the lease is no longer theirs
        (another took the job over) or the job finished: its runner must stop."""

    @abstractmethod
    def release(self, job: Job) -> None:
        """End ``job.owner``'s lease now, for a runner to take the job over (its owner stops unfinished)."""

    @abstractmethod
    def record_progress(self, job: Job, sop_uid: str, status: int) -> None:
        """Record that item ``sop_uid`` of ``job`` was done with ``status`` (a later record replaces it)."""

    @abstractmethod
    def finish(self, job: Job, outcome: Mapping[str, Any]) -> bool:
        """Store ``outcome`` and end the job, if ``job.owner`` still holds it and it is unfinished; whether it
        did."""

    @abstractmethod
    def answered(self, job: Job) -> None:
        """The requester was given the finished ``job``'s outcome: close it (the same request begins anew)."""

    @abstractmethod
    def get(self, key: str) -> Job | None:
        """The open job with ``key``, else the newest closed one, else None."""

    @abstractmethod
    def prune(self) -> int:
        """Delete the jobs finished more than :data:`KEEP_SECONDS` ago; how many."""

    @abstractmethod
    def close(self) -> None:
        """Release the database connections."""
