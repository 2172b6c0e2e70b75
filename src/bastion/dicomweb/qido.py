"""QIDO-RS: search for studies, series and instances (PS3.18 10.6).

Query parameters become :class:`~bastion.query.find.QueryKey` objects and go through
:func:`~bastion.query.find.conditions_for` and :class:`~bastion.query.find.Finder`, the same
matching engine C-FIND uses. Attributes are named by keyword or by tag (``PatientName`` or
``00100010``); values arrive URL-decoded; UID lists may use commas (PS3.18 8.3.4.1).

``fuzzymatching=true`` turns on the engine's person-name fuzzy matching (every word of the
value must start a name component). Results carry the default attributes of PS3.18 Tables
10.6.3-3/4/5, the ``includefield`` attributes (or ``all``), the matching keys and a
RetrieveURL. Person names are answered split into their component groups (PS3.18 F.2.2), whatever
form the index holds them in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.datadict import keyword_for_tag

from bastion.errors import InvalidQuery
from bastion.model import dicom_json
from bastion.model.attributes import COMPUTED_KEYWORDS, LEVEL_KEYWORDS, tag_hex, tag_of, vr_of
from bastion.model.levels import QueryLevel
from bastion.model.records import JsonDataset
from bastion.query.find import MAX_LIMIT, Finder, QueryKey, conditions_for

RESERVED = frozenset({"limit", "offset", "fuzzymatching", "includefield"})

DEFAULT_KEYWORDS: dict[QueryLevel, tuple[str, ...]] = {
    QueryLevel.STUDY: (
        "SpecificCharacterSet", "StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability",
        "ModalitiesInStudy", "ReferringPhysicianName", "TimezoneOffsetFromUTC", "RetrieveURL",
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "StudyDescription",
    ),
    QueryLevel.SERIES: (
        "SpecificCharacterSet", "Modality", "TimezoneOffsetFromUTC", "SeriesDescription", "RetrieveURL",
        "SeriesInstanceUID", "SeriesNumber", "NumberOfSeriesRelatedInstances",
        "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "RequestAttributesSequence",
        "StudyInstanceUID",
    ),
    QueryLevel.IMAGE: (
        "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "InstanceAvailability",
        "TimezoneOffsetFromUTC", "RetrieveURL", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
        "NumberOfFrames", "AvailableTransferSyntaxUID", "StudyInstanceUID", "SeriesInstanceUID",
    ),
}

NUMERIC_VRS = frozenset({"US", "UL", "SS", "SL", "SV", "UV", "IS", "DS", "FL", "FD"})
RETRIEVE_URL = 0x00081190
INSTANCE_AVAILABILITY = 0x00080056


@dataclass(frozen=True)
class Search:
    """A parsed QIDO-RS request."""

    level: QueryLevel
    keys: tuple[QueryKey, ...]
    return_tags: tuple[int, ...]
    include_all: bool
    limit: int
    offset: int
    fuzzy: bool


def attribute_tag(name: str) -> int:
    """The tag named by a keyword or 8 hex digits; InvalidQuery (400) if neither."""
    text = name.strip()
    if len(text) == 8:
        try:
            return int(text, 16)
        except ValueError:
            pass
    try:
        return tag_of(text)
    except KeyError:
        raise InvalidQuery(f"{name!r} is not a DICOM attribute keyword or tag") from None


def matchable_keywords(level: QueryLevel) -> frozenset[str]:
    """Keywords a search at ``level`` can match on: the level's and its parents' (PS3.18 10.6.1.2)."""
    levels = (*level.parents(), level)
    return frozenset(k for lvl in levels for k in (*LEVEL_KEYWORDS[lvl], *COMPUTED_KEYWORDS[lvl]))


def _int_param(params: list[tuple[str, str]], name: str, default: int, high: int) -> int:
    values = [v for k, v in params if k == name]
    if not values:
        return default
    text = values[-1]
    # ASCII digits only: int() would also take " 5", "+5", "1_0" and other scripts' digits
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        raise InvalidQuery(f"{name} must be an integer, not {text[:40]!r}")
    value = int(text)
    if not 0 <= value <= high:
        raise InvalidQuery(f"{name} must be between 0 and {high}")
    return value


def _check_numeric(keyword: str, vr: str, value: str) -> None:
    """InvalidQuery (400) if a numeric attribute is matched against something that is not a number."""
    if vr not in NUMERIC_VRS:
        return
    for item in value.replace(",", "\\").split("\\"):
        item = item.strip()
        if not item:
            continue
        try:
            float(item)
        except ValueError:
            raise InvalidQuery(f"{keyword}: {item!r} is not a number") from None


def parse_search(level: QueryLevel, params: Iterable[tuple[str, str]], path_uids: dict[str, str]) -> Search:
    """Parse QIDO-RS query parameters (PS3.18 8.3.4) for a search at ``level``.

    ``path_uids`` holds the UIDs fixed by the URL (``StudyInstanceUID``, ``SeriesInstanceUID``).

    Raises
    ------
    InvalidQuery
        An unknown parameter or attribute, a malformed value, or a limit above the cap.
    """
    items = list(params)
    limit = _int_param(items, "limit", MAX_LIMIT, MAX_LIMIT)
    offset = _int_param(items, "offset", 0, 2**31 - 1)
    fuzzy_values = [v.lower() for k, v in items if k == "fuzzymatching"]
    if any(v not in ("true", "false") for v in fuzzy_values):
        raise InvalidQuery("fuzzymatching must be true or false")
    fuzzy = bool(fuzzy_values) and fuzzy_values[-1] == "true"
    include_all, include = False, []
    for k, v in items:
        if k != "includefield":
            continue
        for name in v.split(","):
            if name.strip().lower() == "all":
                include_all = True
            elif name.strip():
                include.append(attribute_tag(name))
    allowed = matchable_keywords(level)
    values: dict[int, list[str]] = {}
    for k, v in items:
        if k in RESERVED:
            continue
        if "." in k:
            raise InvalidQuery(f"{k!r}: sequence matching is not supported")
        tag = attribute_tag(k)
        values.setdefault(tag, []).append(v)
    keys = []
    for tag, vals in values.items():
        keyword = keyword_for_tag(tag)
        if keyword not in allowed:
            raise InvalidQuery(f"{keyword or tag_hex(tag)} is not a matching key for a "
                               f"{level.value.lower()} search")
        value = "\\".join(vals)
        _check_numeric(keyword, vr_of(tag), value)
        keys.append(QueryKey(tag, keyword, vr_of(tag), value))
    for keyword, uid in path_uids.items():
        tag = tag_of(keyword)
        if tag in values:
            raise InvalidQuery(f"{keyword} is already given in the path")
        keys.append(QueryKey(tag, keyword, "UI", uid))
    defaults = [tag_of(k) for k in DEFAULT_KEYWORDS[level]]
    for parent in (QueryLevel.STUDY, QueryLevel.SERIES):
        if parent.depth < level.depth and parent.unique_key not in path_uids:
            defaults += [tag_of(k) for k in DEFAULT_KEYWORDS[parent]]
    tags = dict.fromkeys([*defaults, *include, *(k.tag for k in keys)])
    return Search(level, tuple(keys), tuple(tags), include_all, limit, offset, fuzzy)


def retrieve_url(level: QueryLevel, result: JsonDataset, base: str) -> str | None:
    """The WADO-RS URL of a result (PS3.18 10.6.3.3)."""
    def uid(tag: str) -> str | None:
        values = result.get(tag, {}).get("Value") or [None]
        return str(values[0]) if values[0] else None

    study, series, sop = uid("0020000D"), uid("0020000E"), uid("00080018")
    if not study:
        return None
    url = f"{base}/studies/{study}"
    if level is QueryLevel.STUDY:
        return url
    if not series:
        return None
    url += f"/series/{series}"
    if level is QueryLevel.SERIES:
        return url
    return f"{url}/instances/{sop}" if sop else None


def search(finder: Finder, query: Search, base: str) -> list[JsonDataset]:
    """Run a parsed search and shape its results (PS3.18 10.6.3)."""
    conditions = conditions_for(query.keys, fuzzy=query.fuzzy, comma_lists=True)
    found = finder.find(query.level, conditions, limit=query.limit, offset=query.offset)
    keys = sorted({tag_hex(t) for t in query.return_tags})  # once per search, not per result
    split = dicom_json.split_person_names  # the index keeps PN values whole (PS3.18 F.2.2 splits them)
    out = []
    for result in found:
        url = retrieve_url(query.level, result, base)
        if url:
            result[tag_hex(RETRIEVE_URL)] = {"vr": "UR", "Value": [url]}
        result[tag_hex(INSTANCE_AVAILABILITY)] = {"vr": "CS", "Value": ["ONLINE"]}
        if query.include_all:
            out.append({k: split(e) for k, e in sorted(result.items())})
        else:
            out.append({k: split(result[k]) for k in keys if k in result})
    return out


def search_json(finder: Finder, query: Search, base: str) -> tuple[bytes, int]:
    """:func:`search`, encoded as a DICOM JSON array (PS3.18 F.2), and the number of results."""
    results = search(finder, query, base)
    return dicom_json.dumps(results), len(results)
