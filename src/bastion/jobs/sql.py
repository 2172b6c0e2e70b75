"""The :class:`~bastion.jobs.base.Jobs` interface in SQL, once for both databases.

The statements are written with ``?`` placeholders and a few dialect fragments (:class:`Dialect`): the
database's clock, a number of seconds, a JSON value, row locks. Each method runs in one transaction given by
the backend (:meth:`SqlJobs._transaction`): PostgreSQL's READ COMMITTED with row locks (``FOR UPDATE``, and
``SKIP LOCKED`` to claim), SQLite's ``BEGIN IMMEDIATE`` (one writer at a time: nothing to skip).
"""

from __future__ import annotations

import contextlib
import json
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bastion.jobs.base import KEEP_SECONDS, LEASE_SECONDS, REPLAY_SECONDS, Job, Jobs

#: Runs one statement in the current transaction; the rows it returns.
Run = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]

_COLUMNS = "id, kind, key, payload, owner, lease_until, outcome, closed"


@dataclass(frozen=True)
class Dialect:
    """What differs between the databases' SQL."""

    #: The database's current time.
    now: str
    #: A number of seconds given as a ``?`` parameter, to add to or subtract from :attr:`now`.
    seconds: str
    #: A JSON value given as text in a ``?`` parameter.
    json: str
    #: Appended to a SELECT that locks its row; :attr:`skip_locked` to skip rows locked by others.
    lock: str
    skip_locked: str
    #: A time as the database returns it, as a datetime.
    to_datetime: Callable[[Any], datetime]


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


class SqlJobs(Jobs):
    """Jobs in the tables ``jobs`` and ``job_progress`` (their SQL: the backends)."""

    def __init__(self, dialect: Dialect, lease_seconds: float = LEASE_SECONDS) -> None:
        super().__init__(lease_seconds)
        self._d = dialect
        d = dialect
        self._later = f"{d.now} + {d.seconds}"
        self._ago = f"{d.now} - {d.seconds}"

    @abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager[Run]:
        """One transaction, committed when the block ends, rolled back if it raises."""

    @property
    def dialect(self) -> Dialect:
        return self._d

    def transaction(self) -> contextlib.AbstractContextManager[Run]:
        """One transaction of the jobs' database, for the small tables kept beside the jobs
        (:mod:`bastion.jobs.claims`)."""
        return self._transaction()

    def _job(self, run: Run, row: tuple[Any, ...]) -> Job:
        job_id, kind, key, payload, owner, lease_until, outcome, closed = row
        done = {str(sop): int(status) for sop, status in
                run("SELECT sop_uid, status FROM job_progress WHERE job_id = ?", (job_id,))}
        return Job(int(job_id), kind, key, _json(payload), owner, self._d.to_datetime(lease_until), done,
                   None if outcome is None else _json(outcome),
                   bool(closed))

    def begin(self, kind: str, key: str, payload: Mapping[str, Any], owner: str) -> Job:
        d = self._d
        with self._transaction() as run:
            run(f"UPDATE jobs SET closed = TRUE WHERE key = ? AND NOT closed AND outcome IS NOT NULL "
                f"AND finished_at < {self._ago}", (key, REPLAY_SECONDS))
            rows = run(f"INSERT INTO jobs (kind, key, payload, owner, lease_until, created_at) "
                       f"VALUES (?, ?, {d.json}, ?, {self._later}, {d.now}) "
                       f"ON CONFLICT (key) WHERE NOT closed DO NOTHING RETURNING {_COLUMNS}",
                       (kind, key, json.dumps(payload), owner, self.lease_seconds))
            if rows:
                return self._job(run, rows[0])
            found = run(f"SELECT id FROM jobs WHERE key = ? AND NOT closed{d.lock}", (key,))
            return self._take(run, int(found[0][0]), owner)

    def _take(self, run: Run, job_id: int, owner: str) -> Job:
        """Job ``job_id``, leased to ``owner`` if it is unfinished and its lease ran out."""
        d = self._d
        rows = run(f"UPDATE jobs SET owner = ?, lease_until = {self._later} WHERE id = ? "
                   f"AND outcome IS NULL AND lease_until < {d.now} RETURNING {_COLUMNS}",
                   (owner, self.lease_seconds, job_id))
        return self._job(run, rows[0] if rows else run(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,))[0])

    def claim(self, job: Job, owner: str) -> Job:
        with self._transaction() as run:
            return self._take(run, job.id, owner)

    def claim_expired(self, owner: str) -> Job | None:
        d = self._d
        with self._transaction() as run:
            rows = run(f"UPDATE jobs SET owner = ?, lease_until = {self._later} WHERE id = ("
                       f"SELECT id FROM jobs WHERE outcome IS NULL AND lease_until < {d.now} "
                       f"ORDER BY lease_until LIMIT 1{d.skip_locked}) "
                       f"AND outcome IS NULL AND lease_until < {d.now} RETURNING {_COLUMNS}",
                       (owner, self.lease_seconds))
            return self._job(run, rows[0]) if rows else None

    def renew(self, job: Job) -> bool:
        with self._transaction() as run:
            return bool(run(f"UPDATE jobs SET lease_until = {self._later} WHERE id = ? AND owner = ? "
                            "AND outcome IS NULL RETURNING id", (self.lease_seconds, job.id, job.owner)))

    def release(self, job: Job) -> None:
        with self._transaction() as run:
            run(f"UPDATE jobs SET lease_until = {self._ago} WHERE id = ? AND owner = ? AND outcome IS NULL",
                (1.0, job.id, job.owner))

    def record_progress(self, job: Job, sop_uid: str, status: int) -> None:
        with self._transaction() as run:
            run("INSERT INTO job_progress (job_id, sop_uid, status) VALUES (?, ?, ?) "
                "ON CONFLICT (job_id, sop_uid) DO UPDATE SET status = excluded.status", (job.id, sop_uid, status))

    def finish(self, job: Job, outcome: Mapping[str, Any]) -> bool:
        with self._transaction() as run:
            return bool(run(f"UPDATE jobs SET outcome = {self._d.json}, finished_at = {self._d.now} "
                            "WHERE id = ? AND owner = ? AND outcome IS NULL RETURNING id",
                            (json.dumps(outcome), job.id, job.owner)))

    def answered(self, job: Job) -> None:
        with self._transaction() as run:
            run("UPDATE jobs SET closed = TRUE WHERE id = ? AND outcome IS NOT NULL", (job.id,))

    def get(self, key: str) -> Job | None:
        with self._transaction() as run:
            rows = run(f"SELECT {_COLUMNS} FROM jobs WHERE key = ? ORDER BY closed, id DESC LIMIT 1", (key,))
            return self._job(run, rows[0]) if rows else None

    def prune(self) -> int:
        with self._transaction() as run:
            return len(run(f"DELETE FROM jobs WHERE outcome IS NOT NULL AND finished_at < {self._ago} "
                           "RETURNING id", (KEEP_SECONDS,)))

