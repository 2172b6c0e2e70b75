"""Attribute matching for C-FIND and QIDO-RS: one engine, PS3.4 C.2.2.2.

A query key's value is parsed into one of the PS3.4 matching types:

* **Universal** (C.2.2.2.3): empty value, or ``*`` alone: matches everything.
* **Single value** (C.2.2.2.1): exact match (person names case-insensitively, see below).
* **Wildcard** (C.2.2.2.4): ``*`` and ``?`` in AE, CS, LO, LT, PN, SH, ST, UC, UT values.
* **Range** (C.2.2.2.5): ``a-b``, ``a-`` or ``-b`` for DA, TM and DT values.
* **UID list** (C.2.2.2.2): backslash-separated UIDs (QIDO also accepts commas, PS3.18 8.3.4.1).
* **Value list** (C.2.2.2.8 multiple values): backslash-separated values of other VRs; matches any.

Sequence matching (C.2.2.2.6) is not offered: a sequence key is a return key only.
Person names match case-insensitively (the DICOM default is case-sensitive; every modern PACS
and OHIF's study list expect otherwise). Fuzzy matching of person names (``fuzzymatching=true``)
additionally matches any name component that starts with the given value.

This module is pure: the index compiles :class:`Condition` objects to SQL, and
:func:`matches` applies them to stored DICOM JSON values for attributes that are not columns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from bastion.errors import InvalidQuery
from bastion.model.uids import is_identifiable_uid

WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
RANGE_VRS = frozenset({"DA", "TM", "DT"})


class MatchType(str, Enum):
    """The PS3.4 C.2.2.2 matching types."""

    UNIVERSAL = "universal"
    SINGLE = "single"
    WILDCARD = "wildcard"
    RANGE = "range"
    LIST = "list"


@dataclass(frozen=True)
class Condition:
    """One parsed matching key.

    Attributes
    ----------
    keyword, tag, vr
        The attribute matched.
    kind
        The matching type.
    values
        SINGLE / WILDCARD: one pattern; LIST: the alternatives; RANGE: ``(low, high)`` where an
        empty string means open-ended.
    fuzzy
        Person-name fuzzy matching requested (QIDO ``fuzzymatching=true``).
    """

    keyword: str
    tag: int
    vr: str
    kind: MatchType
    values: tuple[str, ...] = ()
    fuzzy: bool = False

    @property
    def case_insensitive(self) -> bool:
        """Person names match regardless of case."""
        return self.vr == "PN"


_DATE_RE = re.compile(r"^\d{8}$")
_TIME_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


def _check_range_bound(vr: str, value: str, keyword: str) -> str:
    v = value.strip()
    if not v:
        return ""
    if vr == "DA":
        v = v.replace("-", "") if len(v) == 10 and v[4] == "-" else v  # tolerate ISO dates
        if not _DATE_RE.match(v):
            raise InvalidQuery(f"{keyword}: {value!r} is not a DICOM date (YYYYMMDD)")
    elif vr == "TM":
        v = v.replace(":", "")
        if not _TIME_RE.match(v):
            raise InvalidQuery(f"{keyword}: {value!r} is not a DICOM time (HHMMSS.FFFFFF)")
    return v


def parse_condition(keyword: str, tag: int, vr: str, raw: str, *, fuzzy: bool = False,
                    comma_lists: bool = False) -> Condition:
    """Parse the value of one query key into a :class:`Condition` (PS3.4 C.2.2.2).

    Parameters
    ----------
    keyword, tag, vr
        The attribute.
    raw
        The value as text: multiple values separated by backslash.
    fuzzy
        Person-name fuzzy matching.
    comma_lists
        Also split on commas (QIDO-RS, PS3.18 8.3.4.1) for UID and code-string values.

    Raises
    ------
    InvalidQuery
        A malformed range, date or UID.
    """
    value = raw.strip(" \x00")
    if value in ("", "*") or (vr == "UI" and value == ""):
        return Condition(keyword, tag, vr, MatchType.UNIVERSAL)
    if vr == "SQ":
        raise InvalidQuery(f"{keyword}: sequence matching is not supported; send it as a return key")
    if vr in RANGE_VRS and "-" in value and not (vr == "DA" and len(value) == 10 and value[4] == "-"
                                                 and value.count("-") == 2):
        low, _, high = value.partition("-")
        bounds = (_check_range_bound(vr, low, keyword), _check_range_bound(vr, high, keyword))
        if bounds == ("", ""):
            return Condition(keyword, tag, vr, MatchType.UNIVERSAL)
        return Condition(keyword, tag, vr, MatchType.RANGE, bounds)
    seps = "\\,"
    if comma_lists and vr in ("UI", "CS", "DA", "AE", "SH") or vr == "UI":
        parts = [p.strip() for p in re.split(f"[{re.escape(seps)}]" if comma_lists else r"\\", value)]
    else:
        parts = [p.strip() for p in value.split("\\")]
    parts = [p for p in parts if p]
    if vr == "UI":
        bad = [p for p in parts if not is_identifiable_uid(p)]  # a stored object's UID may break PS3.5 9.1
        if bad:
            raise InvalidQuery(f"{keyword}: {bad[0]!r} is not a valid UID")
    if vr in ("DA",):
        parts = [_check_range_bound(vr, p, keyword) for p in parts]
    if len(parts) > 1:
        if vr in WILDCARD_VRS and any(("*" in p or "?" in p) for p in parts):
            raise InvalidQuery(f"{keyword}: wildcards are not allowed in a list of values")
        return Condition(keyword, tag, vr, MatchType.LIST, tuple(parts), fuzzy)
    single = parts[0] if parts else value
    if vr in WILDCARD_VRS and ("*" in single or "?" in single):
        return Condition(keyword, tag, vr, MatchType.WILDCARD, (single,), fuzzy)
    return Condition(keyword, tag, vr, MatchType.SINGLE, (single,), fuzzy)


def wildcard_regex(pattern: str, case_insensitive: bool) -> re.Pattern[str]:
    """A compiled regex for a DICOM wildcard pattern (``*`` any run, ``?`` one character)."""
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(f"^{body}$", re.IGNORECASE | re.DOTALL if case_insensitive else re.DOTALL)


def _texts(element: dict[str, Any] | None) -> list[str]:
    """The values of a DICOM JSON element as strings (person names as their alphabetic form)."""
    if not element:
        return []
    out: list[str] = []
    for v in element.get("Value", []):
        if isinstance(v, dict):
            out.append(str(v.get("Alphabetic", "")))
        else:
            out.append(str(v))
    return out


def _fuzzy_pn(pattern: str, name: str) -> bool:
    """Fuzzy person-name match: every word of the pattern starts some name component."""
    comps = [c for c in re.split(r"[\^= ]+", name.lower()) if c]
    words = [w for w in re.split(r"[\^ ]+", pattern.lower().replace("*", "")) if w]
    return all(any(c.startswith(w) for c in comps) for w in words)


def match_value(cond: Condition, value: str) -> bool:
    """True if one stored value satisfies ``cond``."""
    if cond.kind is MatchType.UNIVERSAL:
        return True
    if cond.kind is MatchType.RANGE:
        low, high = cond.values
        v = value.strip()
        if not v:
            return False
        if cond.vr == "TM":
            v = v.replace(":", "")
        return (not low or v >= low) and (not high or v[: len(high)] <= high)
    if cond.fuzzy and cond.vr == "PN":
        return any(_fuzzy_pn(p, value) for p in cond.values)
    if cond.kind is MatchType.WILDCARD:
        return bool(wildcard_regex(cond.values[0], cond.case_insensitive).match(value))
    if cond.case_insensitive:
        return value.lower() in {p.lower() for p in cond.values}
    return value in cond.values


def matches(cond: Condition, element: dict[str, Any] | None) -> bool:
    """True if a stored DICOM JSON element satisfies ``cond`` (any of its values, C.2.2.2.8)."""
    if cond.kind is MatchType.UNIVERSAL:
        return True
    values = _texts(element)
    if not values:
        # PS3.4 C.2.2.2.1: an empty attribute matches only universal matching.
        return False
    return any(match_value(cond, v) for v in values)
