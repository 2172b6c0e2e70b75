"""Read and check the header of a received Part 10 object (PS3.10 7.1, PS3.4 B.2.3).

Only the header is parsed (``stop_before_pixels``); pixel data is checked for completeness
without being read, so a 2 GB multi-frame object costs no more memory than a small one.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError

from bastion.errors import InvalidObject, InvalidUID, MissingAttribute, UnsupportedTransferSyntax
from bastion.model.attributes import LEVEL_KEYWORDS, tag_hex
from bastion.model.levels import QueryLevel
from bastion.model.records import JsonDataset
from bastion.model.uids import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    STORABLE_TRANSFER_SYNTAXES,
    is_valid_uid,
)


@dataclass(frozen=True)
class Header:
    """What the index needs from one object's header."""

    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    transfer_syntax: str
    attrs: dict[QueryLevel, JsonDataset]


def _uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or str(value).strip("\x00 ") == "":
        raise MissingAttribute(f"{keyword} is missing or empty", tag=int(ds.data_element(keyword).tag)
                               if keyword in ds else None)
    text = str(value).strip("\x00 ")
    if not is_valid_uid(text):
        raise InvalidUID(f"{keyword} {text!r} is not a valid UID", uid=text)
    return text


def _to_json(ds: Dataset, level: QueryLevel) -> JsonDataset:
    out: JsonDataset = {}
    for keyword in LEVEL_KEYWORDS[level]:
        if keyword not in ds:
            continue
        el = ds.data_element(keyword)
        if el is None:
            continue
        try:
            out[tag_hex(int(el.tag))] = el.to_json_dict(None, 4096)
        except Exception:  # an unreadable optional attribute is left out, not fatal
            continue
    return out


def _check_pixel_data_complete(fp: Any, ds: FileDataset, size: int, ts: str) -> None:
    """Raise InvalidObject if the Pixel Data element runs past the end of the file."""
    if ts == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        return  # the whole dataset is one deflate stream, parsed in full by pydicom
    pos = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        return  # no pixel data
    big = ts == EXPLICIT_VR_BIG_ENDIAN
    group, elem = struct.unpack(">HH" if big else "<HH", head[:4])
    if (group, elem) not in ((0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)):
        return
    vr = head[4:6]
    if ts == IMPLICIT_VR_LITTLE_ENDIAN or not vr.isalpha() or not vr.isupper():
        length, header_len = struct.unpack(">I" if big else "<I", head[4:8])[0], 8
    elif vr in (b"OB", b"OW", b"OF", b"OD", b"OL", b"UN", b"OV"):
        if len(head) < 12:
            raise InvalidObject("object is truncated inside the Pixel Data header")
        length, header_len = struct.unpack(">I" if big else "<I", head[8:12])[0], 12
    else:
        length, header_len = struct.unpack(">H" if big else "<H", head[6:8])[0], 8
    if length != 0xFFFFFFFF:
        if pos + header_len + length > size:
            raise InvalidObject(f"Pixel Data declares {length} bytes but the object ends "
                                f"{pos + header_len + length - size} bytes early: it is truncated")
        return
    # Encapsulated (PS3.5 A.4): walk the items to the sequence delimiter without reading them.
    item_pos = pos + header_len
    while True:
        fp.seek(item_pos)
        item = fp.read(8)
        if len(item) < 8:
            raise InvalidObject("encapsulated Pixel Data is not terminated: the object is truncated")
        g, e, n = struct.unpack(">HHI" if big else "<HHI", item)
        if (g, e) == (0xFFFE, 0xE0DD):
            return
        if (g, e) != (0xFFFE, 0xE000) or item_pos + 8 + n > size:
            raise InvalidObject("encapsulated Pixel Data is malformed or truncated")
        item_pos += 8 + n


def read_header(path: str) -> Header:
    """Parse and validate the header of the Part 10 file at ``path``.

    Raises
    ------
    InvalidObject, MissingAttribute, InvalidUID
        The object is not DICOM, is truncated, or lacks a required UID.
    UnsupportedTransferSyntax
        Its transfer syntax is not one Bastion stores.
    """
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=65536)
            ts = str(ds.file_meta.get("TransferSyntaxUID", "")).strip("\x00 ")
            if not ts:
                raise InvalidObject("the file meta information has no Transfer Syntax UID")
            if ts not in STORABLE_TRANSFER_SYNTAXES:
                raise UnsupportedTransferSyntax(f"transfer syntax {ts} is not supported", uid=ts)
            _check_pixel_data_complete(fp, ds, size, ts)
    except (InvalidDicomError, EOFError, ValueError, KeyError, struct.error, OSError, AttributeError,
            TypeError, NotImplementedError, UnicodeError) as exc:
        raise InvalidObject(f"cannot parse the dataset: {exc}") from exc
    sop_uid = _uid(ds, "SOPInstanceUID")
    meta_sop = str(ds.file_meta.get("MediaStorageSOPInstanceUID", sop_uid)).strip("\x00 ")
    if meta_sop != sop_uid:
        raise InvalidObject(f"file meta SOP Instance UID {meta_sop} differs from the dataset's {sop_uid}")
    try:
        attrs = {level: _to_json(ds, level) for level in QueryLevel}
        patient_id = str(ds.get("PatientID", "") or "").strip()
    except Exception as exc:
        raise InvalidObject(f"cannot decode the dataset's attributes: {exc}") from exc
    return Header(
        sop_class_uid=_uid(ds, "SOPClassUID"), sop_uid=sop_uid, study_uid=_uid(ds, "StudyInstanceUID"),
        series_uid=_uid(ds, "SeriesInstanceUID"), patient_id=patient_id, transfer_syntax=ts, attrs=attrs)
