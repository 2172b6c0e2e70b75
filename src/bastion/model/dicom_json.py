"""Text of the DICOM JSON model (PS3.18 F.2): fast decoding and encoding with orjson.

The index keeps each level's attributes as DICOM JSON text and QIDO-RS answers with a
DICOM JSON array, so decoding and encoding are most of the Python work of a search.
orjson does both several times faster than the standard library. It is strict where the
standard library is lenient, so each function falls back to :mod:`json` for what orjson
refuses: ``NaN``/``Infinity`` (which ``json.dumps`` writes for a malformed DS value) and
integers wider than 64 bits.

Examples
--------
>>> loads('{"00100020": {"vr": "LO", "Value": ["P1"]}}')["00100020"]["Value"]
['P1']
>>> dumps([{"00100020": {"vr": "LO", "Value": ["Å"]}}])
b'[{"00100020":{"vr":"LO","Value":["\\xc3\\x85"]}}]'
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(text: str | bytes) -> Any:
    """Decode JSON text (as :func:`json.loads` does, including ``NaN``)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON of ``value``: the JSON value ``json.dumps(..., ensure_ascii=False)`` gives.

    A NaN or infinite float becomes ``null`` (``json.dumps`` writes ``NaN``, which is not JSON).
    """
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: an integer wider than 64 bits, a non-str key
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


#: The texts of the level dicts made last: the header scan hands consecutive instances of one series the same
#: patient, study and series dicts (``_cscan.levels``' cache). Each entry holds its dict, so that no other dict
#: can take its ``id`` while it is here.
_LEVEL_TEXTS: dict[int, tuple[Any, str]] = {}


def level_text(attrs: dict[str, Any]) -> str:
    """The stored text of one level's DICOM JSON (as :func:`dumps`, decoded), kept for the dicts made last.

    The dicts must not be changed once their text was asked for (``bastion.ingest.header.Header``).
    """
    known = _LEVEL_TEXTS.get(id(attrs))
    if known is not None and known[0] is attrs:
        return known[1]
    text = dumps(attrs).decode()
    if len(_LEVEL_TEXTS) >= 32:
        _LEVEL_TEXTS.clear()
    _LEVEL_TEXTS[id(attrs)] = (attrs, text)
    return text
