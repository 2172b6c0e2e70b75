"""Frames read straight from the file equal the frames of the fully loaded object, for every sample."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pydicom.data
import pytest

from bastion.blobs.memory import MemoryBlobStore
from bastion.dicomweb import pixels
from bastion.dicomweb.frame_reader import read_frames
from bastion.model.records import InstanceRecord
from bastion.query.retrieve import Retriever


def _samples() -> list[str]:
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(pydicom.data.get_testdata_files("*.dcm")):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                if "PixelData" in pydicom.dcmread(path) and "TransferSyntaxUID" in ds.file_meta:
                    out.append(path)
            except Exception:
                continue
    return out


SAMPLES = _samples()


@pytest.mark.parametrize("path", SAMPLES, ids=[Path(p).name for p in SAMPLES])
def test_frames_read_straight_from_the_file_match_a_full_load(path: str) -> None:
    data = Path(path).read_bytes()
    blobs = MemoryBlobStore()
    blobs.objects["k"] = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
    ts = str(ds.file_meta.TransferSyntaxUID)
    record = InstanceRecord("1.2", "1.2", "1.2", "1.2", ts, "k", "", len(data))
    retriever = Retriever(None, blobs)  # type: ignore[arg-type]
    count = pixels.number_of_frames(ds)
    numbers = sorted({1, count, (count + 1) // 2})
    for as_stored in (True, False):
        try:
            fast = read_frames(retriever, record, numbers, as_stored=as_stored)
        except Exception as exc:  # the full path must fail the same way
            with pytest.raises(type(exc)):
                pixels.frames(ds, numbers, as_stored=as_stored)
            continue
        if fast is None:
            continue
        assert fast == pixels.frames(ds, numbers, as_stored=as_stored)


def test_the_reader_serves_the_common_layouts() -> None:
    served = 0
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "emri_small.dcm"):
        path = pydicom.data.get_testdata_file(name)
        data = Path(path).read_bytes()
        blobs = MemoryBlobStore()
        blobs.objects["k"] = data
        ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        record = InstanceRecord("1.2", "1.2", "1.2", "1.2", ts, "k", "", len(data))
        served += read_frames(Retriever(None, blobs), record, [1], as_stored=True) is not None  # type: ignore[arg-type]
    assert served == 4
