"""The de-identification profile on pydicom's own sample files, and the secret it is keyed with."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from bastion.query.deid_profile import Action, action_for, basic_profile
from bastion.query.deidentify import SECRET_FILE, Deidentifier, load_secret
from bastion.query.export import burned_in_reason

KEY = bytes(range(32))


def _sample(name: str) -> Dataset:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom sample {name} not available")
    return pydicom.dcmread(path)


def test_table_has_the_rows_everyone_knows() -> None:
    table = basic_profile()
    assert len(table) > 500
    assert table[0x00100010] is Action.Z  # Patient's Name
    assert table[0x00080018] is Action.U  # SOP Instance UID
    assert table[0x00081155] is Action.U  # Referenced SOP Instance UID
    assert table[0x00204000] is Action.X  # Image Comments
    assert action_for(0x50001234) is Action.X and action_for(0x60224000) is Action.X  # curves, overlay comments
    assert action_for(0x00080016) is None  # SOP Class UID: kept


def test_uids_pseudonyms_and_shifts_are_keyed_and_stable() -> None:
    d, other = Deidentifier(KEY), Deidentifier(bytes(reversed(KEY)))
    uid = d.uid("1.2.840.113619.2.1.1.1")
    assert uid.startswith("2.25.") and len(uid) <= 64 and uid == d.uid("1.2.840.113619.2.1.1.1")
    assert uid != other.uid("1.2.840.113619.2.1.1.1")
    assert d.pseudonym("X") == d.pseudonym(" X ") != other.pseudonym("X")
    assert 1 <= d.shift_days("X") <= 3650
    with pytest.raises(ValueError):
        Deidentifier(b"short")


def test_source_is_left_alone_and_every_level_is_cleaned() -> None:
    ds = _sample("rtplan.dcm")
    ds.AcquisitionDateTime = "20200102235959.5+0100"
    ds.add_new(0x00080012, "DA", "2020")  # Instance Creation Date, not a whole date: emptied
    ds.FailedSOPInstanceUIDList = ["1.2.3.4", "1.2.3.5"]
    inner = Dataset()
    inner.ReferencedSOPClassUID, inner.ReferencedSOPInstanceUID = ds.SOPClassUID, "1.2.3.6"
    inner.PatientName = "Nested^Name"
    deeper = Dataset()
    deeper.ReferencedSOPInstanceUID = "1.2.3.7"
    deeper.add_new(0x00991010, "LO", "deep private")
    inner.ReferencedImageSequence = Sequence([deeper])
    ds.ReferencedImageSequence = Sequence([inner])
    before = ds.to_json_dict()
    d = Deidentifier(KEY)
    out = d.apply(ds)
    assert ds.to_json_dict() == before, "apply changed its input"
    days = d.shift_days(str(ds.PatientID))
    assert out.AcquisitionDateTime.endswith("235959.5+0100") and out.AcquisitionDateTime != ds.AcquisitionDateTime
    assert out.InstanceCreationDate == ""
    assert list(out.FailedSOPInstanceUIDList) == [d.uid("1.2.3.4"), d.uid("1.2.3.5")]
    ref = out.ReferencedImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == d.uid("1.2.3.6")
    assert ref.ReferencedImageSequence[0].ReferencedSOPInstanceUID == d.uid("1.2.3.7")
    assert ref.PatientName in ("", None)  # a nested name is emptied (Z), not kept
    assert not any(e.tag.is_private for e in out.iterall())
    assert out.RTPlanDate != ds.RTPlanDate and len(out.RTPlanDate) == 8
    import datetime as dt

    shifted = dt.datetime.strptime(ds.RTPlanDate, "%Y%m%d") - dt.datetime.strptime(out.RTPlanDate, "%Y%m%d")
    assert shifted.days == days
    assert out.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID == d.uid(str(ds.SOPInstanceUID))


def test_compressed_pixel_data_are_written_as_stored(tmp_path: Path) -> None:
    ds = _sample("US1_J2KR.dcm")
    out = Deidentifier(KEY).apply(ds)
    path = tmp_path / "x.dcm"
    out.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.PixelData == ds.PixelData and back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID


def test_burned_in_reasons() -> None:
    assert burned_in_reason(_sample("CT_small.dcm")) is None
    assert burned_in_reason(_sample("US1_J2KR.dcm")) == "modality US without Burned In Annotation NO"
    sc = _sample("SC_rgb.dcm")
    assert burned_in_reason(sc) is not None
    sc.BurnedInAnnotation = "NO"
    assert burned_in_reason(sc) is None
    ct = _sample("CT_small.dcm")
    ct.BurnedInAnnotation = "YES"
    assert burned_in_reason(ct) == "Burned In Annotation is YES"


def test_secret_is_made_once_private_and_checked(tmp_path: Path) -> None:
    first = load_secret(tmp_path)
    assert len(first) == 32 and load_secret(tmp_path) == first
    assert stat.S_IMODE(os.stat(tmp_path / SECRET_FILE).st_mode) == 0o600
    (tmp_path / SECRET_FILE).write_text("not hex\n")
    with pytest.raises(ValueError, match="de-identification secret"):
        load_secret(tmp_path)


def test_zip_stream_sends_each_member_before_reading_the_next() -> None:
    import io
    import zipfile

    from bastion.query.export import REPORT_NAME, ExportEntry, ExportReport, zip_stream

    produced: list[int] = []

    def entries() -> Iterator[ExportEntry]:
        for i in range(3):
            produced.append(i)
            yield ExportEntry(f"p/s/{i}.dcm", os.urandom(5000))

    stream = zip_stream(entries(), ExportReport(deidentified=False, include_burned_in=True))
    first = next(stream)
    assert produced == [0] and first.startswith(b"PK\x03\x04") and len(first) > 5000
    with zipfile.ZipFile(io.BytesIO(first + b"".join(stream))) as zf:
        assert zf.testzip() is None and zf.namelist() == ["p/s/0.dcm", "p/s/1.dcm", "p/s/2.dcm", REPORT_NAME]
