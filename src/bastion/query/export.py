"""Export: a study's current instances as DICOM Part 10 files (PS3.10), as stored or de-identified.

The instances are read through the one retrieval path (:class:`~bastion.query.retrieve.Retriever`), so every
copy is checked against its digest. The layout is a folder per patient, study and series, with no DICOMDIR:
``<patient>/<study UID>/<series UID>/<SOP instance UID>.dcm``. Every path component is checked: a UID is used
as a name only when it is digits and dots (:func:`~bastion.model.uids.is_identifiable_uid`), any other text
(a Patient ID) only in a safe form (:func:`safe_component`), and a file is written only where its resolved
path stays inside the output folder.

De-identified (:class:`~bastion.query.deidentify.Deidentifier`), the pixel data are exported as stored: text
burned into them is not removed. An instance likely to carry it (:func:`burned_in_reason`) is listed in the
export's report and, unless asked for, left out.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pydicom
from pydicom.dataset import Dataset

from bastion.errors import InvalidUID, NotFound
from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition, MatchType
from bastion.model.records import InstanceRecord
from bastion.model.uids import is_identifiable_uid
from bastion.query.deid_profile import EDITION
from bastion.query.deidentify import Deidentifier
from bastion.query.retrieve import Retriever

log = logging.getLogger("bastion.export")

#: The report written beside the files (and into a ZIP).
REPORT_NAME: Final = "export-report.json"
#: SOP Classes of Secondary Capture (PS3.4 B.5: 1.2.840.10008.5.1.4.1.1.7 and its multi-frame kinds).
SECONDARY_CAPTURE_PREFIX: Final = "1.2.840.10008.5.1.4.1.1.7"
#: Modalities whose images often carry burned-in text when Burned In Annotation (0028,0301) does not say NO:
#: ultrasound, angiography and fluoroscopy, projection radiography, endoscopy and photography, other.
BURNED_IN_MODALITIES: Final = frozenset({"US", "IVUS", "XA", "RF", "DX", "CR", "ES", "XC", "GM", "OT", "SC", "IO",
                                         "PX"})
_SAFE: Final = re.compile(r"[^A-Za-z0-9._-]")


class ExportError(InvalidUID):
    """The study named for an export is not a UID (HTTP 400)."""


def burned_in_reason(ds: Dataset) -> str | None:
    """Why ``ds`` may carry burned-in text (PS3.3 C.7.6.1.1.8, Burned In Annotation), None if it is unlikely.

    Burned In Annotation (0028,0301) ``YES`` says so; ``NO`` is trusted; without it, a Secondary Capture SOP
    Class or a modality of :data:`BURNED_IN_MODALITIES` is flagged.
    """
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag == "YES":
        return "Burned In Annotation is YES"
    if flag == "NO":
        return None
    if str(ds.get("SOPClassUID", "")).startswith(SECONDARY_CAPTURE_PREFIX):
        return "Secondary Capture without Burned In Annotation NO"
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in BURNED_IN_MODALITIES:
        return f"modality {modality} without Burned In Annotation NO"
    return None


def safe_component(text: str) -> str:
    """``text`` as one path component: itself when it is ``A-Z a-z 0-9 . _ -`` only (not starting with a dot,
    at most 64 characters), else its safe characters and 8 hex digits of its SHA-256 (so that two texts made
    the same by the cleaning stay apart)."""
    cleaned = _SAFE.sub("_", text).lstrip(".")[:64]
    if cleaned == text and cleaned:
        return cleaned
    return f"{cleaned[:48] or 'unnamed'}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _uid_component(uid: str) -> str:
    return uid if is_identifiable_uid(uid) else safe_component(uid)


@dataclass(frozen=True)
class ExportEntry:
    """One exported file: its path under the output folder (``/``-separated) and its bytes."""

    path: str
    data: bytes


@dataclass
class ExportReport:
    """What an export wrote and what it left out; :meth:`to_json` is ``export-report.json``.

    ``patients`` (the source Patient IDs, for the audit trail) is never written into a de-identified report,
    nor are source UIDs: a burned-in instance is named by its new UIDs there.
    """

    deidentified: bool
    include_burned_in: bool
    studies: list[str] = field(default_factory=list)
    exported: int = 0
    burned_in: list[dict[str, Any]] = field(default_factory=list)
    #: Instances that could not be decoded or de-identified: left out, with the reason.
    failed: list[dict[str, str]] = field(default_factory=list)
    patients: set[str] = field(default_factory=set)
    #: Per source study: its source Patient ID and the instances exported of it (for the audit trail).
    per_study: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def left_out(self) -> int:
        """Burned-in instances not exported."""
        return sum(1 for b in self.burned_in if not b["exported"])

    def to_json(self) -> dict[str, Any]:
        """The report as written into the export."""
        body: dict[str, Any] = {"deidentified": self.deidentified, "studies": self.studies,
                                "exported": self.exported, "include_burned_in": self.include_burned_in,
                                "burned_in": self.burned_in, "burned_in_left_out": self.left_out,
                                "failed": self.failed}
        if self.deidentified:
            body["profile"] = {"standard": f"DICOM PS3.15 Annex E ({EDITION})",
                               "options": ["Basic Application Confidentiality Profile (113100)",
                                           "Retain Longitudinal Temporal Information Modified Dates (113107)"],
                               "pixel_data": "not scrubbed: burned-in text stays in the pixels"}
        return body


class Exporter:
    """Reads a study's instances through ``retriever`` and makes the files of an export.

    ``deidentifier``: None for the files as stored. Burned-in instances of a de-identified export are left out
    unless ``include_burned_in``; an export as stored lists them too, and keeps them.
    """

    def __init__(self, retriever: Retriever, deidentifier: Deidentifier | None = None, *,
                 include_burned_in: bool = False) -> None:
        self.retriever = retriever
        self.deidentifier = deidentifier
        self.report = ExportReport(deidentified=deidentifier is not None,
                                   include_burned_in=include_burned_in or deidentifier is None)

    def study_records(self, study_uid: str) -> list[InstanceRecord]:
        """The current instances of ``study_uid``.

        Raises
        ------
        ExportError
            ``study_uid`` is not a UID (digits and dots).
        NotFound
            The archive holds no instance of that study.
        """
        if not is_identifiable_uid(study_uid):
            raise ExportError(f"not a Study Instance UID: {study_uid[:70]!r}", uid=study_uid[:128])
        records = self.retriever.select(QueryLevel.STUDY, [
            Condition("StudyInstanceUID", 0x0020000D, "UI", MatchType.SINGLE, (study_uid,))])
        if not records:
            raise NotFound(f"no study {study_uid} in the archive", uid=study_uid)
        return sorted(records, key=lambda r: (r.series_uid, r.sop_uid))

    def _entry(self, record: InstanceRecord, data: bytes) -> tuple[Dataset, ExportEntry, str]:
        """The stored dataset, its exported file and the exported Study Instance UID."""
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=self.deidentifier is None)
        if self.deidentifier is None:
            patient = str(ds.get("PatientID", "") or "") or "no-patient-id"
            return ds, ExportEntry(_path(patient, record.study_uid, record.series_uid, record.sop_uid), data), \
                record.study_uid
        clean = self.deidentifier.apply(ds)
        out = io.BytesIO()
        clean.save_as(out, enforce_file_format=True)
        entry = ExportEntry(_path(str(clean.PatientID), str(clean.StudyInstanceUID), str(clean.SeriesInstanceUID),
                                  str(clean.SOPInstanceUID)), out.getvalue())
        return ds, entry, str(clean.StudyInstanceUID)

    def entries(self, records: Iterable[InstanceRecord]) -> Iterator[ExportEntry]:
        """The exported files of ``records``, one at a time (one instance in memory at once)."""
        studies: dict[str, None] = dict.fromkeys(self.report.studies)
        for record in records:
            data = self.retriever.read(record)
            try:
                ds, entry, study = self._entry(record, data)
            except Exception as exc:  # pydicom cannot decode or encode it: left out, and said so
                log.warning("export: instance %s left out: %s: %s", record.sop_uid, type(exc).__name__, exc)
                if self.deidentifier is None:
                    failed = {"sop_instance_uid": record.sop_uid, "reason": f"{type(exc).__name__}: {exc}"[:300]}
                else:  # the message may quote a source value: the report names the error's type only
                    failed = {"sop_instance_uid": self.deidentifier.uid(record.sop_uid),
                              "reason": f"{type(exc).__name__} (details in the log)"}
                self.report.failed.append(failed)
                continue
            source_patient = str(ds.get("PatientID", "") or "")
            self.report.patients.add(source_patient)
            self.report.per_study.setdefault(record.study_uid, (source_patient, 0))
            reason = burned_in_reason(ds)
            studies.setdefault(study)
            if reason is not None:
                _patient, _study, series, sop = entry.path.split("/")
                self.report.burned_in.append({
                    "sop_instance_uid": sop.removesuffix(".dcm"), "series_instance_uid": series,
                    "sop_class_uid": record.sop_class_uid,
                    "modality": str(ds.get("Modality", "") or ""), "reason": reason,
                    "exported": self.report.include_burned_in})
                if not self.report.include_burned_in:
                    continue
            self.report.exported += 1
            patient, count = self.report.per_study[record.study_uid]
            self.report.per_study[record.study_uid] = (patient, count + 1)
            yield entry
        self.report.studies = list(studies)


def _path(patient: str, study: str, series: str, sop: str) -> str:
    return "/".join((safe_component(patient), _uid_component(study), _uid_component(series),
                     _uid_component(sop) + ".dcm"))


def inside(root: Path, relative: str) -> Path:
    """``root / relative`` resolved, refused (ValueError) when it would land outside ``root``."""
    base = Path(os.path.realpath(root))
    target = Path(os.path.realpath(base / relative))
    if os.path.commonpath([base, target]) != str(base) or target == base:
        raise ValueError(f"export path {relative!r} leaves the output folder")
    return target


def write_folder(entries: Iterable[ExportEntry], root: Path) -> int:
    """Write ``entries`` under ``root`` (each file whole under a temporary name, then renamed); the count."""
    n = 0
    for entry in entries:
        target = inside(root, entry.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(entry.data)
        os.replace(tmp, target)
        n += 1
    return n


def write_report(report: ExportReport, root: Path) -> Path:
    """``export-report.json`` in ``root``."""
    path = inside(root, REPORT_NAME)
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    return path


class _Chunks(io.RawIOBase):
    """A write-only, non-seekable stream that keeps what is written until :meth:`take`: ``zipfile`` then
    writes data descriptors after each member (APPNOTE 4.3.9), so the archive can be streamed."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self._parts.append(data)
        return len(data)

    def take(self) -> bytes:
        out, self._parts = b"".join(self._parts), []
        return out


def zip_stream(entries: Iterable[ExportEntry], report: ExportReport) -> Iterator[bytes]:
    """A ZIP of ``entries`` and the report (last, once complete), made as it is read: one member in memory."""
    sink = _Chunks()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for entry in entries:
            zf.writestr(entry.path, entry.data)
            yield sink.take()
        zf.writestr(REPORT_NAME, json.dumps(report.to_json(), indent=2) + "\n")
    yield sink.take()


def write_zip(entries: Iterable[ExportEntry], report: ExportReport, path: Path) -> None:
    """The ZIP of :func:`zip_stream` written to ``path`` (under a temporary name, then renamed)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        for chunk in zip_stream(entries, report):
            fh.write(chunk)
    os.replace(tmp, path)
