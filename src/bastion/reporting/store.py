"""Where reports are kept: each version a write-once object in the blob store(s), the index's row derived from it.

:class:`ReportStore` makes every change as the next version (:mod:`bastion.reporting.report`), written first to
the blob store(s) (:class:`bastion.blobs.reportlog.ReportLog`, durable when it returns) and then to the index's
``reports`` table (:mod:`bastion.index.reports`). Changes of one report are serialised in this process; a second
process (another node) writing the same version is refused by the write-once key (HTTP 409). Should the index
write fail after the blob write, the next change finds the version taken, records the blob's version into the index
and answers 409: read again.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bastion.blobs.base import BlobStore
from bastion.blobs.reportlog import ReportLog, VersionTaken, is_report_id
from bastion.errors import NotFound
from bastion.index.base import Index
from bastion.index.reports import ReportQuery, ReportRow
from bastion.reporting import report as rpt
from bastion.reporting.templates import Template

Change = Callable[[dict[str, Any]], dict[str, Any]]


class ReportStore:
    """The reports of the archive whose blob store is ``blobs`` and index ``index``."""

    def __init__(self, blobs: BlobStore, index: Index) -> None:
        self.log = ReportLog(blobs)
        self.index = index
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            yield

    def get(self, report_id: str) -> dict[str, Any]:
        """The report's latest version; NotFound (404) for an unknown id."""
        row = self.index.report(report_id) if is_report_id(report_id) else None
        if row is None:
            raise NotFound(f"no report {report_id}")
        return row.document()

    def search(self, query: ReportQuery) -> list[dict[str, Any]]:
        return [row.document() for row in self.index.reports(query)]

    def version(self, report_id: str, version: int) -> dict[str, Any]:
        """One kept version of the report (from the blob store)."""
        if not is_report_id(report_id) or version not in self.log.versions(report_id):
            raise NotFound(f"no version {version} of report {report_id}")
        return self.log.read(report_id, version)

    def _keep(self, doc: dict[str, Any]) -> dict[str, Any]:
        try:
            self.log.write(doc)
        except VersionTaken:
            self._heal(str(doc["id"]))
            raise rpt.ReportConflict(f"report {doc['id']} was changed meanwhile: read it again") from None
        self.index.put_report(ReportRow.of(doc))
        return doc

    def _heal(self, report_id: str) -> None:
        versions = self.log.versions(report_id)
        if versions:
            self.index.put_report(ReportRow.of(self.log.read(report_id, versions[-1])))

    def create(self, study: dict[str, str], template: Template, user: str) -> dict[str, Any]:
        """A new draft of ``study``; ReportConflict (409) if the study has an open report."""
        with self._locked(f"study:{study['study']}"):
            open_row = self.index.open_report(study["study"])
            if open_row is not None:
                raise rpt.ReportConflict(f"study {study['study']} has an open report already: {open_row.id} "
                                         f"({open_row.state})")
            return self._keep(rpt.new_report(study, template, user))

    def change(self, report_id: str, change: Change) -> dict[str, Any]:
        """Apply ``change`` (current version → next version) under the report's lock; the new version."""
        with self._locked(report_id):
            return self._keep(change(self.get(report_id)))

    def put_audio(self, report_id: str, data: bytes) -> str:
        """Keep a recording of the report, durably; its id."""
        self.get(report_id)
        audio_id = uuid.uuid4().hex
        self.log.put_audio(report_id, audio_id, data)
        return audio_id

    def audio(self, report_id: str, audio_id: str) -> bytes:
        doc = self.get(report_id)
        if audio_id not in {str(a.get("id")) for a in doc.get("audio", [])}:
            raise NotFound(f"no recording {audio_id} of report {report_id}")
        return self.log.get_audio(report_id, audio_id)
