"""has_odd_length_element (PS3.5 7.1.1, A.4) against hand-made datasets and a pydicom reference, and
even_dataset's re-encoding of what it finds."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.filereader import read_dataset

from bastion.model.part10 import dataset_offset
from bastion.query.odd_lengths import has_odd_length_element
from bastion.query.retrieve import even_dataset

EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
LONG = {"OB", "OW", "SQ", "UN", "UT", "UC", "UR", "OD", "OF", "OL", "OV", "SV", "UV"}
UNDEFINED = 0xFFFFFFFF


def el(tag: int, vr: str, value: bytes, *, explicit: bool = True, length: int | None = None) -> bytes:
    """One element; ``length`` overrides the value's (undefined length for sequences)."""
    n = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if not explicit:
        return head + struct.pack("<I", n) + value
    if vr in LONG:
        return head + vr.encode() + b"\0\0" + struct.pack("<I", n) + value
    return head + vr.encode() + struct.pack("<H", n) + value


def item(content: bytes, *, undefined: bool = False) -> bytes:
    if undefined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED) + content + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content


def sq(tag: int, items: list[bytes], *, undefined: bool = False, explicit: bool = True) -> bytes:
    body = b"".join(items)
    if undefined:
        return el(tag, "SQ", body + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), explicit=explicit, length=UNDEFINED)
    return el(tag, "SQ", body, explicit=explicit)


def walk(data: bytes, ts: str = EXPLICIT) -> bool:
    return has_odd_length_element(io.BytesIO(data), ts)


PATIENT_ID = 0x00100020
MODALITY = 0x00080060
PRIVATE_CREATOR = 0x00090010
PRIVATE_OB = 0x00091001
REFERENCED_IMAGES = 0x00081140
REFERENCED_SOP = 0x00081155
PIXEL_DATA = 0x7FE00010


def header(explicit: bool = True) -> bytes:
    return (el(MODALITY, "CS", b"CT", explicit=explicit) + el(PRIVATE_CREATOR, "LO", b"BASTION ", explicit=explicit))


def test_even_dataset_has_none() -> None:
    data = header() + el(PATIENT_ID, "LO", b"ID12") + sq(REFERENCED_IMAGES, [item(el(REFERENCED_SOP, "UI", b"1.2\0"))])
    assert not walk(data)


def test_two_odd_elements_in_an_even_dataset() -> None:
    data = header() + el(PRIVATE_OB, "OB", b"12345") + el(PATIENT_ID, "LO", b"ID1")
    assert len(data) % 2 == 0
    assert walk(data)


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "implicit"])
@pytest.mark.parametrize("undefined", [True, False], ids=["undefined", "defined"])
def test_odd_element_inside_a_sequence_item(explicit: bool, undefined: bool) -> None:
    inner = el(REFERENCED_SOP, "UI", b"1.23", explicit=explicit) + el(PATIENT_ID, "LO", b"ID1", explicit=explicit)
    data = header(explicit) + sq(REFERENCED_IMAGES, [item(inner, undefined=undefined)], undefined=undefined,
                                 explicit=explicit) + el(PRIVATE_OB, "OB", b"1", explicit=explicit)
    assert walk(data, EXPLICIT if explicit else IMPLICIT)
    even = inner.replace(b"ID1", b"ID12").replace(b"\x03\x00ID", b"\x04\x00ID").replace(b"\x03\x00\x00\x00ID",
                                                                                         b"\x04\x00\x00\x00ID")
    fixed = header(explicit) + sq(REFERENCED_IMAGES, [item(even, undefined=undefined)], undefined=undefined,
                                  explicit=explicit) + el(PRIVATE_OB, "OB", b"1", explicit=explicit)
    assert walk(fixed, EXPLICIT if explicit else IMPLICIT)  # the trailing OB of length 1 is still odd
    assert not walk(fixed.replace(b"\x01\x00\x00\x001", b"\x02\x00\x00\x0012"), EXPLICIT if explicit else IMPLICIT)


def test_un_of_undefined_length_holds_implicit_vr() -> None:
    """An explicit UN of undefined length is an Implicit VR sequence (PS3.5 6.2.2): its contents are walked as such,
    and Explicit VR again after its delimiter."""
    inner = el(REFERENCED_SOP, "UI", b"1.2\0", explicit=False)
    un = el(0x00091002, "UN", item(inner, undefined=True) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), length=UNDEFINED)
    assert not walk(header() + un + el(PATIENT_ID, "LO", b"ID12"))
    assert walk(header() + un + el(PATIENT_ID, "LO", b"ID1"))
    odd_inner = el(REFERENCED_SOP, "UI", b"1.2", explicit=False)
    un_odd = el(0x00091002, "UN", item(odd_inner, undefined=True) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0),
                length=UNDEFINED)
    assert walk(header() + un_odd + el(PATIENT_ID, "LO", b"ID12"))


@pytest.mark.parametrize("fragment,odd", [(b"\xff\xd8\x00\xff\xd9\x00", False), (b"\xff\xd8\x00\xff\xd9", True)])
def test_encapsulated_fragments(fragment: bytes, odd: bool) -> None:
    pixels = el(PIXEL_DATA, "OB", item(b"") + item(fragment) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0),
                length=UNDEFINED)
    assert walk(header() + pixels, JPEG_BASELINE) is odd


def test_deflated_and_big_endian_are_not_walked() -> None:
    data = header() + el(PRIVATE_OB, "OB", b"12345") + el(PATIENT_ID, "LO", b"ID1")
    assert not walk(data, "1.2.840.10008.1.2.1.99")
    assert not walk(data, "1.2.840.10008.1.2.2")


def test_the_walk_is_bounded() -> None:
    data = header() + el(PRIVATE_OB, "OB", b"12345") + el(PATIENT_ID, "LO", b"ID1")
    assert not has_odd_length_element(io.BytesIO(data), EXPLICIT, max_elements=2)
    assert has_odd_length_element(io.BytesIO(data), EXPLICIT, max_elements=3)


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "implicit"])
def test_even_dataset_pads_what_the_walk_finds(explicit: bool) -> None:
    ts = EXPLICIT if explicit else IMPLICIT
    inner = el(REFERENCED_SOP, "UI", b"1.23", explicit=explicit) + el(PATIENT_ID, "LO", b"ID1", explicit=explicit)
    data = (header(explicit) + sq(REFERENCED_IMAGES, [item(inner)], explicit=explicit)
            + el(PRIVATE_OB, "OB", b"12345", explicit=explicit) + el(0x00100010, "PN", b"Doe^J", explicit=explicit))
    assert walk(data, ts)
    fixed = even_dataset(data, ts)
    assert len(fixed) % 2 == 0 and not walk(fixed, ts)
    before, after = (read_dataset(io.BytesIO(d), not explicit, True) for d in (data, fixed))
    assert after.Modality == before.Modality == "CT"
    assert after.PatientName == "Doe^J"
    assert after[PRIVATE_OB].value.rstrip(b"\0") == b"12345"
    assert after.ReferencedImageSequence[0].ReferencedSOPInstanceUID == "1.23"
    assert after.ReferencedImageSequence[0].PatientID == "ID1"


def _reference(ds: Dataset) -> bool:
    """pydicom's view: an element, or a fragment of encapsulated Pixel Data, read with an odd length."""
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        length = getattr(raw, "length", 0)
        if tag == PIXEL_DATA and length == UNDEFINED:
            if any(len(f) % 2 for f in generate_fragments(ds[tag].value)):
                return True
            continue
        if length != UNDEFINED and length % 2:
            return True
        elem = ds[tag]
        if elem.VR == "SQ" and any(_reference(i) for i in elem.value):
            return True
    return False


#: pydicom's own sample files (those it ships; listing them with get_testdata_files would try to download more).
SAMPLES = sorted(str(p) for p in (Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm")
                 if p.stat().st_size < 1_000_000)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("path", SAMPLES, ids=[Path(p).name for p in SAMPLES])
def test_agrees_with_pydicom_on_its_samples(path: str) -> None:
    data = Path(path).read_bytes()
    try:
        ds = pydicom.dcmread(path)
        ts = str(ds.file_meta.TransferSyntaxUID)
    except Exception:
        pytest.skip("pydicom cannot read it")
    if ts in ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2") or data[128:132] != b"DICM":
        pytest.skip("not walked")
    offset = dataset_offset(data)
    try:
        expected = _reference(pydicom.dcmread(path)) or (len(data) - offset) % 2 == 1
    except Exception:
        pytest.skip("pydicom cannot decode every element")
    fh = io.BytesIO(data)
    fh.seek(offset)
    assert (has_odd_length_element(fh, ts) or (len(data) - offset) % 2 == 1) == expected
