"""Priors on an edge: the previous studies of a patient fetched from upstream, warmed by a query, evicted later.

* **A patient's priors.** When the edge stores the first instance of a study (one it forwards upstream, not one
  that came from there), a job for its patient (by Patient ID) joins the durable queue (:mod:`.edge_store`). The
  job asks upstream for the patient's studies (C-FIND STUDY or QIDO-RS, by PatientID), takes those not held here,
  newest first (Study Date, Study Time), at most ``prefetch_priors``, and fetches each (C-MOVE to this node's AE,
  or WADO-RS). A job that fails is tried again later (:func:`retry_delay`); it stays queued across restarts.
* **The prefetch query** (``[prefetch] query``), run every ``prefetch_interval`` seconds, queues a job for each
  study it finds that is not held here.
* **Eviction.** Every study fetched is marked first (:meth:`EdgeStore.mark_prefetched`); the daily sweep evicts
  those marked longer ago than ``prefetch_keep_days``: each instance whose current version upstream holds (it
  came from there, or was delivered there) leaves the index and its blob is deleted. An instance acquired here
  that upstream does not hold yet is never evicted (the study stays marked, looked at again the next day).
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from bastion.archive import Archive
from bastion.forward.edge_store import PATIENT, STUDY, EdgeStore, Job
from bastion.forward.upstream import StudyFound, Upstream, resolve_dates
from bastion.index.base import Index
from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition, MatchType
from bastion.settings import Settings

log = logging.getLogger("bastion.forward.priors")
DAY_S = 86400.0
_PATIENT_ID = "00100020"


def _study(uid: str) -> list[Condition]:
    return [Condition("StudyInstanceUID", 0x0020000D, "UI", MatchType.SINGLE, (uid,))]


def held_here(index: Index, study_uid: str) -> bool:
    """Whether the index holds any instance of ``study_uid``."""
    return bool(index.find(QueryLevel.STUDY, _study(study_uid), limit=1))


def queue_priors(edge: EdgeStore, index: Index, study_uids: Iterable[str]) -> int:
    """A priors job for the patient of each study seen here for the first time; how many were queued."""
    added = 0
    for study_uid in edge.first_seen(study_uids):
        rows = index.find(QueryLevel.STUDY, _study(study_uid), limit=1)
        values = (rows[0].get(_PATIENT_ID) or {}).get("Value") if rows else None
        if values and str(values[0]).strip():
            added += edge.add_job(PATIENT, str(values[0]).strip())
    return added


def retry_delay(attempts: int) -> float:
    """Seconds before a failed prefetch job is tried again (after ``attempts`` earlier failures)."""
    return min(600.0, 5.0 * 2.0 ** min(attempts, 10))


def priors_to_fetch(found: Iterable[StudyFound], index: Index, most: int) -> list[StudyFound]:
    """Of ``found``, those not held here, newest first, at most ``most``."""
    newest_first = sorted(found, key=lambda s: (s.study_date, s.study_time), reverse=True)
    out: list[StudyFound] = []
    for study in newest_first:
        if len(out) >= most:
            break
        if not held_here(index, study.study_uid):
            out.append(study)
    return out


def run_job(job: Job, index: Index, edge: EdgeStore, upstream: Upstream, settings: Settings) -> int:
    """Fetch what ``job`` asks for (see the module docstring); how many studies. Raises when upstream fails."""
    if job.kind == PATIENT:
        studies = priors_to_fetch(upstream.find_studies({"PatientID": job.key}), index, settings.prefetch_priors)
    elif job.kind == STUDY and not held_here(index, job.key):
        studies = upstream.find_studies({"StudyInstanceUID": job.key})[:1]
    else:
        studies = []
    for study in studies:
        edge.mark_prefetched(study.study_uid, study.patient_id)
        n = upstream.retrieve(study.study_uid)
        log.info("prefetched study %s of patient %s from upstream (%d instance(s))", study.study_uid,
                 study.patient_id, n)
    return len(studies)


def warm(index: Index, edge: EdgeStore, upstream: Upstream, settings: Settings,
         today: datetime.date | None = None) -> int:
    """Run the ``[prefetch] query``: a job for each study it finds that is not held here; how many were queued."""
    keys = resolve_dates(settings.prefetch, today or datetime.date.today())
    return sum(edge.add_job(STUDY, s.study_uid) for s in upstream.find_studies(keys)
               if not held_here(index, s.study_uid))


@dataclass
class Eviction:
    """What a sweep did: studies evicted whole, instances removed, instances kept (upstream lacks them)."""

    studies: int = 0
    instances: int = 0
    kept: int = 0


def evict(archive: Archive, edge: EdgeStore, keep_days: float, now: float | None = None) -> Eviction:
    """Evict the studies prefetched more than ``keep_days`` ago (see the module docstring)."""
    out = Eviction()
    for study_uid in edge.prefetched_before((now or time.time()) - keep_days * DAY_S):
        kept = 0
        for record in archive.index.instances(QueryLevel.STUDY, _study(study_uid)):
            if edge.held_key(record.sop_uid) != record.blob_key:
                kept += 1  # acquired (or changed) here, and upstream does not hold it yet
                continue
            if archive.index.delete_instance(record.sop_uid) is not None:
                archive.blobs.delete(record.blob_key)
                out.instances += 1
        out.kept += kept
        if not kept:
            edge.unmark_prefetched(study_uid)
            out.studies += 1
    if out.instances or out.kept:
        log.info("evicted %d prefetched instance(s) (%d stud(ies)); kept %d upstream does not hold yet",
                 out.instances, out.studies, out.kept)
    return out
