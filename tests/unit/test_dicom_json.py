"""The DICOM JSON text codec (PS3.18 F.2): orjson where it can, the standard library where it cannot."""

from __future__ import annotations

import json
import math

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
