"""An edge's own state, in ``<data>/edge.sqlite3`` (beside the forwarding queue, never in the index):

* **held**: each instance upstream holds, with the version (blob key) it holds: one delivered there (the
  ``upstream`` queue's destination answered success) or received from there (a prior). The Storage Commitment
  hook (``commit_after_upstream``), the reconciliation and the eviction of priors read it.
* **seen**: the studies whose first instance made the edge ask for the patient's priors.
* **jobs**: the durable prefetch queue: a patient's priors (``patient``, by Patient ID) or one study
  (``study``, from the ``[prefetch] query``), each tried again with a backoff until it succeeds.
* **prefetched**: the studies fetched from upstream, and when: the daily sweep evicts them after
  ``prefetch_keep_days``.
* **meta**: the last reconciliation's report.

Like the queue (:class:`~bastion.forward.sqlite.SqliteFile`), every method is one transaction, committed with
``synchronous = FULL``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.forward.sqlite import Run, SqliteFile
from bastion.settings import Settings

#: The file in the data directory.
EDGE_FILE = "edge.sqlite3"
VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS held (
  sop_uid TEXT PRIMARY KEY,
  study_uid TEXT NOT NULL,
  blob_key TEXT NOT NULL,
  at REAL NOT NULL,
  content_checked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS held_at ON held (at);
CREATE TABLE IF NOT EXISTS seen (
  study_uid TEXT PRIMARY KEY,
  at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
  id INTEGER PRIMARY KEY,
  kind TEXT NOT NULL,
  key TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  due REAL NOT NULL,
  last_error TEXT NOT NULL DEFAULT '',
  created_at REAL NOT NULL,
  UNIQUE (kind, key)
);
CREATE TABLE IF NOT EXISTS prefetched (
  study_uid TEXT PRIMARY KEY,
  patient_id TEXT NOT NULL,
  at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
  name TEXT PRIMARY KEY,
  value TEXT NOT NULL
)
"""
#: Kinds of prefetch job.
PATIENT, STUDY = "patient", "study"


@dataclass(frozen=True)
class Held:
    """An instance upstream holds: the version (blob key) it holds, and whether a reconciliation found its content
    there the same (it is not compared again)."""

    sop_uid: str
    study_uid: str
    blob_key: str
    content_checked: bool = False


@dataclass(frozen=True)
class Job:
    """A prefetch job: the priors of a patient (``kind`` :data:`PATIENT`, ``key`` its Patient ID) or one study
    (:data:`STUDY`, its Study Instance UID)."""

    id: int
    kind: str
    key: str
    attempts: int


def edge_path(settings: Settings) -> Path:
    """Where the node's edge state is kept."""
    return settings.data / EDGE_FILE


class EdgeStore(SqliteFile):
    """The edge's state (see the module docstring)."""

    def __init__(self, path: str | Path, clock: Any = time.time) -> None:
        super().__init__(path, SCHEMA, VERSION, "edge state", clock)

    # -- what upstream holds -------------------------------------------------------------------------
    def record_held(self, held: Iterable[Held]) -> None:
        """Upstream holds these versions now."""
        now = self._clock()
        with self._transaction() as run:
            for h in held:
                run("INSERT INTO held (sop_uid, study_uid, blob_key, at) VALUES (?, ?, ?, ?) ON CONFLICT (sop_uid) "
                    "DO UPDATE SET study_uid = excluded.study_uid, blob_key = excluded.blob_key, at = excluded.at, "
                    "content_checked = 0", (h.sop_uid, h.study_uid, h.blob_key, now))

    def content_checked(self, sop_uids: Sequence[str]) -> None:
        """A reconciliation found these held upstream with the same content."""
        with self._transaction() as run:
            for sop in sop_uids:
                run("UPDATE held SET content_checked = 1 WHERE sop_uid = ?", (sop,))

    def forget_held(self, sop_uids: Sequence[str]) -> None:
        """Upstream was found not to hold these (the reconciliation sends them again)."""
        with self._transaction() as run:
            for sop in sop_uids:
                run("DELETE FROM held WHERE sop_uid = ?", (sop,))

    def held_key(self, sop_uid: str) -> str | None:
        """The blob key of the version of ``sop_uid`` upstream holds, or None."""
        with self._transaction() as run:
            rows = run("SELECT blob_key FROM held WHERE sop_uid = ?", (sop_uid,))
        return str(rows[0][0]) if rows else None

    def held_since(self, since: float) -> list[Held]:
        """The instances recorded as held since ``since`` (Unix time), by study."""
        with self._transaction() as run:
            rows = run("SELECT sop_uid, study_uid, blob_key, content_checked FROM held WHERE at >= ? "
                       "ORDER BY study_uid, sop_uid", (since,))
        return [Held(sop, study, key, bool(checked)) for sop, study, key, checked in rows]

    # -- priors ----------------------------------------------------------------------------------------
    def first_seen(self, study_uids: Iterable[str]) -> list[str]:
        """Those of ``study_uids`` not seen before, now seen."""
        now = self._clock()
        with self._transaction():
            return [uid for uid in dict.fromkeys(study_uids)
                    if self._conn.execute("INSERT OR IGNORE INTO seen (study_uid, at) VALUES (?, ?)",
                                          (uid, now)).rowcount]

    def add_job(self, kind: str, key: str) -> bool:
        """Queue a prefetch job (one of the same kind and key already queued is not added twice)."""
        with self._transaction():
            now = self._clock()
            return bool(self._conn.execute("INSERT OR IGNORE INTO jobs (kind, key, due, created_at) "
                                           "VALUES (?, ?, ?, ?)", (kind, key, now, now)).rowcount)

    def next_job(self) -> Job | None:
        """The oldest due job (it stays queued until :meth:`job_done`)."""
        with self._transaction() as run:
            rows = run("SELECT id, kind, key, attempts FROM jobs WHERE due <= ? ORDER BY due, id LIMIT 1",
                       (self._clock(),))
        return Job(*rows[0]) if rows else None

    def job_done(self, job_id: int) -> None:
        with self._transaction() as run:
            run("DELETE FROM jobs WHERE id = ?", (job_id,))

    def job_failed(self, job_id: int, error: str, delay: float) -> None:
        """Try ``job_id`` again ``delay`` seconds from now."""
        with self._transaction() as run:
            run("UPDATE jobs SET attempts = attempts + 1, due = ?, last_error = ? WHERE id = ?",
                (self._clock() + delay, error, job_id))

    def jobs_due_now(self) -> int:
        """Make every waiting job due now (upstream answers again); how many."""
        with self._transaction():
            return int(self._conn.execute("UPDATE jobs SET due = ? WHERE due > ?",
                                          (self._clock(), self._clock())).rowcount)

    def mark_prefetched(self, study_uid: str, patient_id: str) -> None:
        """``study_uid`` is being fetched from upstream (marked before it arrives: what arrives is evictable)."""
        with self._transaction() as run:
            run("INSERT OR IGNORE INTO prefetched (study_uid, patient_id, at) VALUES (?, ?, ?)",
                (study_uid, patient_id, self._clock()))

    def prefetched_before(self, when: float) -> list[str]:
        """The prefetched studies fetched before ``when`` (Unix time)."""
        with self._transaction() as run:
            return [r[0] for r in run("SELECT study_uid FROM prefetched WHERE at < ? ORDER BY at", (when,))]

    def unmark_prefetched(self, study_uid: str) -> None:
        with self._transaction() as run:
            run("DELETE FROM prefetched WHERE study_uid = ?", (study_uid,))

    # -- reports ---------------------------------------------------------------------------------------
    def set_meta(self, name: str, value: Any) -> None:
        with self._transaction() as run:
            run("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, json.dumps(value)))

    def meta(self, name: str) -> Any:
        with self._transaction() as run:
            rows = run("SELECT value FROM meta WHERE name = ?", (name,))
        return json.loads(rows[0][0]) if rows else None

    def counts(self) -> dict[str, int]:
        """How many instances are held upstream, jobs wait, studies are prefetched (for ``/api/queues``)."""
        with self._transaction() as run:
            return {name: int(run(f"SELECT COUNT(*) FROM {table}", ())[0][0])
                    for name, table in (("held_upstream", "held"), ("prefetch_jobs", "jobs"),
                                        ("prefetched_studies", "prefetched"))}

    def _created(self, run: Run) -> None:
        return None
