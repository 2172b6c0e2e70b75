"""Objects stored with odd lengths go out over DIMSE as valid encodings (PS3.5 7.1.1, A.5; PS3.8 9.3.5.1).

Real files of three kinds: a private OB element of length 5 (so the dataset has odd length), two of them (a
dataset of even length with odd elements), and a Deflated Explicit VR Little Endian dataset whose deflated
stream has odd length. Both are stored exactly as received
(STOW-RS) and WADO-RS serves those bytes; C-MOVE to DCMTK's storescp and C-GET into DCMTK's getscu, which
refuse an odd-length PDV fragment ("Odd Fragment Length"), receive the same object with even lengths.
"""

from __future__ import annotations

import re
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from conftest import DEST_AET, BastionServer, StoreSCP, dataset_part, make_study, requires_dcmtk, run_dcmtk
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian

pytestmark = [requires_dcmtk, pytest.mark.timeout(180)]

PRIVATE_CREATOR = Tag(0x0009, 0x0010)
PRIVATE_OB = Tag(0x0009, 0x1001)
PRIVATE_OB_2 = Tag(0x0009, 0x1002)
ODD_VALUE = b"\x01\x02\x03\x04\x05"
BOUNDARY = "odd-lengths-boundary"


@dataclass(frozen=True)
class OddObject:
    """A hand-made file whose stored dataset has odd length."""

    path: Path
    study_uid: str
    sop_uid: str


def _base(tmp: Path) -> Dataset:
    """A small valid CT instance (one of ``make_study``'s) to build on."""
    study = make_study(tmp, series=1, per_series=1)
    return pydicom.dcmread(study.files[0])


def odd_ob_object(tmp: Path, tags: tuple[Tag, ...]) -> OddObject:
    """Explicit VR Little Endian with private OBs of 5 bytes: written by pydicom with 6 (it pads), then each
    element's length and value cut to 5 in the file's bytes, as a careless writer would have written them."""
    name = f"ob{len(tags)}"
    ds = _base(tmp / name)
    ds.add_new(PRIVATE_CREATOR, "LO", "BASTION ODD")
    for tag in tags:
        ds.add_new(tag, "OB", ODD_VALUE + b"\xaa")
    path = tmp / f"odd-{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    even = b"OB\x00\x00\x06\x00\x00\x00" + ODD_VALUE + b"\xaa"
    data = path.read_bytes()
    assert data.count(even) == len(tags)
    data = data.replace(even, b"OB\x00\x00\x05\x00\x00\x00" + ODD_VALUE)
    path.write_bytes(data)
    assert all(pydicom.dcmread(path)[tag].value == ODD_VALUE for tag in tags)
    assert len(dataset_part(data)) % 2 == len(tags) % 2, "odd: one odd element; even: two"
    assert b"OB\x00\x00\x05\x00\x00\x00" + ODD_VALUE in data
    return OddObject(path, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))


def odd_deflated_object(tmp: Path) -> OddObject:
    """Deflated Explicit VR Little Endian whose deflated stream has odd length (pydicom would pad it, so the
    stream is made here; the description is varied until its length is odd)."""
    ds = _base(tmp / "deflated")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    for n in range(1, 200):
        ds.SeriesDescription = "DEFLATED " + "X" * n
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, ds)
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        stream = compressor.compress(fp.getvalue()) + compressor.flush()
        if len(stream) % 2:
            break
    else:
        pytest.fail("no odd-length deflated stream found")
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    path = tmp / "odd-deflated.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + meta.getvalue() + stream)
    assert len(dataset_part(path.read_bytes())) % 2 == 1
    check = pydicom.dcmread(path)  # a valid deflated file
    assert check.SeriesDescription == ds.SeriesDescription
    return OddObject(path, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))


def stow(server: BastionServer, path: Path) -> None:
    body = (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes()
            + f"\r\n--{BOUNDARY}--\r\n".encode())
    request = urllib.request.Request(server.url("/dicom-web/studies"), data=body, method="POST", headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
        "Accept": "application/dicom+json"})
    with urllib.request.urlopen(request, timeout=60) as rsp:
        assert rsp.status == 200


@pytest.fixture(scope="module")
def objects(bastion: BastionServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, OddObject]:
    """Both odd files, stored through STOW-RS; the stored bytes are the file's."""
    tmp = tmp_path_factory.mktemp("odd")
    out = {"ob": odd_ob_object(tmp, (PRIVATE_OB,)), "two-ob": odd_ob_object(tmp, (PRIVATE_OB, PRIVATE_OB_2)),
           "deflated": odd_deflated_object(tmp)}
    for obj in out.values():
        stow(bastion, obj.path)
        (stored,) = bastion.blobs_of(obj.sop_uid)
        assert dataset_part(stored.read_bytes()) == dataset_part(obj.path.read_bytes())
    return out


def assert_same_dataset(received: Path, original: Path, odd: str, *, as_sent: bool) -> None:
    """``received`` holds ``original``'s dataset: every element equal, the odd OB padded. ``as_sent``: the
    receiver wrote the dataset's bytes as it received them (storescp ``+B``), so they have even length."""
    data = received.read_bytes()
    if as_sent:
        assert len(dataset_part(data)) % 2 == 0
    got, want = pydicom.dcmread(received), pydicom.dcmread(original)
    assert got.SOPInstanceUID == want.SOPInstanceUID
    assert got.file_meta.MediaStorageSOPInstanceUID == want.SOPInstanceUID
    assert sorted(got.keys()) == sorted(want.keys())
    for tag in want.keys():
        if tag in (PRIVATE_OB, PRIVATE_OB_2):
            assert got[tag].value == ODD_VALUE + b"\x00"  # padded with 00H (PS3.5 7.1.1)
        else:
            assert got[tag].value == want[tag].value, tag
    if odd != "deflated" and as_sent:
        assert data.count(b"OB\x00\x00\x06\x00\x00\x00" + ODD_VALUE + b"\x00") == (2 if odd == "two-ob" else 1)
        assert b"\x05\x00\x00\x00" + ODD_VALUE not in data


def movescu(server: BastionServer, dest: str, study_uid: str) -> str:
    proc = run_dcmtk("movescu", "-v", "-S", "-aem", dest, "-k", "QueryRetrieveLevel=STUDY",
                     "-k", f"StudyInstanceUID={study_uid}", *server.addr(), timeout=90)
    return proc.stdout


@pytest.mark.parametrize("odd", ["ob", "two-ob", "deflated"])
def test_c_move_to_storescp(bastion: BastionServer, storescp: StoreSCP, objects: dict[str, OddObject],
                            odd: str) -> None:
    """The fixture's storescp accepts every syntax (``+xa``): the object goes in its stored syntax, the deflated
    stream padded with one 00H byte (PS3.5 A.5), the odd OB re-encoded padded."""
    obj = objects[odd]
    storescp.clear()
    output = movescu(bastion, DEST_AET, obj.study_uid)
    assert "Received Final Move Response (Success)" in output, output
    (received,) = storescp.files()
    stored_ts = str(pydicom.dcmread(obj.path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    assert str(pydicom.dcmread(received, stop_before_pixels=True).file_meta.TransferSyntaxUID) == stored_ts
    if odd == "deflated":
        assert dataset_part(received.read_bytes()) == dataset_part(obj.path.read_bytes()) + b"\x00"
    assert_same_dataset(received, obj.path, odd, as_sent=True)


@pytest.mark.parametrize("odd", ["ob", "two-ob", "deflated"])
@pytest.mark.parametrize("options", [(), ("+xd",)], ids=["uncompressed", "deflated"])
def test_c_get_into_getscu(bastion: BastionServer, objects: dict[str, OddObject], odd: str,
                           options: tuple[str, ...], tmp_path: Path) -> None:
    """getscu takes uncompressed (the deflated object is inflated and converted) or, with ``+xd``, deflated only
    (the deflated object goes as stored, padded; the odd OB object is re-encoded padded, then deflated)."""
    obj = objects[odd]
    out = tmp_path / "get"
    out.mkdir()
    proc = run_dcmtk("getscu", "-v", "-S", *options, "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                     "-k", f"StudyInstanceUID={obj.study_uid}", *bastion.addr(), timeout=90)
    assert "Received C-GET Response (Success)" in proc.stdout, proc.stdout
    (received,) = list(out.iterdir())
    assert_same_dataset(received, obj.path, odd, as_sent=False)  # getscu writes its own encoding


@pytest.mark.parametrize("odd", ["ob", "two-ob", "deflated"])
def test_wado_rs_serves_the_stored_bytes(bastion: BastionServer, objects: dict[str, OddObject], odd: str) -> None:
    obj = objects[odd]
    request = urllib.request.Request(bastion.url(f"/dicom-web/studies/{obj.study_uid}"), headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    with urllib.request.urlopen(request, timeout=60) as rsp:
        ctype, body = rsp.headers["Content-Type"], rsp.read()
    boundary = re.search(r'boundary="?([^";]+)"?', ctype)
    assert boundary, ctype
    (part,) = [p for p in body.split(b"--" + boundary.group(1).encode())[1:] if not p.startswith(b"--")]
    served = part.partition(b"\r\n\r\n")[2][:-2]
    assert dataset_part(served) == dataset_part(obj.path.read_bytes())
