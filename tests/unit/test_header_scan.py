"""The fast header scan and the pydicom parser agree on every sample object (same Header or same error)."""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import pydicom.data
import pytest

from bastion.errors import BastionError
from bastion.ingest import header as H
from bastion.ingest.scan import NotSimple, scan_header

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import corpus  # noqa: E402

SAMPLES = sorted(pydicom.data.get_testdata_files("*.dcm"))


def _outcome(fn, data: bytes):  # type: ignore[no-untyped-def]
    try:
        return fn(data)
    except BastionError as exc:
        return (type(exc).__name__, exc.message)


def _fast(data: bytes):  # type: ignore[no-untyped-def]
    return H.read_header(io.BytesIO(data))


def _slow(data: bytes):  # type: ignore[no-untyped-def]
    return H.read_header_pydicom(io.BytesIO(data), len(data))


def _generated(tmp: Path) -> list[bytes]:
    out = []
    for kind in ("small", "ct"):
        ds = corpus.make_instance(corpus.KINDS[kind], 3, 10)
        path = tmp / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path.read_bytes())
    return out


@pytest.mark.parametrize("path", SAMPLES, ids=[Path(p).name for p in SAMPLES])
def test_scan_agrees_with_pydicom(path: str) -> None:
    data = Path(path).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _outcome(_fast, data) == _outcome(_slow, data)


def test_scan_agrees_on_generated_and_truncated_objects(tmp_path: Path) -> None:
    for data in _generated(tmp_path):
        assert _outcome(_fast, data) == _outcome(_slow, data)
        for cut in (len(data) - 1, len(data) // 2, 1000, 200):
            assert _outcome(_fast, data[:cut]) == _outcome(_slow, data[:cut])


def test_the_common_case_takes_the_fast_path(tmp_path: Path) -> None:
    small, ct = _generated(tmp_path)
    for data in (small, ct):
        found = scan_header(data[: 256 * 1024], H._WANTED)
        assert found.pixel_data_offset is not None
        H._from_scan(found)  # no NotSimple


def test_deflated_objects_are_not_scanned() -> None:
    data = Path(pydicom.data.get_testdata_file("image_dfl.dcm")).read_bytes()
    with pytest.raises(NotSimple):
        scan_header(data, H._WANTED)


def _damaged(tmp_path: Path) -> dict[str, bytes]:
    """Objects pydicom reads up to an element it cannot decode, which it raises only when that element is read
    (found by tests/integration/test_api_fuzz.py: they escaped as a traceback in the log)."""
    small = _generated(tmp_path)[0]
    sop_uid = b"\x08\x00\x18\x00UI"  # (0008,0018) SOP Instance UID, explicit VR
    at = small.index(sop_uid)
    unknown_vr = small[:at + 4] + b"U\x27" + small[at + 6:]
    group_length = small.index(b"\x02\x00\x00\x00UL\x04\x00")  # (0002,0000) File Meta Information Group Length
    odd_length = small[:group_length + 6] + b"\x03\x00" + small[group_length + 8:]
    return {"unknown VR": unknown_vr, "odd length": odd_length}


@pytest.mark.parametrize("damage", ["unknown VR", "odd length"])
def test_an_element_pydicom_cannot_decode_makes_the_object_invalid(tmp_path: Path, damage: str) -> None:
    data = _damaged(tmp_path)[damage]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for read in (_fast, _slow):
            with pytest.raises(BastionError):  # InvalidObject: the store answers 0xC000, and logs one line
                read(data)


def test_instances_of_one_series_share_its_level_dicts_and_a_change_makes_new_ones(tmp_path: Path) -> None:
    """``_cscan.levels`` hands the next instance of a series the previous one's patient, study and series dicts,
    as read-only views: no instance can change another's; an attribute that differs, or an element that comes or
    goes, makes a new dict, equal to what pydicom makes of the same object."""
    if H.SPEEDUPS is None:
        pytest.skip("the C scan is not built")

    def instance(number: int, **changes: str) -> bytes:
        ds = corpus.make_instance(corpus.KINDS["small"], number, 1000)  # one series
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        path = tmp_path / f"{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path.read_bytes()

    first, second = _fast(instance(1)), _fast(instance(2))
    for level in (H.QueryLevel.PATIENT, H.QueryLevel.STUDY, H.QueryLevel.SERIES):
        assert second.attrs[level] is first.attrs[level]
        with pytest.raises(TypeError):
            second.attrs[level]["00081030"] = {"vr": "LO", "Value": ["CHANGED"]}
    assert second.attrs[H.QueryLevel.IMAGE] is not first.attrs[H.QueryLevel.IMAGE]

    described = instance(3, StudyDescription="ANOTHER")
    third = _fast(described)
    assert third.attrs[H.QueryLevel.STUDY] is not first.attrs[H.QueryLevel.STUDY]
    assert third.attrs[H.QueryLevel.STUDY]["00081030"] == {"vr": "LO", "Value": ["ANOTHER"]}
    assert third.attrs[H.QueryLevel.PATIENT] is first.attrs[H.QueryLevel.PATIENT]
    assert third == _slow(described)

    added = instance(4, StudyDescription="ANOTHER", InstitutionName="ELSEWHERE")  # an element more
    fourth = _fast(added)
    assert fourth.attrs[H.QueryLevel.STUDY]["00080080"] == {"vr": "LO", "Value": ["ELSEWHERE"]}
    assert fourth == _slow(added)
    assert _fast(instance(5)).attrs[H.QueryLevel.STUDY] == first.attrs[H.QueryLevel.STUDY]  # and back


def test_series_stored_at_once_each_keep_their_level_dicts(tmp_path: Path) -> None:
    """Associations storing different series take turns on one event loop: each series still finds its own
    patient, study and series dicts of a few instances before (``LEVEL_WAYS`` per level in ``_cscan.c``)."""
    if H.SPEEDUPS is None:
        pytest.skip("the C scan is not built")

    def instance(number: int) -> bytes:  # the corpus gives every few instances a patient, study and series
        path = tmp_path / f"{number}.dcm"
        corpus.make_instance(corpus.KINDS["small"], number, 1000).save_as(path, enforce_file_format=True)
        return path.read_bytes()

    quarters = [0, 250, 500, 750]  # four associations' first instances: four series of four patients
    first = [_fast(instance(q)) for q in quarters]
    assert len({id(h.attrs[H.QueryLevel.SERIES]) for h in first}) == 4
    for q, before in zip(quarters, first, strict=True):
        raw = instance(q + 1)
        after = _fast(raw)
        assert after.attrs[H.QueryLevel.SERIES]["0020000E"] == before.attrs[H.QueryLevel.SERIES]["0020000E"]
        for level in (H.QueryLevel.PATIENT, H.QueryLevel.STUDY, H.QueryLevel.SERIES):
            assert after.attrs[level] is before.attrs[level], (q, level)
        assert after == _slow(raw)


@pytest.mark.parametrize("comment_bytes", [100, 16 * 1024 - 900, 16 * 1024, 40_000])
def test_a_header_longer_than_the_first_block_is_scanned_from_the_larger_one(
        tmp_path: Path, comment_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan reads 16 KB first, then 256 KB if the Pixel Data was not in them: a header of any size up to
    that is still read without pydicom, and gives what pydicom gives."""
    ds = corpus.make_instance(corpus.KINDS["ct"], 7, 1000)
    ds.ImageComments = "x" * comment_bytes  # LT, level IMAGE: before the Pixel Data, in the index's attributes
    path = tmp_path / "long.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()

    def no_pydicom(fp, size):  # type: ignore[no-untyped-def]
        raise AssertionError("the header went to pydicom")

    fast = _fast(data)
    assert fast.attrs[H.QueryLevel.IMAGE]["00204000"] == {"vr": "LT", "Value": ["x" * comment_bytes]}
    assert fast == _slow(data)
    monkeypatch.setattr(H, "read_header_pydicom", no_pydicom)
    assert _fast(data) == fast
