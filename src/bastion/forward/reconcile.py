"""The reconciliation of an edge with its upstream: does upstream hold, with the same content, each instance
delivered there in the last ``reconcile_days``? Those it lacks or holds different are queued for upstream again.

Study by study, upstream is asked which instances it holds (C-FIND by series at IMAGE level, or QIDO-RS); where it is a
Bastion, also what it stores of each (``GET /api/studies/{uid}/digests``: transfer syntax and the digest of the data
set, the bytes after the File Meta Information, which every receiver writes anew), compared with this node's
stored version where both are in the same transfer syntax (an instance converted on the way, because upstream
accepted not its stored syntax, cannot be compared byte for byte and counts as held). An instance found the same is
not compared again (its presence is), so a reconciliation every few minutes hashes each instance once. An instance whose current
version here is not the one upstream was sent (superseded since) is left to the queue, which has it already.

It runs after a delivery to upstream succeeds following failures, every ``reconcile_interval`` seconds, and on
``bastion queue reconcile``; its last report is kept in the edge's state (``/api/queues``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from itertools import groupby

from bastion.archive import Archive
from bastion.forward.edge_store import EdgeStore, Held
from bastion.forward.queue import ForwardQueue, NewEntry
from bastion.forward.upstream import Upstream, UpstreamUnreachable
from bastion.model import digest
from bastion.model.part10 import dataset_offset
from bastion.model.records import InstanceRecord
from bastion.settings import UPSTREAM

log = logging.getLogger("bastion.forward.reconcile")
DAY_S = 86400.0
LAST_RECONCILE = "last_reconcile"


@dataclass
class ReconcileReport:
    """What one reconciliation found: instances checked, held by upstream as they are here, missing there,
    held there with other content, queued again, and studies upstream could not be asked about."""

    started_at: float = 0.0
    finished_at: float = 0.0
    studies: int = 0
    checked: int = 0
    held: int = 0
    missing: int = 0
    different: int = 0
    requeued: int = 0
    unreachable_studies: int = 0
    error: str = ""


def dataset_digest(data: bytes) -> str:
    """The BLAKE3 digest of a Part 10 file's data set (after its File Meta Information)."""
    return digest.text(digest.of_bytes(memoryview(data)[dataset_offset(data):]))


def reconcile(archive: Archive, edge: EdgeStore, queue: ForwardQueue, upstream: Upstream,
              days: float) -> ReconcileReport:
    """Check the instances delivered upstream in the last ``days`` (see the module docstring); the counts."""
    report = ReconcileReport(started_at=time.time())
    held = edge.held_since(report.started_at - days * DAY_S)
    for study_uid, group in groupby(held, key=lambda h: h.study_uid):
        items = list(group)
        report.studies += 1
        try:
            _reconcile_study(archive, edge, queue, upstream, study_uid, items, report)
        except UpstreamUnreachable as exc:
            report.unreachable_studies += 1
            report.error = exc.message
            if report.unreachable_studies >= 3 and report.held == 0:
                break  # upstream is down again: the next reconnection reconciles
    report.finished_at = time.time()
    edge.set_meta(LAST_RECONCILE, asdict(report))
    log.info("reconciliation with upstream: %d instance(s) of %d stud(ies) checked, %d held, %d missing, "
             "%d different, %d queued again%s", report.checked, report.studies, report.held, report.missing,
             report.different, report.requeued,
             f", {report.unreachable_studies} stud(ies) not checked: {report.error}" if report.error else "")
    return report


def _reconcile_study(archive: Archive, edge: EdgeStore, queue: ForwardQueue, upstream: Upstream, study_uid: str,
                     items: list[Held], report: ReconcileReport) -> None:
    there = upstream.instances(study_uid)
    unchecked = any(not h.content_checked for h in items)
    digests = upstream.digests(study_uid) if there and unchecked else None
    resend: list[InstanceRecord] = []
    same: list[str] = []
    for item in items:
        record = archive.index.current(item.sop_uid)
        if record is None or record.blob_key != item.blob_key:
            continue  # deleted or superseded here since: the queue has the new version
        report.checked += 1
        if item.sop_uid not in there:
            report.missing += 1
            resend.append(record)
            continue
        theirs = None if digests is None or item.content_checked else digests.get(item.sop_uid)
        if theirs is not None and theirs.transfer_syntax == record.transfer_syntax:
            if theirs.dataset_digest != dataset_digest(archive.retriever.read(record)):
                report.different += 1
                resend.append(record)
                continue
            same.append(item.sop_uid)
        report.held += 1
    if same:
        edge.content_checked(same)
    if resend:
        edge.forget_held([r.sop_uid for r in resend])
        report.requeued += queue.requeue([NewEntry(UPSTREAM, r.sop_uid, r.study_uid, 0) for r in resend])
