"""The DICOM JSON text codec (PS3.18 F.2): orjson where it can, the standard library where it cannot."""

from __future__ import annotations

import json
import math
from types import MappingProxyType

from hypothesis import given
from hypothesis import strategies as st

from bastion.model import dicom_json

values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(values)
def test_encodes_the_json_value_the_standard_library_does(value: object) -> None:
    text = dicom_json.dumps(value)
    assert json.loads(text) == json.loads(json.dumps(value, ensure_ascii=False))
    assert dicom_json.loads(text) == json.loads(text)


def test_decodes_nan_written_by_json_dumps() -> None:
    stored = json.dumps({"00101020": {"vr": "DS", "Value": [float("nan")]}})
    assert math.isnan(dicom_json.loads(stored)["00101020"]["Value"][0])


def test_integers_wider_than_64_bits_fall_back() -> None:
    assert json.loads(dicom_json.dumps({"x": [2**70]})) == {"x": [2**70]}


def test_non_ascii_is_utf8() -> None:
    assert dicom_json.dumps({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Åström^Ærø"}]}}) == \
        '{"00100010":{"vr":"PN","Value":[{"Alphabetic":"Åström^Ærø"}]}}'.encode()


def test_a_read_only_mapping_is_written_as_the_dict_it_shows() -> None:
    attrs = {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "00100020": {"vr": "LO", "Value": [2**70]}}
    assert dicom_json.dumps(MappingProxyType(attrs)) == dicom_json.dumps(attrs)  # json's way (the wide int)
    assert dicom_json.dumps({"x": MappingProxyType({"a": 1})}) == b'{"x":{"a":1}}'  # nested: orjson's default
    assert dicom_json.level_text(MappingProxyType(attrs)) == dicom_json.dumps(attrs).decode()


def test_the_text_of_a_level_is_its_current_text_whatever_the_cache_held() -> None:
    """The texts of read-only level mappings are kept by identity: a mapping made after another died (which may
    take its ``id``) gets its own text, and a mutable dict is never answered from the cache."""
    for i in range(200):  # more than the cache keeps: it is emptied on the way
        attrs = MappingProxyType({"0020000E": {"vr": "UI", "Value": [f"1.2.{i}"]}})
        assert dicom_json.level_text(attrs) == dicom_json.dumps(dict(attrs)).decode()
        assert dicom_json.level_text(attrs) is dicom_json.level_text(attrs)
        del attrs
    mutable = {"00080060": {"vr": "CS", "Value": ["CT"]}}
    assert '"CT"' in dicom_json.level_text(mutable)
    mutable["00080060"] = {"vr": "CS", "Value": ["MR"]}
    assert '"MR"' in dicom_json.level_text(mutable)
