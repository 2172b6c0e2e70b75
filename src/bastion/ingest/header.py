"""Read and check the header of a received Part 10 object (PS3.10 7.1, PS3.4 B.2.3).

Only the header is parsed (``stop_before_pixels``); pixel data is checked for completeness
without being read, so a 2 GB multi-frame object costs no more memory than a small one.

What is refused and what is accepted with a warning (:attr:`Header.warnings`, answered as a warning status and
recorded in the ingest warnings log, :mod:`bastion.ingest.rejections`):

* Refused (:class:`InvalidObject` and subclasses, 0xC000): not DICOM, truncated (Pixel Data included), a SOP
  Class, SOP Instance, Study or Series Instance UID that is missing, empty or not identifiable
  (:func:`bastion.model.uids.is_identifiable_uid`: 1-128 characters, digits and dots, no empty component), and
  sequences nested more than :data:`MAX_SEQUENCE_DEPTH` deep.
* Accepted with a warning: such a UID that breaks PS3.5 9.1 but is identifiable (a component with a leading
  zero, more than 64 characters), and a File Meta Media Storage SOP Instance UID (PS3.10 7.1) that differs from
  the dataset's SOP Instance UID, which is the one that identifies the object. Every warning is derived from the
  object's bytes alone, so re-reading a stored object (``bastion index rebuild``) finds the same ones.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from bastion.errors import (
    BastionError,
    InvalidObject,
    InvalidUID,
    MissingAttribute,
    UnsupportedTransferSyntax,
)
from bastion.ingest.nesting import (
    ITEM_TAG_BYTES,
    MAX_SEQUENCE_DEPTH,
    TOO_DEEP,
    dataset_nested_too_deep,
    raw_nested_too_deep,
)
from bastion.ingest.scan import SPEEDUPS, NotSimple, Scan, scan_header
from bastion.model.attributes import LEVEL_KEYWORDS, tag_hex, tag_of, vr_of
from bastion.model.levels import QueryLevel
from bastion.model.part10 import dataset_offset
from bastion.model.records import JsonDataset
from bastion.model.uids import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    STORABLE_TRANSFER_SYNTAXES,
    UID_MAX_LENGTH,
    is_identifiable_uid,
    is_valid_uid,
)


@dataclass(frozen=True)
class Header:
    """What the index needs from one object's header.

    ``attrs`` holds each level's DICOM JSON. Nobody changes these dicts after the header is read: the C scan
    hands consecutive instances of one series the same patient, study and series dicts, and the index keeps
    their stored text by identity (``model.dicom_json.level_text``).
    """

    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    transfer_syntax: str
    attrs: dict[QueryLevel, JsonDataset]
    #: What is wrong with an object that is accepted all the same (see the module docstring), each a short
    #: sentence naming the attribute and the problem; empty for a conformant object.
    warnings: tuple[str, ...] = ()


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


def raw_json_py(vr: str, value: bytes | None, little_endian: bool = True) -> dict[str, Any] | None:
    """DICOM JSON straight from raw bytes for plain-ASCII and binary values; None otherwise.

    :func:`raw_json` is its C twin where that was built (:data:`bastion.ingest.scan.SPEEDUPS`).
    """
    if value is None:
        return {"vr": vr}
    if vr in _BINARY:
        fmt = _BINARY[vr]
        n = len(value) // struct.calcsize(fmt)
        vals = list(struct.unpack(("<" if little_endian else ">") + fmt * n, value[: n * struct.calcsize(fmt)]))
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


raw_json = SPEEDUPS.raw_json if SPEEDUPS is not None else raw_json_py


def _to_json(ds: Dataset, level: QueryLevel) -> JsonDataset:
    out: JsonDataset = {}
    present = ds._dict
    for tag, key in _LEVEL_TAGS[level]:
        elem = present.get(BaseTag(tag))
        if elem is None:
            continue
        try:
            fast = None
            if isinstance(elem, RawDataElement) and (elem.VR != "UN" or not elem.value):
                fast = raw_json(vr_of(tag) if elem.VR in (None, "UN") else elem.VR, elem.value,
                                elem.is_little_endian)
            out[key] = fast if fast is not None else _element_json(ds[tag])
        except Exception:  # an unreadable optional attribute is left out, not fatal
            continue
    return out


def _check_pixel_data_complete(fp: Any, size: int, ts: str) -> None:
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


_TAGS = {keyword: tag_of(keyword) for keyword in (
    "SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID")}
_WANTED = frozenset(tag for tags in _LEVEL_TAGS.values() for tag, _ in tags)
#: The scan reads the first _FIRST_BLOCK bytes, which hold the header of almost every object, and only if it did
#: not reach the Pixel Data there, the first _SCAN_BLOCK (reading 256 KB of a 512 KB CT instance copied them: a
#: tenth of the instructions of its C-STORE).
_FIRST_BLOCK = 16 * 1024
_SCAN_BLOCK = 256 * 1024


#: Valid SOP Class, Study and Series Instance UIDs seen lately: they repeat from one object to the next.
_VALID_UIDS: dict[str, None] = {}


def uid_problem(uid: str) -> str:
    """Why an identifiable ``uid`` breaks PS3.5 9.1, in a few words; ``""`` if it does not."""
    if is_valid_uid(uid):
        return ""
    if len(uid) > UID_MAX_LENGTH:
        return f"is longer than {UID_MAX_LENGTH} characters"
    return "has a component with a leading zero"


def _checked_uid(keyword: str, tag: int, text: str | None, warnings: list[str]) -> str:
    """``text`` if it identifies an object; a warning appended to ``warnings`` if it breaks PS3.5 9.1."""
    if text in _VALID_UIDS:
        return text
    if text is None or text == "":
        raise MissingAttribute(f"{keyword} is missing or empty", tag=tag if text is not None else None)
    if not is_identifiable_uid(text):
        raise InvalidUID(f"{keyword} {text[:80]!r} is not a UID", uid=text[:128])
    problem = uid_problem(text)
    if problem:
        warnings.append(f"{keyword} {problem} (PS3.5 9.1)")
    elif keyword != "SOPInstanceUID":
        if len(_VALID_UIDS) >= 1024:
            _VALID_UIDS.clear()
        _VALID_UIDS[text] = None
    return text


#: The warning for a File Meta that names another SOP Instance than its dataset (PS3.10 7.1).
META_SOP_MISMATCH = "MediaStorageSOPInstanceUID differs from SOPInstanceUID"


def _header(ts: str, meta_sop: str | None, uid_text: Any, patient_id: str,
            attrs: dict[QueryLevel, JsonDataset]) -> Header:
    """Validate the UIDs (PS3.4 B.2.3) and assemble the Header: shared by both parsers.

    The dataset's SOP Instance UID identifies the object; a File Meta naming another one is a warning. (A
    C-STORE's File Meta is built from its command, whose UID the dataset must repeat: the pipeline checks that.)
    """
    warnings: list[str] = []

    def uid(keyword: str) -> str:
        return _checked_uid(keyword, _TAGS[keyword], uid_text(keyword), warnings)

    sop_uid = uid("SOPInstanceUID")
    sop_class, study, series = uid("SOPClassUID"), uid("StudyInstanceUID"), uid("SeriesInstanceUID")
    if meta_sop is not None and meta_sop != sop_uid:
        warnings.append(META_SOP_MISMATCH)
    return Header(sop_class_uid=sop_class, sop_uid=sop_uid, study_uid=study, series_uid=series,
                  patient_id=patient_id, transfer_syntax=ts, attrs=attrs, warnings=tuple(warnings))


def _levels_py(found: Scan) -> dict[QueryLevel, JsonDataset]:
    """Each level's DICOM JSON from a scan (the C twin: ``SPEEDUPS.levels``); NotSimple if a value needs pydicom."""
    attrs: dict[QueryLevel, JsonDataset] = {}
    for level, tags in _LEVEL_TAGS.items():
        out: JsonDataset = {}
        for tag, key in tags:
            element = found.elements.get(tag)
            if element is None:
                continue
            try:
                js = raw_json(element[0] or vr_of(tag), element[1])
            except ValueError as exc:
                raise NotSimple(str(exc)) from exc
            if js is None:
                raise NotSimple(f"{key} needs the general parser")
            out[key] = js
        attrs[level] = out
    return attrs


_LEVEL_SPECS = [(level, list(tags)) for level, tags in _LEVEL_TAGS.items()]
_DICTIONARY_VRS = {tag: vr_of(tag) for tags in _LEVEL_TAGS.values() for tag, _ in tags}


def _levels_c(found: Scan) -> dict[QueryLevel, JsonDataset]:
    assert SPEEDUPS is not None
    return SPEEDUPS.levels(found.elements, _LEVEL_SPECS, _DICTIONARY_VRS)  # type: ignore[no-any-return]


_levels = _levels_c if SPEEDUPS is not None else _levels_py


def _from_scan(found: Scan) -> Header:
    """The Header from a :func:`scan_header` result; NotSimple if a value needs pydicom."""
    attrs = _levels(found)

    def uid_text(keyword: str) -> str | None:
        element = found.elements.get(_TAGS[keyword])
        return None if element is None else element[1].decode("ascii", "replace").strip("\x00 ")

    patient = found.elements.get(_TAGS["PatientID"])
    patient_id = patient[1].decode("ascii").strip("\x00 ") if patient else ""
    return _header(found.transfer_syntax, found.meta_sop_uid, uid_text, patient_id, attrs)


def _scan_block(block: bytes, size: int) -> Scan:
    """The scan of ``block``, the start of an object of ``size`` bytes; NotSimple unless it reached the Pixel Data
    or the end of the object."""
    found = scan_header(block, _WANTED)
    if found.pixel_data_offset is None and len(block) < size:
        raise NotSimple("Pixel Data not reached in the scanned block")
    return found


def read_header(fp: BinaryIO) -> Header:
    """Parse and validate the header of the Part 10 object readable from ``fp`` (at offset 0).

    The common case (Explicit/Implicit VR Little Endian, plain values) takes the fast scan of
    :mod:`bastion.ingest.scan`; everything else, and any doubt, takes pydicom. Both give the
    same Header (``tests/unit/test_header_scan.py``).

    Raises
    ------
    InvalidObject, MissingAttribute, InvalidUID
        The object is not DICOM, is truncated, nests sequences more than :data:`MAX_SEQUENCE_DEPTH` deep, or
        lacks an identifiable SOP Class, SOP Instance, Study or Series Instance UID.
    UnsupportedTransferSyntax
        Its transfer syntax is not one Bastion stores.
    """
    with fp:
        size = fp.seek(0, os.SEEK_END)
        fp.seek(0)
        block = fp.read(_FIRST_BLOCK)
        try:
            try:
                found = _scan_block(block, size)
            except NotSimple:
                if len(block) == size:
                    raise
                fp.seek(0)
                block = fp.read(_SCAN_BLOCK)
                found = _scan_block(block, size)
            header = _from_scan(found)
        except NotSimple:
            fp.seek(0)
            return read_header_pydicom(fp, size)
        _check_nesting(block, found)
        if found.pixel_data_offset is not None:
            fp.seek(found.pixel_data_offset)
            try:
                _check_pixel_data_complete(fp, size, found.transfer_syntax)
            except struct.error as exc:
                raise InvalidObject(f"cannot parse the dataset: {exc}") from exc
        return header




def _check_nesting(block: bytes, found: Scan) -> None:
    """Raise InvalidObject if the scanned object nests sequences more than :data:`MAX_SEQUENCE_DEPTH` deep.

    The scan skips sequences of defined length whole, so their depth is checked here; only where the header
    holds as many items as the bound, the least a nesting that deep needs, are the element headers walked.
    """
    end = found.pixel_data_offset if found.pixel_data_offset is not None else len(block)
    if block.count(ITEM_TAG_BYTES, 0, end) < MAX_SEQUENCE_DEPTH:
        return
    explicit = found.transfer_syntax == EXPLICIT_VR_LITTLE_ENDIAN
    if raw_nested_too_deep(block, dataset_offset(block), end, explicit):
        raise InvalidObject(f"cannot parse the dataset: {TOO_DEEP}")


#: The Transfer Syntax UID element of the File Meta Information (explicit VR little endian, PS3.10 7.1).
_META_TRANSFER_SYNTAX = b"\x02\x00\x10\x00UI"


def _check_nesting_before_pydicom(fp: BinaryIO) -> None:
    """Refuse an object nested more than :data:`MAX_SEQUENCE_DEPTH` deep before pydicom recurses into it.

    pydicom reads each sequence level with a recursive call: deep enough, it fails in ways other than a
    RecursionError (a read cut short by the stack's end). The first :data:`_SCAN_BLOCK` bytes of a little
    endian, uncompressed-framing dataset are walked without recursion (:func:`raw_nested_too_deep`); a
    deflated or big endian one is left to pydicom (and its RecursionError). ``fp`` is left at offset 0.
    """
    fp.seek(0)
    block = fp.read(_SCAN_BLOCK)
    fp.seek(0)
    at = block.find(_META_TRANSFER_SYNTAX, 132, 132 + 4096) if block[128:132] == b"DICM" else -1
    if at < 0 or at + 8 > len(block):
        return  # no Transfer Syntax UID, or the object ends inside its element: pydicom's read refuses it
    length = struct.unpack_from("<H", block, at + 6)[0]
    ts = block[at + 8: at + 8 + length].decode("ascii", "replace").strip("\x00 ")
    if ts in (DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN) or ts not in STORABLE_TRANSFER_SYNTAXES:
        return  # deflated, big endian or unknown: not walked here
    explicit = ts != IMPLICIT_VR_LITTLE_ENDIAN
    if raw_nested_too_deep(block, dataset_offset(block), len(block), explicit):
        raise InvalidObject(f"cannot parse the dataset: {TOO_DEEP}")


def read_header_pydicom(fp: BinaryIO, size: int) -> Header:
    """:func:`read_header` with pydicom, for every transfer syntax and encoding.

    pydicom parses nested sequences recursively: an object nested deeper than Python's stack allows is refused
    like one nested more than :data:`MAX_SEQUENCE_DEPTH` deep (InvalidObject, 0xC000), never a RecursionError.
    """
    _check_nesting_before_pydicom(fp)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=65536)
        ts = str(ds.file_meta.get("TransferSyntaxUID", "")).strip("\x00 ")
        if not ts:
            raise InvalidObject("the file meta information has no Transfer Syntax UID")
        if ts not in STORABLE_TRANSFER_SYNTAXES:
            raise UnsupportedTransferSyntax(f"transfer syntax {ts} is not supported", uid=ts)
        _check_pixel_data_complete(fp, size, ts)
    except RecursionError:
        raise InvalidObject(f"cannot parse the dataset: {TOO_DEEP}") from None
    except (InvalidDicomError, BytesLengthException, EOFError, ValueError, KeyError, struct.error, OSError,
            AttributeError, TypeError, NotImplementedError, UnicodeError, zlib.error) as exc:  # zlib: PS3.5 A.5
        raise InvalidObject(f"cannot parse the dataset: {exc}") from exc

    def uid_text(keyword: str) -> str | None:
        if keyword not in ds:
            return None
        value = ds.get(keyword)
        return "" if value is None else str(value).strip("\x00 ")

    # pydicom decodes an element when it is first read: a damaged one (an unknown VR, a length that is no
    # multiple of its value's size) raises here, whatever it raises
    try:
        if dataset_nested_too_deep(ds):
            raise InvalidObject(f"cannot parse the dataset: {TOO_DEEP}")
        meta_sop = ds.file_meta.get("MediaStorageSOPInstanceUID")
        attrs = {level: _to_json(ds, level) for level in QueryLevel}
        patient_id = str(ds.get("PatientID", "") or "").strip()
        return _header(ts, None if meta_sop is None else str(meta_sop).strip("\x00 "), uid_text, patient_id, attrs)
    except BastionError:
        raise
    except RecursionError:
        raise InvalidObject(f"cannot parse the dataset: {TOO_DEEP}") from None
    except Exception as exc:
        raise InvalidObject(f"cannot decode the dataset's attributes: {exc}") from exc
