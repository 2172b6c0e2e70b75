"""Compile matching conditions (:mod:`bastion.model.matching`) to SQL for the index.

Conditions on an index column become SQL (so the database's indexes do the work);
the rest are applied in Python by :func:`bastion.model.matching.matches` on the stored
DICOM JSON. Both follow the same PS3.4 C.2.2.2 rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bastion.errors import InvalidQuery
from bastion.model.attributes import COLUMNS
from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition, MatchType

ALIASES = {QueryLevel.PATIENT: "p", QueryLevel.STUDY: "s", QueryLevel.SERIES: "se", QueryLevel.IMAGE: "i"}
INTEGER_COLUMNS = frozenset({"series_number", "instance_number"})


@dataclass
class Compiled:
    """SQL ``WHERE`` terms with their parameters, and the conditions left for Python."""

    where: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)
    residual: list[Condition] = field(default_factory=list)


def _glob_escape(text: str) -> str:
    return "".join("[" + c + "]" if c in "[]" else c for c in text)


def _like_pattern(pattern: str) -> str:
    out = []
    for c in pattern:
        if c in "%_\\":
            out.append("\\" + c)
        elif c == "*":
            out.append("%")
        elif c == "?":
            out.append("_")
        else:
            out.append(c)
    return "".join(out)


#: What an index integer column holds (SQLite's 64-bit integers); an IS value proper stays within 32 bits.
INTEGER_RANGE = range(-(2**63), 2**63)


def _param(column: str, value: str, keyword: str) -> Any:
    if column in INTEGER_COLUMNS:
        try:
            number = int(value)
        except ValueError as exc:
            raise InvalidQuery(f"{keyword}: {value!r} is not an integer") from exc
        if number not in INTEGER_RANGE:
            raise InvalidQuery(f"{keyword}: {value!r} is out of range for an Integer String")
        return number
    return value


def compile_column(cond: Condition, expr: str, column: str) -> tuple[str, list[Any]]:
    """SQL for one condition on the column expression ``expr``."""
    kind = cond.kind
    if kind is MatchType.SINGLE:
        return f"{expr} = ?", [_param(column, cond.values[0], cond.keyword)]
    if kind is MatchType.LIST:
        marks = ",".join("?" * len(cond.values))
        return f"{expr} IN ({marks})", [_param(column, v, cond.keyword) for v in cond.values]
    if kind is MatchType.WILDCARD:
        if cond.case_insensitive:
            return f"{expr} LIKE ? ESCAPE '\\'", [_like_pattern(cond.values[0])]
        return f"{expr} GLOB ?", [_glob_escape(cond.values[0])]
    if kind is MatchType.RANGE:
        low, high = cond.values
        terms, params = [f"{expr} <> ''"], []
        if low:
            terms.append(f"{expr} >= ?")
            params.append(low)
        if high:
            terms.append(f"{expr} <= ?")
            params.append(high + "~")
        return " AND ".join(terms), params
    return "1", []


def compile_conditions(level: QueryLevel, conditions: Sequence[Condition]) -> Compiled:
    """Split ``conditions`` for a query at ``level`` into SQL terms and Python residuals."""
    out = Compiled()
    for cond in conditions:
        if cond.kind is MatchType.UNIVERSAL:
            continue
        if cond.keyword == "ModalitiesInStudy" and level in (QueryLevel.STUDY,):
            sql, params = compile_column(cond, "x.modality", "modality")
            out.where.append(f"EXISTS (SELECT 1 FROM series x WHERE x.study_uid = s.study_uid AND {sql})")
            out.params.extend(params)
            continue
        if cond.keyword == "SOPClassesInStudy" and level in (QueryLevel.STUDY,):
            sql, params = compile_column(cond, "x.sop_class_uid", "sop_class_uid")
            out.where.append(f"EXISTS (SELECT 1 FROM instances x WHERE x.study_uid = s.study_uid AND {sql})")
            out.params.extend(params)
            continue
        placed = False
        for lvl in (*level.parents(), level):
            column = COLUMNS[lvl].get(cond.keyword)
            if column and not (cond.fuzzy and cond.vr == "PN"):
                sql, params = compile_column(cond, f"{ALIASES[lvl]}.{column}", column)
                out.where.append(sql)
                out.params.extend(params)
                placed = True
                break
        if not placed:
            out.residual.append(cond)
    return out
