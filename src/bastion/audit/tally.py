"""Stores counted per study over an association, a request or an import run, then audited once per study.

The store path is hot: auditing each instance would cost a queued event each. Instead the adapter counts each
store here (a dict update) and records one ``store`` event per study at the end (PS3.15 A.5.3.2, DICOM Instances
Transferred: one message may describe many instances of a study).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field

from bastion.audit.events import AuditEvent, AuditKind, Outcome


@dataclass
class _Study:
    patient_id: str = ""
    stored: int = 0
    failed: int = 0
    reasons: list[str] = field(default_factory=list)


class StoreTally:
    """Counts stored and failed instances per study (thread-safe: an import stores from several threads)."""

    def __init__(self) -> None:
        self._studies: dict[str, _Study] = {}
        self._lock = threading.Lock()

    def stored(self, study_uid: str, patient_id: str) -> None:
        """One instance stored (or already held: a duplicate counts too; it was transferred)."""
        with self._lock:
            study = self._studies.get(study_uid)
            if study is None:
                study = self._studies[study_uid] = _Study(patient_id)
            study.stored += 1

    def failed(self, reason: str, study_uid: str = "", patient_id: str = "") -> None:
        """One instance refused; ``study_uid`` if it is known."""
        with self._lock:
            study = self._studies.get(study_uid)
            if study is None:
                study = self._studies[study_uid] = _Study(patient_id)
            study.failed += 1
            if len(study.reasons) < 3 and reason not in study.reasons:
                study.reasons.append(reason)

    def __bool__(self) -> bool:
        return bool(self._studies)

    def events(self, template: AuditEvent) -> list[AuditEvent]:
        """One ``store`` event per study (``template`` gives who, where from and via), and clear the tally. Outcome
        success if all were stored, minor failure if some failed, serious failure if none was stored."""
        with self._lock:
            studies, self._studies = self._studies, {}
        out = []
        for uid, study in studies.items():
            outcome = (Outcome.SUCCESS if not study.failed
                       else Outcome.MINOR_FAILURE if study.stored else Outcome.SERIOUS_FAILURE)
            detail = f"{study.failed} refused: {'; '.join(study.reasons)}" if study.failed else ""
            out.append(dataclasses.replace(template, kind=AuditKind.STORE, outcome=outcome, action="C",
                                           patient_id=study.patient_id, studies=(uid,) if uid else (),
                                           count=study.stored, detail=detail))
        return out
