"""Compile matching conditions (:mod:`bastion.model.matching`) to SQL for the index.

Conditions on an index column become SQL (so the database's indexes do the work);
the rest are applied in Python by :func:`bastion.model.matching.matches` on the stored
DICOM JSON. Both follow the same PS3.4 C.2.2.2 rules.

The SQL is written for one :class:`Dialect`: :data:`SQLITE` (the default) or :data:`POSTGRESQL`. Both match the
same rows: in PostgreSQL the index's text columns are ``COLLATE "C"`` (byte order, as SQLite's ``BINARY``), a
case-sensitive wildcard is a ``LIKE`` (SQLite's ``GLOB``) and a column that SQLite declares ``COLLATE NOCASE`` is
compared as ``lower(column)`` against values lowered here, both folding ASCII letters only, as ``NOCASE`` does
(``lower()`` of a ``"C"`` column folds nothing else).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bastion.errors import InvalidQuery
from bastion.index.schema import SUMMARY_SEP
from bastion.model.attributes import COLUMNS
from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition, MatchType


@dataclass(frozen=True)
class Dialect:
    """How one database spells the SQL of a condition."""

    mark: str  # a parameter's placeholder
    true: str  # a term that always holds
    glob: bool  # a case-sensitive wildcard is SQLite's GLOB (else a LIKE on a column of byte collation)
    folded: frozenset[str]  # columns compared as lower(column), against ASCII-lowered values
    false: str  # a term that never holds
    position: str  # a function: where its second argument starts in its first (0: nowhere)
    #: Study rows carry their patient's name, folded (``s.patient_name_key``, PostgreSQL's migration 0004), so
    #: a study search by PatientName needs only the studies' own indexes.
    study_patient_name: bool = False


SQLITE = Dialect("?", "1", True, frozenset(), "0", "instr")
POSTGRESQL = Dialect("%s", "TRUE", False, frozenset({"patient_name", "referring_physician"}), "FALSE", "strpos",
                     study_patient_name=True)

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


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def compile_column(cond: Condition, expr: str, column: str, dialect: Dialect = SQLITE) -> tuple[str, list[Any]]:
    """SQL for one condition on the column expression ``expr``."""
    folded = column in dialect.folded or (cond.kind is MatchType.WILDCARD and cond.case_insensitive
                                          and not dialect.glob)
    if not folded:
        return _compile_column(cond, expr, column, dialect)
    sql, params = _compile_column(cond, f"lower({expr})", column, dialect)
    return sql, [fold(p) if isinstance(p, str) else p for p in params]


def fold(text: str) -> str:
    """``text`` with its ASCII letters lowered, as ``lower()`` of a ``"C"`` column and SQLite's NOCASE fold."""
    return text.translate(_ASCII_LOWER)


def _compile_column(cond: Condition, expr: str, column: str, dialect: Dialect) -> tuple[str, list[Any]]:
    kind, mark = cond.kind, dialect.mark
    if kind is MatchType.SINGLE:
        return f"{expr} = {mark}", [_param(column, cond.values[0], cond.keyword)]
    if kind is MatchType.LIST:
        marks = ",".join([mark] * len(cond.values))
        return f"{expr} IN ({marks})", [_param(column, v, cond.keyword) for v in cond.values]
    if kind is MatchType.WILDCARD:
        if cond.case_insensitive or not dialect.glob:
            return f"{expr} LIKE {mark} ESCAPE '\\'", [_like_pattern(cond.values[0])]
        return f"{expr} GLOB {mark}", [_glob_escape(cond.values[0])]
    if kind is MatchType.RANGE:
        low, high = cond.values
        terms, params = [f"{expr} <> ''"], []
        if low:
            terms.append(f"{expr} >= {mark}")
            params.append(low)
        if high:
            terms.append(f"{expr} <= {mark}")
            params.append(high + "~")
        return " AND ".join(terms), params
    return dialect.true, []


def compile_conditions(level: QueryLevel, conditions: Sequence[Condition], dialect: Dialect = SQLITE) -> Compiled:
    """Split ``conditions`` for a query at ``level`` into SQL terms (in ``dialect``) and Python residuals."""
    out = Compiled()
    for cond in conditions:
        if cond.kind is MatchType.UNIVERSAL:
            continue
        if any("\x00" in value for value in cond.values):  # no stored value holds NUL (SQLite would cut the
            out.where.append(dialect.false)                 # pattern there; PostgreSQL text cannot hold one)
            continue
        if cond.keyword == "ModalitiesInStudy" and level is QueryLevel.STUDY and cond.kind in (MatchType.SINGLE,
                                                                                               MatchType.LIST):
            # the study's summary of its series' modalities (``studies.modalities``): no probe of its series
            found = f"{dialect.position}('{SUMMARY_SEP}' || s.modalities || '{SUMMARY_SEP}', {dialect.mark}) > 0"
            out.where.append("(" + " OR ".join([found] * len(cond.values)) + ")")
            out.params.extend(f"{SUMMARY_SEP}{value}{SUMMARY_SEP}" for value in cond.values)
            continue
        if cond.keyword == "ModalitiesInStudy" and level in (QueryLevel.STUDY,):
            sql, params = compile_column(cond, "x.modality", "modality", dialect)
            out.where.append(f"EXISTS (SELECT 1 FROM series x WHERE x.study_uid = s.study_uid AND {sql})")
            out.params.extend(params)
            continue
        if cond.keyword == "SOPClassesInStudy" and level in (QueryLevel.STUDY,):
            sql, params = compile_column(cond, "x.sop_class_uid", "sop_class_uid", dialect)
            out.where.append(f"EXISTS (SELECT 1 FROM instances x WHERE x.study_uid = s.study_uid AND {sql})")
            out.params.extend(params)
            continue
        if (cond.keyword == "PatientName" and level is QueryLevel.STUDY and dialect.study_patient_name
                and not cond.fuzzy):
            sql, params = _compile_column(cond, "s.patient_name_key", "patient_name", dialect)
            out.where.append(sql)
            out.params.extend(fold(p) if isinstance(p, str) else p for p in params)
            continue
        placed = False
        for lvl in (*level.parents(), level):
            column = COLUMNS[lvl].get(cond.keyword)
            if column and not (cond.fuzzy and cond.vr == "PN"):
                sql, params = compile_column(cond, f"{ALIASES[lvl]}.{column}", column, dialect)
                out.where.append(sql)
                out.params.extend(params)
                placed = True
                break
        if not placed:
            out.residual.append(cond)
    return out
