"""Radiology reports in the index (both backends): one row per report, its latest version.

The report's versions are write-once JSON objects in the blob store(s) (:mod:`bastion.blobs.reportlog`), the truth;
this table is derived from them for the reading list (``GET /api/reports``) and rebuilt from them
(:func:`bastion.ingest.report_log.apply_report_log`). A row holds the report's latest version whole (``doc``, its
JSON) and the columns a search filters on. A write never replaces a newer version with an older one.

The statements are written once with ``?`` placeholders (SQLite's); :func:`bastion.index.hidden.postgresql` turns
them into psycopg's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bastion.index.hidden import Execute

#: The columns of ``reports``, in the order of :data:`PUT` and :data:`SELECT`.
COLUMNS = ("id", "study_uid", "patient_id", "patient_name", "accession", "modality", "study_date", "state",
           "version", "updated", "doc")
PUT = (f"INSERT INTO reports ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)}) "
       "ON CONFLICT (id) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])
       + " WHERE excluded.version > reports.version")
SELECT = f"SELECT {', '.join(COLUMNS)} FROM reports"
#: The open report of a study (not signed yet): at most one may exist.
OPEN_OF_STUDY = SELECT + " WHERE study_uid = ? AND state IN ('draft', 'preliminary') ORDER BY id LIMIT 1"
#: The searchable text of ``q`` (patient name, patient id, accession), compared lowered.
_TEXT = "lower(patient_name || ' ' || patient_id || ' ' || accession)"


@dataclass(frozen=True)
class ReportRow:
    """A report's latest version as the index keeps it: the filter columns and the whole ``doc``."""

    id: str
    study_uid: str
    patient_id: str
    patient_name: str
    accession: str
    modality: str
    study_date: str
    state: str
    version: int
    updated: str
    doc: str

    @classmethod
    def of(cls, doc: dict[str, Any]) -> ReportRow:
        """The row of report version ``doc`` (a report's JSON, :mod:`bastion.reporting.report`)."""
        history = doc.get("history") or [{}]
        return cls(str(doc["id"]), str(doc.get("study", "")), str(doc.get("patient_id", "")),
                   str(doc.get("patient_name", "")), str(doc.get("accession", "")), str(doc.get("modality", "")),
                   str(doc.get("study_date", "")), str(doc.get("state", "")), int(doc.get("version", 0)),
                   str(history[-1].get("at", "")), json.dumps(doc, sort_keys=True))

    def params(self) -> tuple[Any, ...]:
        return tuple(getattr(self, c) for c in COLUMNS)

    def document(self) -> dict[str, Any]:
        data = json.loads(self.doc)
        return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class ReportQuery:
    """A reading-list search: each filter set narrows it; newest change first."""

    state: str = ""
    modality: str = ""
    study: str = ""
    patient_id: str = ""
    date_from: str = ""  # the study date, YYYYMMDD, inclusive
    date_to: str = ""
    text: str = ""  # in the patient's name or id or the accession number, any case
    studies: tuple[str, ...] = ()  # the reports of any of these studies (at most :data:`MAX_STUDIES`)
    limit: int = 100
    offset: int = 0


#: The most studies one search may name (``study_uid IN (...)``: within SQLite's and psycopg's parameter limits).
MAX_STUDIES = 1000


def search_statement(query: ReportQuery) -> tuple[str, list[Any]]:
    """The SELECT of ``query`` and its parameters."""
    where: list[str] = []
    params: list[Any] = []
    for column, value in (("state", query.state), ("modality", query.modality), ("study_uid", query.study),
                          ("patient_id", query.patient_id)):
        if value:
            where.append(f"{column} = ?")
            params.append(value)
    if query.studies:
        if len(query.studies) > MAX_STUDIES:
            raise ValueError(f"a report search names at most {MAX_STUDIES} studies")
        where.append(f"study_uid IN ({', '.join('?' for _ in query.studies)})")
        params.extend(query.studies)
    if query.date_from:
        where.append("study_date >= ?")
        params.append(query.date_from)
    if query.date_to:
        where.append("study_date <= ?")
        params.append(query.date_to)
    if query.text:
        where.append(f"{_TEXT} LIKE ?")
        escaped = query.text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        params.append(f"%{escaped}%")
        where[-1] += " ESCAPE '\\'"
    sql = SELECT + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY updated DESC, id LIMIT ? OFFSET ?"
    return sql, [*params, query.limit, query.offset]


#: A study without a report, in :func:`studies_in_state`.
UNREPORTED = "unreported"
_STUDY_ORDER = "s.study_date DESC, s.study_time DESC, s.study_uid"


def studies_in_state(ex: Execute, state: str, limit: int, offset: int = 0) -> list[str]:
    """The UIDs of the studies with a report in ``state`` (:data:`UNREPORTED`: with none), in the index's study
    order (newest first): the reading list's candidates for a state filter, read in pages, which it then asks
    ``Index.find`` about (its other filters, hidden studies) and checks against each study's latest report."""
    if state == UNREPORTED:
        where, params = "NOT EXISTS (SELECT 1 FROM reports r WHERE r.study_uid = s.study_uid)", []
    else:
        where, params = "EXISTS (SELECT 1 FROM reports r WHERE r.study_uid = s.study_uid AND r.state = ?)", [state]
    sql = f"SELECT s.study_uid FROM studies s WHERE {where} ORDER BY {_STUDY_ORDER} LIMIT ? OFFSET ?"
    return [str(uid) for (uid,) in ex(sql, [*params, limit, offset]).fetchall()]


def put(ex: Execute, row: ReportRow) -> None:
    """Keep ``row`` unless the table holds the same report at its version or a newer one."""
    ex(PUT, row.params())


def _row(found: Any) -> ReportRow:
    values: list[Any] = [str(v) if c != "version" else int(v) for c, v in zip(COLUMNS, found, strict=True)]
    return ReportRow(*values)


def one(ex: Execute, report_id: str) -> ReportRow | None:
    found = ex(SELECT + " WHERE id = ?", (report_id,)).fetchone()
    return None if found is None else _row(found)


def open_of_study(ex: Execute, study_uid: str) -> ReportRow | None:
    found = ex(OPEN_OF_STUDY, (study_uid,)).fetchone()
    return None if found is None else _row(found)


def search(ex: Execute, query: ReportQuery) -> list[ReportRow]:
    sql, params = search_statement(query)
    return [_row(found) for found in ex(sql, params).fetchall()]
