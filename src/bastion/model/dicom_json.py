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
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import orjson


def loads(text: str | bytes) -> Any:
    """Decode JSON text (as :func:`json.loads` does, including ``NaN``)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _plain(value: Any) -> Any:
    """A read-only mapping (the header scan's level attributes) as the dict it shows; TypeError otherwise."""
    if isinstance(value, MappingProxyType):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON of ``value``: the JSON value ``json.dumps(..., ensure_ascii=False)`` gives.

    A NaN or infinite float becomes ``null`` (``json.dumps`` writes ``NaN``, which is not JSON). A
    :class:`types.MappingProxyType` is written as the mapping it shows.
    """
    if type(value) is MappingProxyType:  # the common one, copied: cheaper than orjson's call of ``default``
        value = value.copy()
    try:
        return orjson.dumps(value, default=_plain)
    except TypeError:  # orjson.JSONEncodeError: an integer wider than 64 bits, a non-str key
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=_plain).encode()


#: The texts of the read-only level mappings seen last: the header scan hands consecutive instances of one series
#: the same patient, study and series mappings. Keyed by ``id``, each entry holds its mapping, so no other object
#: can take that ``id`` while the entry exists, and a hit is checked by identity.
_LEVEL_TEXTS: dict[int, tuple[Mapping[str, Any], str]] = {}
_LEVEL_TEXTS_MAX = 32


def level_text(attrs: Mapping[str, Any]) -> str:
    """The stored text of one level's DICOM JSON (as :func:`dumps`, decoded).

    The text of a read-only mapping (:class:`types.MappingProxyType`, what the header scan hands out) is kept
    for the mappings seen last, which cannot change at the top level; a mutable dict is written every time.
    """
    if type(attrs) is not MappingProxyType:
        return dumps(attrs).decode()
    known = _LEVEL_TEXTS.get(id(attrs))
    if known is not None and known[0] is attrs:
        return known[1]
    text = dumps(attrs).decode()
    if len(_LEVEL_TEXTS) >= _LEVEL_TEXTS_MAX:
        _LEVEL_TEXTS.clear()
    _LEVEL_TEXTS[id(attrs)] = (attrs, text)
    return text


#: The component groups of a person name, in the order of its ``=``-separated value (PS3.5 6.2.1.1).
PERSON_NAME_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def person_name(value: str) -> dict[str, str]:
    """A PN value's DICOM JSON object: one member per non-empty component group (PS3.18 F.2.2).

    Examples
    --------
    >>> person_name("Yamada^Tarou=山田^太郎=やまだ^たろう")["Ideographic"]
    '山田^太郎'
    >>> person_name("Wang^XiaoDong=王^小東=")
    {'Alphabetic': 'Wang^XiaoDong', 'Ideographic': '王^小東'}
    >>> person_name("=山田^太郎")
    {'Ideographic': '山田^太郎'}
    """
    return {name: group for name, group in zip(PERSON_NAME_GROUPS, value.split("=", 2), strict=False) if group}


def _person_name_value(value: Any) -> Any:
    """``value`` as PS3.18 F.2.2 wants it; the same object when it is already so."""
    if isinstance(value, str):
        return person_name(value)
    if not isinstance(value, dict):
        return value
    alphabetic = value.get("Alphabetic")
    if isinstance(alphabetic, str) and "=" in alphabetic:  # the whole value in one member
        return {**person_name(alphabetic), **{k: v for k, v in value.items() if k != "Alphabetic" and v}}
    if all(value.values()):
        return value
    return {k: v for k, v in value.items() if v}


def split_person_names(element: dict[str, Any]) -> dict[str, Any]:
    """One DICOM JSON element with its person names split into component groups (PS3.18 F.2.2), also inside
    sequence items; the same object when nothing needed changing.

    The index keeps each PN value whole, ``=`` separators included, in its ``Alphabetic`` member: matching and
    the C-FIND identifiers read it there. Whatever answers DICOM JSON to a client passes its elements through
    this function, which also drops empty component groups.

    Examples
    --------
    >>> split_person_names({"vr": "PN", "Value": [{"Alphabetic": "Hong^Gildong=洪^吉洞=홍^길동"}]})["Value"]
    [{'Alphabetic': 'Hong^Gildong', 'Ideographic': '洪^吉洞', 'Phonetic': '홍^길동'}]
    """
    vr = element.get("vr")
    if vr != "PN" and vr != "SQ":
        return element
    values = element.get("Value")
    if not values:
        return element
    if vr == "PN":
        fixed = [_person_name_value(v) for v in values]
    else:
        fixed = [split_person_names_in(item) if isinstance(item, dict) else item for item in values]
    if all(a is b for a, b in zip(fixed, values, strict=True)):
        return element
    return {**element, "Value": fixed}


def split_person_names_in(dataset: dict[str, Any]) -> dict[str, Any]:
    """:func:`split_person_names` of every element of a DICOM JSON dataset; the same object if none changed."""
    fixed = {key: split_person_names(element) if isinstance(element, dict) else element
             for key, element in dataset.items()}
    if all(fixed[key] is element for key, element in dataset.items()):
        return dataset
    return fixed


#: Where a person name in DICOM JSON text is not split as PS3.18 F.2.2 wants: a group separator inside the
#: ``Alphabetic`` member, or an empty member.
_UNSPLIT_PERSON_NAME = re.compile(r'"Alphabetic"\s*:\s*"(?:[^"\\=]|\\.)*=|"(?:Alphabetic|Ideographic|Phonetic)"\s*:\s*""')


def needs_person_name_split(text: str) -> bool:
    """Whether DICOM JSON ``text`` holds a person name that :func:`split_person_names` would change.

    A search of the text, far cheaper than decoding it: text that passes is served as it is.
    """
    return _UNSPLIT_PERSON_NAME.search(text) is not None
