"""The C twins of the header scan (``bastion/ingest/_cscan.c``) give exactly what the Python versions give.

Three twins: ``scan_header``, ``raw_json`` and the per-level DICOM JSON of a scan (``header._levels``).

Same results, and the same inputs found "not simple", on pydicom's sample files, generated objects, and
headers that hypothesis truncates, corrupts and splices; raw_json on every VR with fuzzed values. The
extension reads bytes from the network, so the fuzzing is also its memory-safety test. To make a stray read
loud, build the extension with ``-fsanitize=address,undefined`` into a second checkout and run these tests with
``PYTHONPATH`` at that checkout's ``src`` and ``LD_PRELOAD`` naming ``libasan.so`` and ``libubsan.so``
(``ASAN_OPTIONS=detect_leaks=0``); they passed that way when the extension was written.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from types import MappingProxyType

import pydicom.data
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.ingest import header as H
from bastion.ingest import scan as S

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import corpus  # noqa: E402

pytestmark = pytest.mark.skipif(S.SPEEDUPS is None and bool(os.environ.get("BASTION_PURE_PYTHON")),
                                reason="BASTION_PURE_PYTHON set: the C twins are not loaded")

VRS = ["AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV",
       "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV",
       "OB or OW", "US or SS", ""]


def _contents(value: object) -> object:
    """``value`` with the read-only level mappings ``_cscan.levels`` hands out shown as the dicts they show: the
    twins agree on contents (the C one's are views, so that no caller can change the ones it shares)."""
    if isinstance(value, dict):
        return {key: _contents(item) for key, item in value.items()}
    if isinstance(value, MappingProxyType):
        return dict(value)
    return value


def _outcome(fn, *args):  # type: ignore[no-untyped-def]
    try:
        return ("ok", repr(_contents(fn(*args))))  # repr: NaN compares equal to itself this way
    except S.NotSimple:
        return ("not simple",)
    except ValueError:
        return ("ValueError",)


def _scans_agree(data: bytes) -> None:
    """Both scans agree; where they succeed, both ways of turning the scan into DICOM JSON agree too."""
    outcome = _outcome(S._scan_header_c, data, H._WANTED)
    assert outcome == _outcome(S.scan_header_py, data, H._WANTED)
    if outcome[0] == "ok":
        found = S.scan_header_py(data, H._WANTED)
        assert _outcome(H._levels_c, found) == _outcome(H._levels_py, found)


def _headers() -> list[bytes]:
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(pydicom.data.get_testdata_files("*.dcm")):
            out.append(Path(path).read_bytes()[: 64 * 1024])
    for kind in ("small", "ct"):
        ds = corpus.make_instance(corpus.KINDS[kind], 3, 10)
        from io import BytesIO
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue()[: 64 * 1024])
    return out


HEADERS = _headers()


def test_the_extension_is_built() -> None:
    """CI builds it (``make install``): a missing compiler must fail loudly, not make Bastion quietly slower."""
    assert S.SPEEDUPS is not None
    assert S.scan_header is S._scan_header_c
    assert H.raw_json is S.SPEEDUPS.raw_json
    assert H._levels is H._levels_c


@pytest.mark.parametrize("index", range(len(HEADERS)))
def test_scan_twins_agree_on_real_headers(index: int) -> None:
    data = HEADERS[index]
    _scans_agree(data)
    for cut in (len(data) - 1, len(data) // 2, 300, 140, 132, 0):
        _scans_agree(data[:cut])


def test_the_generated_objects_take_the_fast_path() -> None:
    found = S._scan_header_c(HEADERS[-1], H._WANTED)
    assert found.pixel_data_offset is not None and found.transfer_syntax == "1.2.840.10008.1.2.1"
    assert found == S.scan_header_py(HEADERS[-1], H._WANTED)
    assert H._from_scan(found).sop_uid


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(0, len(HEADERS) - 1), edits=st.lists(
    st.tuples(st.integers(0, 4000), st.binary(min_size=1, max_size=12), st.sampled_from(["set", "insert", "cut"])),
    min_size=1, max_size=6))
def test_scan_twins_agree_on_corrupted_headers(index: int, edits: list[tuple[int, bytes, str]]) -> None:
    data = bytearray(HEADERS[index])
    for pos, blob, how in edits:
        pos = min(pos, len(data))
        if how == "set":
            data[pos: pos + len(blob)] = blob
        elif how == "insert":
            data[pos:pos] = blob
        else:
            del data[pos: pos + len(blob)]
    _scans_agree(bytes(data))


_ELEMENT_VRS = [b"OB", b"SQ", b"UN", b"UT", b"CS", b"UI", b"PN", b"US", b"xx", b"ob"]
_element = st.tuples(
    st.sampled_from([0x00080018, 0x00080016, 0x0020000D, 0x0020000E, 0x00100020, 0x00100010, 0x00080060,
                     0x00200013, 0x00280010, 0x7FE00010, 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD, 0x00091010]),
    st.sampled_from(_ELEMENT_VRS),
    st.one_of(st.just(0xFFFFFFFF), st.integers(0, 40)),
    st.binary(max_size=40))


def _encode(elements: list[tuple[int, bytes, int, bytes]], explicit: bool) -> bytes:
    out = bytearray()
    for tag, vr, length, value in elements:
        out += (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little")
        if explicit and tag >> 16 != 0xFFFE:
            if vr in (b"OB", b"SQ", b"UN", b"UT"):
                out += vr + b"\0\0" + length.to_bytes(4, "little")
            else:
                out += vr + (length & 0xFFFF).to_bytes(2, "little")
        else:
            out += length.to_bytes(4, "little")
        out += value
    return bytes(out)


def _meta(ts: str) -> bytes:
    value = ts.encode() + (b"\0" if len(ts) % 2 else b"")
    element = b"\x02\x00\x10\x00UI" + len(value).to_bytes(2, "little") + value
    return b"\0" * 128 + b"DICM" + element


@settings(max_examples=400, deadline=None)
@given(elements=st.lists(_element, max_size=12), explicit=st.booleans())
def test_scan_twins_agree_on_synthetic_datasets(elements: list[tuple[int, bytes, int, bytes]],
                                                explicit: bool) -> None:
    ts = "1.2.840.10008.1.2.1" if explicit else "1.2.840.10008.1.2"
    _scans_agree(_meta(ts) + _encode(elements, explicit))


_TEXTY = st.binary(max_size=24) | st.text(alphabet=" \\\0+-.eE0123456789_abcXYZ^=\x1b", max_size=24).map(
    lambda t: t.encode("ascii"))


@settings(max_examples=1500, deadline=None)
@given(vr=st.sampled_from(VRS), value=st.none() | _TEXTY, little=st.booleans())
def test_raw_json_twins_agree(vr: str, value: bytes | None, little: bool) -> None:
    assert S.SPEEDUPS is not None
    assert _outcome(S.SPEEDUPS.raw_json, vr, value, little) == _outcome(H.raw_json_py, vr, value, little)


@pytest.mark.parametrize(("vr", "value", "expected"), [
    ("IS", b" 12\\-3 ", {"vr": "IS", "Value": [12, -3]}),
    ("DS", b"1.5\\ 2e3", {"vr": "DS", "Value": [1.5, 2000.0]}),
    ("PN", b"Doe^John\\", {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}),
    ("LT", b"  two\\words  ", {"vr": "LT", "Value": ["  two\\words"]}),
    ("US", b"\x01\x00\x02\x00\x03", {"vr": "US", "Value": [1, 2]}),
    ("SS", b"\xff\xff", {"vr": "SS", "Value": [-1]}),
    ("CS", b"  \0", {"vr": "CS"}),
    ("LO", "é".encode("latin-1"), None),
])
def test_raw_json_known_answers(vr: str, value: bytes, expected: dict | None) -> None:
    assert S.SPEEDUPS is not None
    assert S.SPEEDUPS.raw_json(vr, value) == expected == H.raw_json_py(vr, value)


def test_a_bad_integer_string_raises_value_error_in_both() -> None:
    assert S.SPEEDUPS is not None
    for fn in (S.SPEEDUPS.raw_json, H.raw_json_py):
        with pytest.raises(ValueError):
            fn("IS", b"1.5")


@pytest.mark.parametrize("depth", [1, 16, 17, 18, 40])
def test_nested_sequences_agree_at_the_depth_limit(depth: int) -> None:
    seq_open = b"\x09\x00\x10\x10SQ\0\0\xff\xff\xff\xff"
    item_open, item_end = b"\xfe\xff\x00\xe0\xff\xff\xff\xff", b"\xfe\xff\x0d\xe0\0\0\0\0"
    seq_end = b"\xfe\xff\xdd\xe0\0\0\0\0"
    body = (seq_open + item_open) * depth + (item_end + seq_end) * depth
    data = _meta("1.2.840.10008.1.2.1") + body + b"\xe0\x7f\x10\x00OB\0\0\0\0\0\0"
    _scans_agree(data)
    outcome = _outcome(S._scan_header_c, data, H._WANTED)
    assert (outcome[0] == "ok") == (depth <= 17)


def test_the_c_level_dicts_are_read_only_views() -> None:
    """The dicts the C twin shares between instances cannot be changed through what it hands out."""
    found = S.scan_header_py(HEADERS[-1], H._WANTED)
    levels = H._levels_c(found)
    assert _contents(levels) == H._levels_py(found)
    for attrs in levels.values():
        assert isinstance(attrs, MappingProxyType)
        with pytest.raises(TypeError):
            attrs["00100010"] = {"vr": "PN"}  # type: ignore[index]
        with pytest.raises(TypeError):
            del attrs["0020000D"]  # type: ignore[attr-defined]
        assert not hasattr(attrs, "update") and not hasattr(attrs, "pop") and not hasattr(attrs, "clear")
    again = H._levels_c(found)
    for level in (H.QueryLevel.PATIENT, H.QueryLevel.STUDY, H.QueryLevel.SERIES):
        assert again[level] is levels[level]


@settings(max_examples=600, deadline=None)
@given(values=st.dictionaries(st.sampled_from(sorted(H._WANTED)),
                              st.tuples(st.sampled_from([None, "", "CS", "UI", "IS", "DS", "US", "PN", "LO", "OB"]),
                                        _TEXTY), max_size=12))
def test_level_json_twins_agree_on_fuzzed_elements(values: dict[int, tuple[str | None, bytes]]) -> None:
    found = S.Scan("1.2.840.10008.1.2.1", None, values, None)
    assert _outcome(H._levels_c, found) == _outcome(H._levels_py, found)
