"""Radiology reports in the blob store(s): every version a write-once JSON object, every recording beside it.

As the state log (:mod:`bastion.blobs.statelog`), reports are archive state that is not a DICOM object, kept where
``bastion index rebuild`` and the rebuild at start find them again, through :meth:`BlobStore.put` (on a
:class:`bastion.blobs.copies.Copies`: into every store, and on S3), never changed and never removed by Bastion:

    ``reports/<report id>/v<version, 8 digits>.json``   one version of the report (its whole JSON)
    ``reports/<report id>/audio/<audio id>``             one dictated recording (its bytes as received)

A version is written once (:meth:`BlobStore.put_once`: atomic on the filesystem, by ``link``, and on S3, by
``If-None-Match: *``): of two writers of one version, on one node or two, the first stores it and the second is
refused (:class:`VersionTaken`) unless it wrote the same report. The index's ``reports`` table (:mod:`bastion.index.reports`) holds each report's latest version, derived
from these objects (:func:`latest`).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from bastion.blobs.base import BlobStore
from bastion.errors import BastionError

log = logging.getLogger("bastion.blobs")

#: The key prefix of the reports' objects (never an object key: :func:`bastion.model.records.parse_object_key` does
#: not parse it, so the rebuild's listing of stored objects leaves them out).
REPORT_PREFIX = "reports/"
_VERSION_KEY = re.compile(r"^reports/([0-9a-f]{32})/v(\d{8})\.json$")
_ID = re.compile(r"^[0-9a-f]{32}$")


class VersionTaken(BastionError):
    """The version of a report is written already (a concurrent change won): HTTP 409."""

    http_status = 409


#: What :meth:`ReportLog.keep` did: wrote the version, found it kept already, or found another report there.
NEW, SAME, OTHER = "new", "same", "other"


def encoded(doc: dict[str, Any]) -> bytes:
    """A report version's bytes as kept (and as a signed report's SR carries them): sorted JSON in UTF-8."""
    return json.dumps(doc, sort_keys=True).encode()


def version_key(report_id: str, version: int) -> str:
    return f"{REPORT_PREFIX}{report_id}/v{version:08d}.json"


def audio_key(report_id: str, audio_id: str) -> str:
    return f"{REPORT_PREFIX}{report_id}/audio/{audio_id}"


def is_report_id(text: str) -> bool:
    return _ID.fullmatch(text) is not None


class ReportLog:
    """The reports kept in the blob store ``blobs``."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs

    def write(self, doc: dict[str, Any]) -> None:
        """Write version ``doc["version"]`` of report ``doc["id"]``, durably when this returns; VersionTaken if
        that version is kept already with other content."""
        if self.keep(doc) == OTHER:
            raise VersionTaken(f"report {doc['id']} version {doc['version']} exists already")

    def keep(self, doc: dict[str, Any]) -> str:
        """Write version ``doc["version"]`` of report ``doc["id"]`` unless it is kept already: :data:`NEW` (its
        bytes are kept now: written now, or they were there), :data:`SAME` (kept already, the same report in other
        bytes) or :data:`OTHER` (kept already with other content, left as it is)."""
        report_id, version = str(doc["id"]), int(doc["version"])
        if self.blobs.put_once(version_key(report_id, version), encoded(doc)):
            return NEW
        return SAME if self.read(report_id, version) == doc else OTHER

    def read(self, report_id: str, version: int) -> dict[str, Any]:
        data = json.loads(self.blobs.get(version_key(report_id, version)))
        if not isinstance(data, dict):
            raise ValueError("not a report")
        return data

    def versions(self, report_id: str) -> list[int]:
        """The versions kept of one report, oldest first."""
        found = (_VERSION_KEY.match(k) for k in self.blobs.keys(f"{REPORT_PREFIX}{report_id}/"))
        return sorted(int(m.group(2)) for m in found if m)

    def put_audio(self, report_id: str, audio_id: str, data: bytes) -> None:
        self.blobs.put(audio_key(report_id, audio_id), data)

    def get_audio(self, report_id: str, audio_id: str) -> bytes:
        return self.blobs.get(audio_key(report_id, audio_id))

    def latest(self) -> list[dict[str, Any]]:
        """The latest version of every report kept; one that cannot be read is logged and its previous version
        used."""
        newest: dict[str, list[int]] = {}
        for key in self.blobs.keys(REPORT_PREFIX):
            m = _VERSION_KEY.match(key)
            if m:
                newest.setdefault(m.group(1), []).append(int(m.group(2)))
        out: list[dict[str, Any]] = []
        for report_id, versions in sorted(newest.items()):
            for version in sorted(versions, reverse=True):
                try:
                    out.append(self.read(report_id, version))
                    break
                except (BastionError, OSError, ValueError) as exc:
                    log.error("report %s version %d cannot be read: %s", report_id, version, exc)
        return out
