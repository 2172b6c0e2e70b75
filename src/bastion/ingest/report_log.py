"""Bring the index's reports back from the blob store(s) after a rebuild (and at start, for an index made before
the ``reports`` table): :mod:`bastion.blobs.reportlog` is the truth, :mod:`bastion.index.reports` derived."""

from __future__ import annotations

import logging

from bastion.blobs.base import BlobStore
from bastion.blobs.reportlog import ReportLog
from bastion.errors import BastionError
from bastion.index.base import Index
from bastion.index.reports import ReportRow

log = logging.getLogger("bastion.ingest")


def apply_report_log(blobs: BlobStore, index: Index) -> int:
    """Record the latest version of every report kept in ``blobs`` into ``index`` (a newer one kept there stays);
    how many were recorded. Never raises for one bad report: it is logged and left out."""
    done = 0
    for doc in ReportLog(blobs).latest():
        try:
            index.put_report(ReportRow.of(doc))
            done += 1
        except (BastionError, KeyError, TypeError, ValueError) as exc:
            log.error("report %s cannot be indexed: %s", doc.get("id"), exc)
    return done
