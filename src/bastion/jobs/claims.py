"""Claims on the reading list: which radiologist is reading which study, as a lease that runs out.

A claim is transient, like a job's lease, so it is kept beside the jobs (:mod:`bastion.jobs`: ``<data>/jobs.sqlite3``,
or the index's PostgreSQL database, which every node shares) and never in the index, which is a rebuildable cache.
One row per study in ``report_claims``: who holds it (``""``: nobody), until when (the database's clock, as for
leases), and the study's reading priority (``stat``, ``urgent`` or ``routine``), which a radiologist sets on the
reading list; the index keeps no priority of its own.

- :meth:`Claims.take` takes or renews a claim for :attr:`Claims.minutes`; another's unexpired claim refuses it
  (:class:`ClaimHeld`, HTTP 409, naming the holder);
- :meth:`Claims.release` ends one's own claim (an administrator may end anyone's);
- :meth:`Claims.of` reads the live claims and priorities of some studies; an expired claim reads as none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bastion.errors import BastionError
from bastion.jobs.sql import Run, SqlJobs
from bastion.jobs.sqlite import SQLITE

#: A study's reading priority, most pressing first; ``routine`` unless someone set another.
PRIORITIES = ("stat", "urgent", "routine")
ROUTINE = "routine"
#: The table in SQLite (PostgreSQL's: ``index/migrations/postgresql/0007_report_claims.sql``).
SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS report_claims (
  study_uid TEXT PRIMARY KEY,
  claimed_by TEXT NOT NULL DEFAULT '',
  expires REAL,
  priority TEXT NOT NULL DEFAULT 'routine'
)"""
_COLUMNS = "study_uid, claimed_by, expires, priority"


class ClaimHeld(BastionError):
    """Another user holds an unexpired claim on the study (HTTP 409)."""

    http_status = 409

    def __init__(self, claim: Claim) -> None:
        super().__init__(f"study {claim.study} is claimed by {claim.user} until {claim.expires_iso()}")
        self.claim = claim


@dataclass(frozen=True)
class Claim:
    """A study's row: its live claim (``user`` empty when nobody holds one) and its priority."""

    study: str
    user: str = ""
    expires: datetime | None = None
    priority: str = ROUTINE

    def expires_iso(self) -> str:
        return "" if self.expires is None else self.expires.isoformat(timespec="seconds").replace("+00:00", "Z")

    def to_json(self) -> dict[str, Any] | None:
        """The claim as the reading list shows it; None when nobody holds one."""
        return {"user": self.user, "expires": self.expires_iso()} if self.user else None


class Claims:
    """The reading list's claims in the database of ``jobs``; a claim lasts ``minutes``."""

    def __init__(self, jobs: SqlJobs, minutes: float) -> None:
        self.jobs, self.minutes = jobs, minutes
        d = jobs.dialect
        self._later = f"{d.now} + {d.seconds}"
        self._live = self._live_in("report_claims")
        if d is SQLITE:
            with jobs.transaction() as run:
                run(SQLITE_SCHEMA, ())

    def _live_in(self, table: str) -> str:
        """Whether the row of ``table`` holds a live claim, as SQL."""
        return f"({table}.claimed_by <> '' AND {table}.expires > {self.jobs.dialect.now})"

    def _claim(self, row: tuple[Any, ...], live: object = True) -> Claim:
        study, user, expires, priority = row
        if not user or expires is None or not live:
            return Claim(str(study), priority=str(priority))
        return Claim(str(study), str(user), self.jobs.dialect.to_datetime(expires), str(priority))

    def _current(self, run: Run, study: str) -> Claim:
        rows = run(f"SELECT {_COLUMNS}, {self._live} FROM report_claims WHERE study_uid = ?", (study,))
        return self._claim(rows[0][:4], rows[0][4]) if rows else Claim(study)

    def take(self, study: str, user: str) -> Claim:
        """``user``'s claim on ``study`` for :attr:`minutes` from now (taken, renewed, or taken over from an expired
        one); :class:`ClaimHeld` if another holds an unexpired claim."""
        with self.jobs.transaction() as run:
            rows = run(f"INSERT INTO report_claims (study_uid, claimed_by, expires) VALUES (?, ?, {self._later}) "
                       "ON CONFLICT (study_uid) DO UPDATE SET claimed_by = excluded.claimed_by, "
                       "expires = excluded.expires WHERE report_claims.claimed_by = excluded.claimed_by "
                       f"OR NOT {self._live} "
                       f"RETURNING {_COLUMNS}", (study, user, self.minutes * 60.0))
            if rows:
                return self._claim(rows[0])
            raise ClaimHeld(self._current(run, study))

    def release(self, study: str, user: str, anyone: bool = False) -> bool:
        """End ``user``'s claim on ``study`` (``anyone``: whoever holds it); whether a live claim ended.
        :class:`ClaimHeld` if another holds it and ``anyone`` is false."""
        with self.jobs.transaction() as run:
            held = self._current(run, study)
            if not held.user:
                return False
            if held.user != user and not anyone:
                raise ClaimHeld(held)
            run("UPDATE report_claims SET claimed_by = '', expires = NULL WHERE study_uid = ?", (study,))
            run("DELETE FROM report_claims WHERE study_uid = ? AND priority = ?", (study, ROUTINE))
            return True

    def set_priority(self, study: str, priority: str) -> Claim:
        """Set the reading priority of ``study`` (one of :data:`PRIORITIES`); its row as it is then."""
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}")
        with self.jobs.transaction() as run:
            run("INSERT INTO report_claims (study_uid, priority) VALUES (?, ?) "
                "ON CONFLICT (study_uid) DO UPDATE SET priority = excluded.priority", (study, priority))
            return self._current(run, study)

    def of(self, studies: Sequence[str]) -> dict[str, Claim]:
        """The rows of those of ``studies`` that have one (a live claim or a priority other than routine)."""
        out: dict[str, Claim] = {}
        with self.jobs.transaction() as run:
            for start in range(0, len(studies), 500):
                chunk = list(studies[start:start + 500])
                marks = ", ".join("?" for _ in chunk)
                for row in run(f"SELECT {_COLUMNS}, {self._live} FROM report_claims WHERE study_uid IN ({marks})",
                               chunk):
                    claim = self._claim(row[:4], row[4])
                    if claim.user or claim.priority != ROUTINE:
                        out[claim.study] = claim
        return out

    def with_priority(self, priority: str) -> list[str]:
        """The studies whose priority is ``priority`` (not ``routine``: every study without a row is routine)."""
        with self.jobs.transaction() as run:
            return [str(r[0]) for r in run("SELECT study_uid FROM report_claims WHERE priority = ?", (priority,))]

    def prune(self) -> int:
        """Forget the rows that hold nothing: no live claim and the routine priority; how many."""
        with self.jobs.transaction() as run:
            return len(run(f"DELETE FROM report_claims WHERE priority = ? AND NOT {self._live} RETURNING study_uid",
                           (ROUTINE,)))
