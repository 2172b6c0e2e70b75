"""Signing and amending, in an order that cannot half-happen.

The signed version is made first (its SR's SOP Instance UID derived from the report's id and the version,
:func:`bastion.reporting.sr.sr_uid`), then its SR, which carries that version whole, is stored through the ingest,
then the version is kept (:class:`bastion.reporting.store.ReportStore`). Should the process die or the report's
write fail after the SR is stored, the SR stands with the report inside it: the intake
(:mod:`bastion.reporting.intake`) keeps that version on its next pass, and a sign or amendment retried before
that finds the SR stored under the UID it would make and keeps the version it carries, rather than storing a
second one. With ``[report] encapsulated_pdf`` on, the version's PDF is stored after its SR, before the version is
kept: a sign that fails there is retried whole (the SR found, the same PDF stored again: a duplicate); one whose
process dies there is kept by the intake from its SR, without its PDF.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bastion.reporting import report as rpt
from bastion.reporting.encapsulated import build_encapsulated_pdf
from bastion.reporting.intake import ReportIntake
from bastion.reporting.sr import build_sr, sr_uid
from bastion.reporting.store import ReportStore

#: The printable PDF of a report version, given the study's attributes (:func:`bastion.reporting.pdf.report_pdf`).
Printable = Callable[[dict[str, Any], dict[str, str]], bytes]


class Signing:
    """Signs and amends the reports of ``store``: ``facts(study_uid)`` answers the study's attributes for the SR
    (:data:`bastion.reporting.sr.STUDY_KEYWORDS`), ``ingest(data)`` stores the SR's bytes, ``intake`` finds an SR
    stored already; ``printable``, if given, makes the version's PDF, stored after its SR as an Encapsulated PDF
    instance (:mod:`bastion.reporting.encapsulated`)."""

    def __init__(self, store: ReportStore, intake: ReportIntake, facts: Callable[[str], dict[str, str]],
                 ingest: Callable[[bytes], object], printable: Printable | None = None) -> None:
        self.store, self.intake, self.facts, self.ingest = store, intake, facts, ingest
        self.printable = printable

    def sign(self, report_id: str, user: str) -> dict[str, Any]:
        """The report signed by ``user``: ``final``, its SR stored."""
        def change(doc: dict[str, Any]) -> dict[str, Any]:
            rpt.check_signable(doc)
            return self._with_sr(rpt.signed(doc, user, rpt.now_iso(), sr_uid(doc["id"], doc["version"] + 1)))
        return self.store.change(report_id, change)

    def amend(self, report_id: str, sections: object, reason: object, user: str) -> dict[str, Any]:
        """The signed report amended by ``user`` with ``sections`` for ``reason``: ``amended``, a new SR stored."""
        def change(doc: dict[str, Any]) -> dict[str, Any]:
            merged = rpt.check_amendable(doc, sections, reason)
            return self._with_sr(rpt.amended(doc, merged, str(reason), user, rpt.now_iso(),
                                             sr_uid(doc["id"], doc["version"] + 1)))
        return self.store.change(report_id, change)

    def _with_sr(self, signed: dict[str, Any]) -> dict[str, Any]:
        """Store the SR of version ``signed``; the version to keep: ``signed``, or the one an SR stored under its UID
        before carries (a sign that stored its SR and failed after)."""
        stored = self.intake.carried(signed["sr"][-1])
        facts = None
        if stored is not None and stored["id"] == signed["id"] and stored["version"] == signed["version"]:
            kept = stored
        else:
            facts = self.facts(str(signed["study"]))
            self.ingest(build_sr(signed, facts, self.intake.key()))
            kept = signed
        if self.printable is not None:  # after the SR (a retry that finds the SR stored stores the same PDF again)
            facts = facts or self.facts(str(signed["study"]))
            self.ingest(build_encapsulated_pdf(kept, facts, self.printable(kept, facts)))
        return kept
