"""Read and check the header of a received Part 10 object (PS3.10 7.1, PS3.4 B.2.3).

Only the header is parsed (``stop_before_pixels``); pixel data is checked for completeness
without being read, so a 2 GB multi-frame object costs no more memory than a small one.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from bastion.errors import (
    CommandMismatch,
    InvalidObject,
    InvalidUID,
    MissingAttribute,
    UnsupportedTransferSyntax,
)
from bastion.model.attributes import LEVEL_KEYWORDS, tag_hex, tag_of, vr_of
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


_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
_NUMBER_VRS = frozenset({"US", "UL", "SS", "SL", "FL", "FD", "UV", "SV"})
_LEVEL_TAGS = {level: [(tag_of(k), tag_hex(tag_of(k))) for k in kws] for level, kws in LEVEL_KEYWORDS.items()}


def _element_json(el: DataElement) -> dict[str, Any]:
    """DICOM JSON (PS3.18 F.2) of one element; fast paths for the common VRs."""
    vr, value = el.VR, el.value
    if vr in _TEXT_VRS or vr == "PN" or vr in ("IS", "DS") or vr in _NUMBER_VRS:
        values = list(value) if isinstance(value, (list, MultiValue)) else [value]
        values = [v for v in values if v is not None and v != ""]
        if not values:
            return {"vr": vr}
        if vr == "PN":
            return {"vr": vr, "Value": [{"Alphabetic": str(v)} for v in values]}
        if vr == "IS":
            return {"vr": vr, "Value": [int(v) for v in values]}
        if vr == "DS":
            return {"vr": vr, "Value": [float(v) for v in values]}
        if vr in _NUMBER_VRS:
            return {"vr": vr, "Value": values}
        return {"vr": vr, "Value": [str(v) for v in values]}
    return el.to_json_dict(None, 4096)


_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "IS", "DS"})
_CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_BINARY = {"US": "H", "UL": "I", "SS": "h", "SL": "i", "FL": "f", "FD": "d"}


def _fast_json(raw: Any, vr: str) -> dict[str, Any] | None:
    """DICOM JSON straight from a raw element for plain-ASCII and binary values; None otherwise."""
    value = raw.value
    if value is None:
        return {"vr": vr}
    if vr in _BINARY:
        fmt = _BINARY[vr]
        n = len(value) // struct.calcsize(fmt)
        vals = list(struct.unpack(("<" if raw.is_little_endian else ">") + fmt * n, value[: n * struct.calcsize(fmt)]))
        return {"vr": vr, "Value": vals} if vals else {"vr": vr}
    if vr not in _ASCII_VRS and vr not in _CHARSET_VRS:
        return None
    if not value.isascii() or b"\x1b" in value:
        return None  # non-ASCII text: let pydicom apply the Specific Character Set
    text = value.decode("ascii")
    parts = [text] if vr in ("LT", "ST", "UT") else text.split("\\")
    parts = [p.strip(" \x00") if vr != "LT" else p.rstrip(" \x00") for p in parts]
    parts = [p for p in parts if p]
    if not parts:
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": p} for p in parts]}
    if vr == "IS":
        return {"vr": vr, "Value": [int(p) for p in parts]}
    if vr == "DS":
        return {"vr": vr, "Value": [float(p) for p in parts]}
    return {"vr": vr, "Value": parts}


def _to_json(ds: Dataset, level: QueryLevel) -> JsonDataset:
    out: JsonDataset = {}
    present = ds._dict
    for tag, key in _LEVEL_TAGS[level]:
        elem = present.get(tag)
        if elem is None:
            continue
        try:
            fast = None
            if isinstance(elem, RawDataElement) and (elem.VR != "UN" or not elem.value):
                fast = _fast_json(elem, vr_of(tag) if elem.VR in (None, "UN") else elem.VR)
            out[key] = fast if fast is not None else _element_json(ds[tag])
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


def read_header(fp: BinaryIO) -> Header:
    """Parse and validate the header of the Part 10 object readable from ``fp`` (at offset 0).

    Raises
    ------
    InvalidObject, MissingAttribute, InvalidUID
        The object is not DICOM, is truncated, or lacks a required UID.
    UnsupportedTransferSyntax
        Its transfer syntax is not one Bastion stores.
    """
    size = fp.seek(0, os.SEEK_END)
    fp.seek(0)
    try:
        with fp:
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
        # For C-STORE the file meta carries the command's UID: a mismatch is 0xA900 (PS3.4 B.2.3).
        raise CommandMismatch(f"file meta SOP Instance UID {meta_sop} differs from the dataset's {sop_uid}")
    try:
        attrs = {level: _to_json(ds, level) for level in QueryLevel}
        patient_id = str(ds.get("PatientID", "") or "").strip()
    except Exception as exc:
        raise InvalidObject(f"cannot decode the dataset's attributes: {exc}") from exc
    return Header(
        sop_class_uid=_uid(ds, "SOPClassUID"), sop_uid=sop_uid, study_uid=_uid(ds, "StudyInstanceUID"),
        series_uid=_uid(ds, "SeriesInstanceUID"), patient_id=patient_id, transfer_syntax=ts, attrs=attrs)
