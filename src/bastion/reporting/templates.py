"""Report templates in the spirit of IHE MRRT (Management of Radiology Report Templates): HTML5 files with named
sections and pick-lists.

A template is an HTML file read with the standard library's :mod:`html.parser`::

    <html>
     <head><title>CT Head</title><meta name="modality" content="CT"></head>
     <body>
      <section id="findings" data-section-name="Findings">
       <header>Findings</header>
       <p>No acute intracranial haemorrhage.</p>
       <select><option>No mass effect.</option><option>Midline shift of __ mm.</option></select>
      </section>
     </body>
    </html>

Its name is the file's stem (``ct-head.html``: ``ct-head``), its title the ``<title>``, its modality the
``<meta name="modality">``. Each ``<section>`` with an ``id`` is a section: its name the ``id``, its title the
``<header>`` (else ``data-section-name``, else the id), its default text the ``<p>`` paragraphs (joined by new
lines) and its pick-list the ``<option>`` texts. Every template has a ``dictation`` section (added, empty, if the
file has none): dictated text is appended there.

Templates ship with Bastion (``reporting/templates/*.html``); an administrator adds their own in
``<data>/report-templates/`` (a file there replaces a shipped one of the same name). A file that cannot be read or
holds no section is skipped with one log line.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

log = logging.getLogger("bastion.reporting")

#: The shipped templates.
SHIPPED = Path(__file__).resolve().parent / "templates"
#: Where an administrator's templates live, under the data directory.
SITE_DIR = "report-templates"
#: The section that dictation appends to.
DICTATION = "dictation"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    text: str = ""
    picklist: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "text": self.text, "picklist": list(self.picklist)}


@dataclass(frozen=True)
class Template:
    name: str
    title: str
    modality: str
    sections: tuple[Section, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "modality": self.modality,
                "sections": [s.to_json() for s in self.sections]}

    def section_names(self) -> list[str]:
        return [s.name for s in self.sections]


class TemplateError(ValueError):
    """A template file that cannot be used."""


class _Parser(HTMLParser):
    """Collects the title, the modality and the sections of one template document."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.modality = ""
        self.sections: list[dict[str, Any]] = []
        self._current: dict[str, Any] | None = None
        self._in: str | None = None  # title, header, p or option
        self._buffer: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        if tag == "meta" and attr.get("name", "").lower() == "modality":
            self.modality = attr.get("content", "").strip().upper()
        elif tag == "section" and attr.get("id"):
            self._current = {"name": attr["id"].strip(), "title": attr.get("data-section-name", "").strip(),
                             "header": "", "paragraphs": [], "options": []}
            self.sections.append(self._current)
        elif tag == "title" or (self._current is not None and tag in ("header", "p", "option")):
            self._in, self._buffer = tag, []

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._current = None
        if tag != self._in:
            return
        text = " ".join("".join(self._buffer).split())
        if tag == "title":
            self.title = text
        elif self._current is not None:
            key = {"header": "header", "p": "paragraphs", "option": "options"}[tag]
            if key == "header":
                self._current["header"] = text
            elif text:
                self._current[key].append(text)
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in is not None:
            self._buffer.append(data)


def parse_template(name: str, html: str) -> Template:
    """The template named ``name`` that ``html`` holds; TemplateError if it holds none."""
    if not _NAME.fullmatch(name):
        raise TemplateError(f"template name {name!r}: lower-case letters, digits, '-' and '_' only")
    parser = _Parser()
    parser.feed(html)
    parser.close()
    sections: list[Section] = []
    for found in parser.sections:
        if not _NAME.fullmatch(found["name"]) or found["name"] in (s.name for s in sections):
            raise TemplateError(f"section id {found['name']!r} is not a unique lower-case name")
        sections.append(Section(found["name"], found["header"] or found["title"] or found["name"],
                                "\n".join(found["paragraphs"]), tuple(found["options"])))
    if not sections:
        raise TemplateError("no <section id=...> in it")
    if DICTATION not in (s.name for s in sections):
        sections.append(Section(DICTATION, "Dictation"))
    return Template(name, parser.title or name, parser.modality, tuple(sections))


def load_templates(data: Path | None = None) -> dict[str, Template]:
    """The shipped templates, then the site's (``<data>/report-templates/*.html``), by name."""
    out: dict[str, Template] = {}
    for directory in (SHIPPED, None if data is None else data / SITE_DIR):
        if directory is None or not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.html")):
            try:
                out[path.stem] = parse_template(path.stem, path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, TemplateError) as exc:
                log.warning("report template %s skipped: %s", path, exc)
    return out
