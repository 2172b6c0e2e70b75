"""The spool reader of the S3 blob store's writer: what the ingest parses an object of more than 8 MiB from."""

from __future__ import annotations

import io
import os
import tempfile

import pydicom
from pydicom.data import get_testdata_file

from bastion.blobs.s3io import FileRange
from bastion.ingest.header import read_header_pydicom


def test_pydicom_parses_a_large_spooled_object_and_reads_its_deferred_values() -> None:
    """pydicom reads a value it deferred (over 64 KiB) by opening an ``io.BufferedReader``'s name again: the
    spool reader has one that opens the spool file (a 32 MB C-STORE to an S3 store was refused without it:
    "'FileRange' object has no attribute 'name'")."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.add_new(0x00091010, "LO", "BASTION TEST")
    ds.add_new(0x00091011, "OB", os.urandom(200_000))  # deferred by the header read
    ds.PixelData = os.urandom(len(ds.PixelData))
    encoded = io.BytesIO()
    ds.save_as(encoded, enforce_file_format=True)
    with tempfile.TemporaryFile() as spool:
        spool.write(encoded.getvalue())
        spool.flush()
        reader = io.BufferedReader(FileRange(os.dup(spool.fileno()), owns=True))
        header = read_header_pydicom(reader, len(encoded.getvalue()))
        reader.close()
    assert header.sop_uid == ds.SOPInstanceUID


def test_a_range_further_in_has_no_name() -> None:
    with tempfile.TemporaryFile() as spool:
        assert getattr(FileRange(spool.fileno(), 10, 5), "name", None) is None
        assert FileRange(spool.fileno()).name == f"/dev/fd/{spool.fileno()}"
