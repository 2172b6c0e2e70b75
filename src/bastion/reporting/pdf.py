"""A report as a printable A4 PDF, for wards when nothing else works (fpdf2, a TrueType font embedded).

Every page carries the site's name, the patient's name and ID and, for a report not signed, a ``DRAFT`` or
``PRELIMINARY`` watermark; the foot names the report id, its version and the page (``page 1 of 2``). The first page
holds the patient and study (name, ID, birth date, sex; accession, study date, modality, description), the state, the
signer and time (or a ``NOT SIGNED`` banner), the reason of the last amendment, then each non-empty section under
its title. Text is Unicode throughout: the font (``report_font``, DejaVu Sans by default) is embedded in the file.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fpdf import FPDF
from fpdf.enums import XPos, YPos

from bastion.reporting.report import AMENDED, FINAL, SIGNED

log = logging.getLogger("bastion.reporting.pdf")
FAMILY = "report"
_MARGIN = 15.0
_GREY, _RED = (110, 110, 110), (180, 0, 0)


def _date(value: str) -> str:
    """A DICOM date (YYYYMMDD) as YYYY-MM-DD; anything else as it is."""
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() else value


def person(pn: str) -> str:
    """A DICOM person name (family^given^middle^prefix^suffix) as it is printed: ``Family, Prefix Given Middle
    Suffix``."""
    parts = [*pn.split("=")[0].split("^"), "", "", "", ""][:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    rest = " ".join(p for p in (prefix, given, middle, suffix) if p)
    return f"{family}, {rest}" if family and rest else family or rest


def _when(iso: str) -> str:
    """An ISO 8601 UTC time as ``YYYY-MM-DD HH:MM UTC``."""
    return f"{iso[:10]} {iso[11:16]} UTC" if len(iso) >= 16 else iso


def _instant(iso: str) -> datetime | None:
    """An ISO 8601 time (``2026-12-07T07:14:07.123Z``) as a UTC datetime; None if it is not one."""
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return None


class _Page(FPDF):
    def __init__(self, doc: dict[str, Any], site: str, font: str) -> None:
        super().__init__(orientation="P", unit="mm", format="A4")
        self.doc, self.site = doc, site
        self.unicode_font = _fonts(self, font)
        self.family = FAMILY if self.unicode_font else "helvetica"
        self.set_margins(_MARGIN, _MARGIN, _MARGIN)
        self.set_auto_page_break(True, margin=18)
        self.set_title(f"{doc.get('template_title') or 'Report'}: {person(str(doc.get('patient_name', '')))}")
        self.set_creator("Bastion")
        made = _instant(str(doc.get("signed_at") or doc.get("updated") or ""))
        if made is not None:  # the version's own time: one version, the same bytes (its archived copy, a reprint)
            self.creation_date = made

    def text_of(self, value: object) -> str:
        text = str(value)
        return text if self.unicode_font else text.encode("latin-1", "replace").decode("latin-1")

    def header(self) -> None:
        doc = self.doc
        if doc.get("state") not in SIGNED:
            self.set_font(self.family, "B", 80)
            self.set_text_color(225, 225, 225)
            with self.rotation(45, self.w / 2, self.h / 2):
                self.text(self.w / 2 - 75, self.h / 2 + 10, self.text_of(str(doc.get("state", "draft")).upper()))
        self.set_text_color(0, 0, 0)
        self.set_font(self.family, "B", 13)
        self.cell(0, 7, self.text_of(self.site), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.set_font(self.family, "", 9)
        self.set_text_color(*_GREY)
        self.cell(0, 5, self.text_of(f"Radiology report · {person(str(doc.get('patient_name', '')))} · "
                                     f"Patient ID {doc.get('patient_id', '')}"), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.set_text_color(0, 0, 0)
        self.line(_MARGIN, self.get_y() + 1, self.w - _MARGIN, self.get_y() + 1)
        self.ln(4)

    def footer(self) -> None:
        self.set_y(-13)
        self.set_font(self.family, "", 8)
        self.set_text_color(*_GREY)
        self.cell(0, 5, self.text_of(f"Report {self.doc.get('id', '')} · version {self.doc.get('version', '')} · "
                                     f"page {self.page_no()} of {{nb}}"), align="C")


def _fonts(pdf: FPDF, font: str) -> bool:
    """Register ``font`` (and its ``-Bold`` sibling, if any) as :data:`FAMILY`; False (Helvetica, Latin-1 only)
    if the file cannot be read."""
    path = Path(font)
    if not path.is_file():
        log.warning("report font %s not found: the printable report uses Helvetica (Latin-1 only); install "
                    "fonts-dejavu-core or set report_font", font)
        return False
    bold = path.with_name(f"{path.stem}-Bold{path.suffix}")
    pdf.add_font(FAMILY, "", str(path))
    pdf.add_font(FAMILY, "B", str(bold if bold.is_file() else path))
    return True


def report_pdf(doc: dict[str, Any], study: dict[str, str], site: str, font: str) -> bytes:
    """The printable PDF of report version ``doc``. ``study``: the study's attributes by DICOM keyword
    (PatientBirthDate, PatientSex, StudyDescription; the report's own fields win for the rest); ``site``: the
    hospital's name; ``font``: a TrueType file."""
    pdf = _Page(doc, site, font)
    pdf.add_page()
    t = pdf.text_of
    label_w = 32.0

    def row(label: str, value: object) -> None:
        pdf.set_font(pdf.family, "B", 9)
        pdf.cell(label_w, 5.5, label)
        pdf.set_font(pdf.family, "", 10)
        pdf.multi_cell(0, 5.5, t(value or "-"), new_x=XPos.LMARGIN, new_y=YPos.NEXT)

    row("Patient", person(str(doc.get("patient_name") or study.get("PatientName", ""))))
    row("Patient ID", doc.get("patient_id") or study.get("PatientID", ""))
    row("Birth date", _date(study.get("PatientBirthDate", "")))
    row("Sex", study.get("PatientSex", ""))
    row("Accession", doc.get("accession") or study.get("AccessionNumber", ""))
    row("Study date", _date(str(doc.get("study_date") or study.get("StudyDate", ""))))
    row("Modality", doc.get("modality", ""))
    row("Description", study.get("StudyDescription", ""))
    pdf.ln(3)
    state = str(doc.get("state", ""))
    pdf.set_font(pdf.family, "B", 11)
    if state in SIGNED:
        verb = "Amended" if state == AMENDED else "Signed"
        pdf.multi_cell(0, 6, t(f"{'FINAL' if state == FINAL else 'AMENDED'} · {verb} by {doc.get('signed_by', '')}"
                               f" at {_when(str(doc.get('signed_at', '')))}"), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        if state == AMENDED and doc.get("reason"):
            pdf.set_font(pdf.family, "", 10)
            pdf.multi_cell(0, 5.5, t(f"Reason for amendment: {doc['reason']}"), new_x=XPos.LMARGIN,
                           new_y=YPos.NEXT)
    else:
        pdf.set_text_color(*_RED)
        pdf.multi_cell(0, 6, t(f"{state.upper()}: NOT SIGNED, NOT A FINAL REPORT"), new_x=XPos.LMARGIN,
                       new_y=YPos.NEXT)
        pdf.set_text_color(0, 0, 0)
    pdf.ln(2)
    pdf.set_font(pdf.family, "B", 14)
    pdf.multi_cell(0, 8, t(doc.get("template_title") or "Report"), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    titles = doc.get("section_titles", {})
    for name, text in doc.get("sections", {}).items():
        if not str(text).strip():
            continue
        pdf.ln(2)
        pdf.set_font(pdf.family, "B", 11)
        pdf.multi_cell(0, 6, t(titles.get(name, name)), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.set_font(pdf.family, "", 10.5)
        pdf.multi_cell(0, 5.5, t(str(text).strip()), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    return bytes(pdf.output())
