"""Query/Retrieve identifiers (PS3.4 C.4.1.1.3): decode a request's, encode a response's."""

from __future__ import annotations

import io
from typing import Any

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue

from bastion.errors import InvalidQuery
from bastion.model.levels import QueryLevel
from bastion.model.records import JsonDataset
from bastion.model.uids import EXPLICIT_VR_BIG_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN
from bastion.query.find import QueryKey

_SKIP = {0x00080052, 0x00080005, 0x00080054}  # level, character set, retrieve AE title


def decode_identifier(data: bytes, transfer_syntax: str) -> Dataset:
    """Decode an identifier dataset sent in ``transfer_syntax``."""
    try:
        ds = read_dataset(io.BytesIO(data), transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN,
                          transfer_syntax != EXPLICIT_VR_BIG_ENDIAN)
        for _ in ds:  # force parsing now, so errors surface here
            pass
    except Exception as exc:
        raise InvalidQuery(f"cannot decode the identifier: {exc}") from exc
    return ds


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, MultiValue)):
        return "\\".join(_text(v) for v in value)
    return str(value)


def query_level(ds: Dataset) -> QueryLevel:
    """The identifier's Query/Retrieve Level (0008,0052)."""
    try:
        return QueryLevel.parse(str(ds.get("QueryRetrieveLevel", "")))
    except ValueError as exc:
        raise InvalidQuery(f"Query/Retrieve Level {ds.get('QueryRetrieveLevel')!r} is not valid") from exc


def query_keys(ds: Dataset) -> tuple[list[QueryKey], list[int]]:
    """Matching keys (as text) and all requested tags of an identifier."""
    keys: list[QueryKey] = []
    tags: list[int] = []
    for el in ds:
        tag = int(el.tag)
        if tag in _SKIP or el.tag.group in (0x0000, 0x0002) or el.tag.is_private:
            continue
        tags.append(tag)
        if el.VR == "SQ":
            continue  # sequence matching is not offered: a return key only
        try:
            value = _text(el.value)
        except Exception as exc:
            raise InvalidQuery(f"cannot read the value of {el.keyword or el.tag}: {exc}") from exc
        keys.append(QueryKey(tag, el.keyword or f"{tag:08X}", el.VR, value))
    return keys, tags


def encode_response(result: JsonDataset, level: QueryLevel, transfer_syntax: str,
                    retrieve_aet: str | None) -> bytes:
    """Encode one C-FIND match (PS3.4 C.4.1.1.3.2) in ``transfer_syntax``."""
    ds = Dataset.from_json(result)
    non_ascii = any(isinstance(v, str) and not v.isascii() for v in _walk(result))
    if non_ascii:
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level.value
    if retrieve_aet:
        ds.RetrieveAETitle = retrieve_aet
    fp = DicomBytesIO()
    fp.is_little_endian = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    fp.is_implicit_VR = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    write_dataset(fp, ds)
    return fp.getvalue()


def encode_failed_uids(uids: list[str], transfer_syntax: str) -> bytes:
    """A dataset with Failed SOP Instance UID List (0008,0058) for a final C-MOVE/C-GET response."""
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = uids if len(uids) != 1 else uids[0]
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    write_dataset(fp, ds)
    return fp.getvalue()


def _walk(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _walk(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _walk(v)]
    return [obj]
