"""The report versions that signed SRs carry, kept wherever those SRs are stored.

A signed report's SR carries the version it signs (:func:`bastion.reporting.sr.carried_report`). The intake
follows the index's change log (:meth:`Index.changes_after`) from a position kept in a file, as the metadata warmer
does, reads every Basic Text SR stored and keeps the report version it carries (:meth:`ReportIntake.take`) if the
report log does not hold that version: write-once, so the same report again changes nothing, and another report
under that version is left as it is (a WARNING). So a report signed on an edge node reaches the centre with its SR,
an SR stored by a sign whose report write then failed makes its report final, and an SR found by ``index rebuild``
brings back a report whose blobs were lost. When the log it followed is gone (a rebuild, :meth:`Index.clear`) it
reads the new one from its start; a first start reads the whole log. Runs in the server's primary process, once a
second (:data:`INTERVAL_S`) while there is nothing new.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from bastion.blobs.base import BlobStore
from bastion.blobs.reportlog import NEW, OTHER, ReportLog
from bastion.errors import BastionError
from bastion.index.base import STORED, Index, LogPosition
from bastion.index.reports import ReportRow
from bastion.reporting.report import SIGNED
from bastion.reporting.sr import BASIC_TEXT_SR, carried_report, is_report_series

log = logging.getLogger("bastion.reporting")

#: The file (in the data directory) holding the change-log position handled (``<epoch>:<seq>``).
CHECKPOINT = "report-intake.position"
INTERVAL_S, BATCH = 1.0, 500


class ReportIntake:
    """Keeps the reports that the SRs stored in ``blobs`` (as ``index`` lists them) carry, sealed under the key
    ``key()`` answers (:class:`bastion.reporting.seal.ReportKey`); ``checkpoint``: the file of its position (None: not kept, for a one-off
    :meth:`catch_up`); ``on_kept(doc)`` is called with each version it writes (the HL7 sender's ``consider``)."""

    def __init__(self, blobs: BlobStore, index: Index, key: Callable[[], bytes], checkpoint: Path | None = None,
                 interval_s: float = INTERVAL_S, on_kept: Callable[[dict[str, Any]], object] | None = None) -> None:
        self.blobs, self.index, self.key, self.checkpoint = blobs, index, key, checkpoint
        self.on_kept = on_kept
        self.log = ReportLog(blobs)
        self.interval_s = interval_s
        self.kept = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self, doc: dict[str, Any]) -> bool:
        """Keep report version ``doc`` (from an SR) unless another is kept under it; record it in the index (where
        a newer version stays). True if this wrote it."""
        if doc.get("state") not in SIGNED:
            log.warning("SR %s carries report %s in state %r, not a signed one: left out", doc["sr"][-1], doc["id"],
                        doc.get("state"))
            return False
        done = self.log.keep(doc)
        if done == OTHER:
            log.warning("report %s version %d is kept already with other content than SR %s carries: the kept one "
                        "stays", doc["id"], doc["version"], doc["sr"][-1])
            return False
        self.index.put_report(ReportRow.of(doc))
        if done == NEW:
            log.info("report %s version %d (%s) kept from its SR %s", doc["id"], doc["version"], doc["state"],
                     doc["sr"][-1])
            if self.on_kept is not None:
                self.on_kept(doc)
        return done == NEW

    def carried(self, sop_uid: str, blob_key: str | None = None) -> dict[str, Any] | None:
        """The report version that the SR ``sop_uid`` (its stored version ``blob_key``, else the current one)
        carries; None if no such SR is stored or it carries none."""
        record = self.index.current(sop_uid)
        if record is None or record.sop_class_uid != BASIC_TEXT_SR:
            return None
        try:
            ds = pydicom.dcmread(io.BytesIO(self.blobs.get(blob_key or record.blob_key)), force=True)
        except (BastionError, OSError, ValueError, InvalidDicomError) as exc:
            log.error("SR %s cannot be read: %s", sop_uid, exc)
            return None
        return carried_report(ds, self.key())

    def position(self) -> LogPosition:
        """Where it goes on from: its stored position, else the start of the log."""
        try:
            return LogPosition.parse(self.checkpoint.read_text()) if self.checkpoint else self.index.log_start()
        except (OSError, ValueError):
            return self.index.log_start()

    def run_once(self, since: LogPosition) -> LogPosition:
        """Handle one batch of changes after ``since``; the new position (stored in the checkpoint)."""
        read = self.index.changes_after(since, BATCH)
        if read.reset:
            log.info("report intake: the index has a new change log (rebuilt or cleared): reading it from its start")
        for change in read.changes:
            if change.kind != STORED or not is_report_series(change.series_uid):
                continue  # not a report's SR: no need to look it up
            try:
                doc = self.carried(change.sop_uid, change.blob_key)
                if doc is not None:
                    self.kept += self.take(doc)
            except (BastionError, KeyError, TypeError, ValueError) as exc:
                log.error("report intake: SR %s: %s", change.sop_uid, exc)
                if isinstance(exc, BastionError) and exc.http_status >= 500:
                    return LogPosition(read.position.epoch, change.seq - 1)  # tried again on the next pass
        if read.position != since:
            self._save(read.position)
        return read.position

    def catch_up(self) -> int:
        """Handle every change after its position now; how many report versions it kept."""
        before, since = self.kept, self.position()
        while True:
            after = self.run_once(since)
            if after == since:
                return self.kept - before
            since = after

    def _save(self, position: LogPosition) -> None:
        if self.checkpoint is None:
            return
        try:
            fd, tmp = tempfile.mkstemp(dir=self.checkpoint.parent, prefix=".tmp-intake-")
            with os.fdopen(fd, "w") as fh:
                fh.write(str(position))
            os.replace(tmp, self.checkpoint)
        except OSError as exc:  # read again from the last one kept: taking a report twice changes nothing
            log.warning("report intake: position not kept: %s", exc)

    def start(self) -> ReportIntake:
        """Follow the change log in a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="bastion-report-intake", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        since = self.position()
        while not self._stop.is_set() and not self.index.closed:
            try:
                after = self.run_once(since)
            except Exception as exc:  # noqa: BLE001 - the index is busy or gone for now: the next pass tries again
                log.error("report intake: %s", exc)
                after = since
            if after == since:
                self._stop.wait(self.interval_s)
            since = after
