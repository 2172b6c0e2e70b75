"""PS3.4 C.2.2.2 matching (bastion.model.matching): parsing every matching type and applying it."""

from __future__ import annotations

import pytest

from bastion.errors import InvalidQuery
from bastion.model.matching import (
    Condition,
    MatchType,
    match_value,
    matches,
    parse_condition,
    wildcard_regex,
)

pytestmark = pytest.mark.timeout(10)

NAME = ("PatientName", 0x00100010, "PN")
PID = ("PatientID", 0x00100020, "LO")
DATE = ("StudyDate", 0x00080020, "DA")
TIME = ("StudyTime", 0x00080030, "TM")
DT = ("AcquisitionDateTime", 0x0008002A, "DT")
UID = ("StudyInstanceUID", 0x0020000D, "UI")
MOD = ("Modality", 0x00080060, "CS")
NUM = ("SeriesNumber", 0x00200011, "IS")
SEQ = ("RequestAttributesSequence", 0x00400275, "SQ")


def cond(attr: tuple[str, int, str], raw: str, **kw: bool) -> Condition:
    return parse_condition(*attr, raw, **kw)


def el(vr: str, *values: object) -> dict[str, object]:
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": v} for v in values]}
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


# -- universal (C.2.2.2.3) -----------------------------------------------------------------------------
@pytest.mark.parametrize("raw", ["", "*", "  ", "\x00"])
def test_universal(raw: str) -> None:
    c = cond(PID, raw)
    assert c.kind is MatchType.UNIVERSAL
    assert matches(c, el("LO", "X")) and matches(c, None) and matches(c, el("LO"))


def test_open_range_on_both_sides_is_universal() -> None:
    assert cond(DATE, "-").kind is MatchType.UNIVERSAL


# -- single value (C.2.2.2.1) --------------------------------------------------------------------------
def test_single_value() -> None:
    c = cond(PID, "ABC123")
    assert (c.kind, c.values) == (MatchType.SINGLE, ("ABC123",))
    assert matches(c, el("LO", "ABC123"))
    assert not matches(c, el("LO", "abc123"))  # case-sensitive for non-PN
    assert not matches(c, el("LO", "ABC1234"))


def test_single_value_person_name_is_case_insensitive() -> None:
    c = cond(NAME, "doe^john")
    assert c.case_insensitive
    assert matches(c, el("PN", "Doe^John")) and not matches(c, el("PN", "Doe^Jane"))


def test_empty_attribute_matches_only_universal() -> None:
    assert not matches(cond(PID, "X"), el("LO"))
    assert not matches(cond(PID, "X"), None)
    assert not matches(cond(PID, "X*"), el("LO"))
    assert not matches(cond(DATE, "20200101-"), el("DA"))


def test_multi_valued_attribute_matches_any_value() -> None:
    assert matches(cond(MOD, "PT"), el("CS", "CT", "PT"))
    assert not matches(cond(MOD, "MR"), el("CS", "CT", "PT"))


def test_iso_date_single_value_is_normalised() -> None:
    c = cond(DATE, "2020-01-31")
    assert (c.kind, c.values) == (MatchType.SINGLE, ("20200131",))


def test_wildcard_characters_in_non_text_vr_are_literal() -> None:
    assert cond(NUM, "1*").kind is MatchType.SINGLE


# -- wildcard (C.2.2.2.4) -------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern, value, expected", [
    ("Do*", "Doe^John", True),
    ("D?e^*", "Doe^John", True),
    ("D?e^*", "Dole^Jane", False),
    ("*^Jane", "Dole^Jane", True),
    ("*", "anything", True),
    ("d*", "Doe", True),  # PN: case-insensitive
    ("a.b*", "axb", False),  # regex metacharacters are literal
    ("a.b*", "a.bc", True),
])
def test_wildcard_person_name(pattern: str, value: str, expected: bool) -> None:
    c = cond(NAME, pattern)
    if pattern == "*":
        assert c.kind is MatchType.UNIVERSAL
    else:
        assert c.kind is MatchType.WILDCARD
    assert matches(c, el("PN", value)) is expected


def test_wildcard_is_case_sensitive_for_other_vrs() -> None:
    c = cond(PID, "ab*")
    assert c.kind is MatchType.WILDCARD
    assert matches(c, el("LO", "abc")) and not matches(c, el("LO", "ABC"))


def test_wildcard_regex_spans_newlines_and_anchors() -> None:
    assert wildcard_regex("a*z", False).match("a\nz")
    assert not wildcard_regex("a?", False).match("abc")


# -- range (C.2.2.2.5) ---------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, low, high", [
    ("20200101-20201231", "20200101", "20201231"),
    ("20200101-", "20200101", ""),
    ("-20200101", "", "20200101"),
])
def test_date_range_parsing(raw: str, low: str, high: str) -> None:
    c = cond(DATE, raw)
    assert (c.kind, c.values) == (MatchType.RANGE, (low, high))


@pytest.mark.parametrize("raw, value, expected", [
    ("20200101-20201231", "20200101", True),
    ("20200101-20201231", "20201231", True),
    ("20200101-20201231", "20191231", False),
    ("20200101-20201231", "20210101", False),
    ("20200101-", "20991231", True),
    ("20200101-", "20191231", False),
    ("-20200101", "19000101", True),
    ("-20200101", "20200102", False),
])
def test_date_range_matching(raw: str, value: str, expected: bool) -> None:
    assert matches(cond(DATE, raw), el("DA", value)) is expected


def test_time_range_compares_prefixes_and_ignores_colons() -> None:
    c = cond(TIME, "10:00-12")
    assert c.values == ("1000", "12")
    assert match_value(c, "125959.999")  # within the hour 12
    assert match_value(c, "10:30:00")
    assert not match_value(c, "095959")
    assert not match_value(c, "130000")


def test_datetime_range() -> None:
    c = cond(DT, "20200101120000-20200101130000")
    assert c.kind is MatchType.RANGE
    assert match_value(c, "20200101123000")
    assert not match_value(c, "20200101140000")


@pytest.mark.parametrize("raw", ["2020010-", "20200101-2021", "abc-20200101", "2020-13"])
def test_malformed_date_range_is_an_error(raw: str) -> None:
    with pytest.raises(InvalidQuery) as info:
        cond(DATE, raw)
    assert info.value.dimse_status == 0xA900 and info.value.http_status == 400


def test_malformed_time_range_is_an_error() -> None:
    with pytest.raises(InvalidQuery):
        cond(TIME, "10h-12h")


# -- UID list and value lists (C.2.2.2.2, C.2.2.2.8) ------------------------------------------------------
def test_uid_list() -> None:
    c = cond(UID, "1.2.3\\1.2.4")
    assert (c.kind, c.values) == (MatchType.LIST, ("1.2.3", "1.2.4"))
    assert matches(c, el("UI", "1.2.4")) and not matches(c, el("UI", "1.2.5"))


def test_single_uid() -> None:
    c = cond(UID, "1.2.3")
    assert (c.kind, c.values) == (MatchType.SINGLE, ("1.2.3",))


def test_uid_list_with_commas_only_for_qido() -> None:
    c = cond(UID, "1.2.3,1.2.4", comma_lists=True)
    assert c.values == ("1.2.3", "1.2.4")
    with pytest.raises(InvalidQuery):
        cond(UID, "1.2.3,1.2.4")  # in DIMSE a comma makes it an invalid UID


@pytest.mark.parametrize("raw", ["1.2.abc", "1..3", "1.2.", "1" * 129, "1.2.3\\x"])
def test_invalid_uid_is_an_error(raw: str) -> None:
    with pytest.raises(InvalidQuery):
        cond(UID, raw)


@pytest.mark.parametrize("raw", ["1.02.3", "1." + "2" * 68])
def test_a_uid_breaking_ps3_5_that_ingest_accepts_can_be_matched(raw: str) -> None:
    """Ingest stores objects whose UIDs have a leading zero or exceed 64 characters (with a warning): a query
    must be able to name them."""
    assert cond(UID, raw).values == (raw,)


def test_value_list_of_codes() -> None:
    c = cond(MOD, "CT\\MR")
    assert c.kind is MatchType.LIST
    assert matches(c, el("CS", "MR")) and not matches(c, el("CS", "PT"))


def test_date_list() -> None:
    c = cond(DATE, "20200101\\20200202")
    assert (c.kind, c.values) == (MatchType.LIST, ("20200101", "20200202"))
    assert matches(c, el("DA", "20200202")) and not matches(c, el("DA", "20200103"))


def test_wildcards_in_a_value_list_are_an_error() -> None:
    with pytest.raises(InvalidQuery):
        cond(NAME, "Doe*\\Smith")


def test_person_name_list_is_case_insensitive() -> None:
    c = cond(NAME, "DOE^JOHN\\smith^anna")
    assert matches(c, el("PN", "Smith^Anna"))


# -- sequences and fuzzy names ----------------------------------------------------------------------------
def test_sequence_matching_is_refused() -> None:
    with pytest.raises(InvalidQuery):
        cond(SEQ, "x")
    assert cond(SEQ, "").kind is MatchType.UNIVERSAL


def test_fuzzy_person_name() -> None:
    c = cond(NAME, "jo do", fuzzy=True)
    assert c.fuzzy
    assert matches(c, el("PN", "Doe^John"))
    assert not matches(c, el("PN", "Smith^John"))
    assert not matches(cond(NAME, "jo do"), el("PN", "Doe^John"))  # without fuzzy: no match
