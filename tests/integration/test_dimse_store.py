"""C-ECHO and C-STORE against a running Bastion, driven by DCMTK and by pynetdicom (PS3.4 A, B)."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pydicom
import pytest
from conftest import BastionServer, dataset_part, make_study, requires_dcmtk, transfer_syntax_of, unavailable
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification

pytestmark = [requires_dcmtk, pytest.mark.timeout(90)]

#: pydicom's compressed / special samples, sent as stored with dcmsend.
STORED_AS_IS = [
    "JPEG2000.dcm",  # JPEG 2000
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "SC_rgb_rle.dcm",  # RLE, colour
    "MR_small_RLE.dcm",  # RLE
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1, colour
    "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG lossless SV1
    "emri_small.dcm",  # multi-frame, explicit VR LE
    "image_dfl.dcm",  # deflated explicit VR LE
]


def _sample(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        unavailable(f"pydicom sample {name} not available (pydicom-data missing?)")
    return str(path)


def _snapshot(server: BastionServer) -> tuple[int, int, list[Path]]:
    st = server.stats()
    return st["instances"], st["versions"], server.blob_files()


def _assert_nothing_stored(server: BastionServer, before: tuple[int, int, list[Path]]) -> None:
    assert _snapshot(server) == before, "a rejected object changed the archive"
    assert server.spool_files() == [], "a rejected object left spool files"


def _assert_still_serves(server: BastionServer) -> None:
    echo = server.echo()
    assert echo.returncode == 0 and "Received Echo Response (Success)" in echo.stdout, echo.stdout


def _values(ds: Dataset) -> dict[int, object]:
    """Top-level element values (VR left aside), without Data Set Trailing Padding."""
    return {int(el.tag): el.value for el in ds if el.tag != 0xFFFCFFFC}


def _dataset_bytes(ds: Dataset, implicit: bool = False) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def raw_c_store(server: BastionServer, payload: bytes, *, sop_class: str, sop_uid: str,
                transfer_syntax: str = ExplicitVRLittleEndian) -> int:
    """Send one C-STORE whose command UIDs and dataset bytes are chosen freely; return its status.

    pynetdicom's ``send_c_store`` takes the UIDs from the dataset and encodes it itself, so the
    request primitive is built here and sent through the association's DIMSE provider, exactly as
    ``send_c_store`` does internally.
    """
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(sop_class, transfer_syntax)
    assoc = ae.associate(server.host, server.dicom_port, ae_title=server.aet)
    assert assoc.is_established
    try:
        context = assoc.accepted_contexts[0]
        req = C_STORE()
        req.MessageID = 1
        req.Priority = 2
        req.AffectedSOPClassUID = sop_class
        req.AffectedSOPInstanceUID = sop_uid
        req.DataSet = io.BytesIO(payload)
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        assoc.dimse.send_msg(req, context.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert rsp is not None, "no C-STORE response"
        return int(rsp.Status)
    finally:
        assoc.release()
        ae.shutdown()


# -- C-ECHO ----------------------------------------------------------------------------------------
def test_echo(bastion: BastionServer) -> None:
    _assert_still_serves(bastion)


# -- uncompressed ----------------------------------------------------------------------------------
def test_storescu_generated_study_is_stored_byte_identical(bastion: BastionServer, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", series=2, per_series=3)
    before = bastion.stats()
    proc = bastion.storescu(*study.files)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.count("Received Store Response (Success)") == len(study.files)
    after = bastion.stats()
    assert after["instances"] - before["instances"] == len(study.files)
    assert after["studies"] - before["studies"] == 1
    assert after["series"] - before["series"] == 2
    for path in study.files:
        sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        blobs = bastion.blobs_of(sop)
        assert len(blobs) == 1, sop
        assert dataset_part(blobs[0].read_bytes()) == dataset_part(path.read_bytes())
        assert transfer_syntax_of(blobs[0]) == ExplicitVRLittleEndian
        stored = pydicom.dcmread(blobs[0], stop_before_pixels=True)
        assert stored.file_meta.MediaStorageSOPInstanceUID == sop
        assert stored.file_meta.get("SourceApplicationEntityTitle", "").strip() == "STORESCU"


def test_storescu_implicit_vr_is_kept(bastion: BastionServer, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", series=1, per_series=1)
    proc = bastion.storescu(*study.files, options=["-xi"])  # propose implicit VR only
    assert proc.returncode == 0 and "Received Store Response (Success)" in proc.stdout, proc.stdout
    blob = bastion.blobs_of(study.sop_uids[0])[0]
    assert transfer_syntax_of(blob) == ImplicitVRLittleEndian
    original = pydicom.dcmread(study.files[0])
    assert dataset_part(blob.read_bytes()) == _dataset_bytes(original, implicit=True)


# -- compressed and special syntaxes, stored as received ---------------------------------------------
@pytest.mark.parametrize("name", STORED_AS_IS)
def test_dcmsend_stores_in_the_sent_transfer_syntax(bastion: BastionServer, name: str) -> None:
    path = _sample(name)
    original = pydicom.dcmread(path)
    sop, ts = str(original.SOPInstanceUID), str(original.file_meta.TransferSyntaxUID)
    proc = bastion.dcmsend(path)
    assert proc.returncode == 0, proc.stdout
    assert "with status SUCCESS  : 1" in proc.stdout, proc.stdout
    blob = bastion.blobs_of(sop)[-1]  # several samples share a SOP Instance UID: the newest version
    assert transfer_syntax_of(blob) == ts
    stored = pydicom.dcmread(blob)
    # DCMTK re-encodes on the wire (sequence lengths, Pixel Data VR, drops trailing padding), so
    # compare values here and bytes in the test below, where the exact bytes sent are known.
    assert _values(stored) == _values(original)


@pytest.mark.parametrize("name", STORED_AS_IS)
def test_received_dataset_bytes_are_stored_unchanged(bastion: BastionServer, name: str) -> None:
    path = _sample(name)
    meta = pydicom.dcmread(path, stop_before_pixels=True)
    sent = dataset_part(Path(path).read_bytes())
    status = raw_c_store(bastion, sent, sop_class=str(meta.SOPClassUID), sop_uid=str(meta.SOPInstanceUID),
                         transfer_syntax=str(meta.file_meta.TransferSyntaxUID))
    assert status == 0x0000, f"0x{status:04X}"
    blob = bastion.blobs_of(str(meta.SOPInstanceUID))[-1]
    assert transfer_syntax_of(blob) == str(meta.file_meta.TransferSyntaxUID)
    assert dataset_part(blob.read_bytes()) == sent


def test_htj2k_stored_as_received(bastion: BastionServer) -> None:
    from pydicom.data import get_testdata_files

    files = get_testdata_files("*htj2k*")
    if not files:
        pytest.skip("this pydicom ships no HTJ2K sample (nothing installable here encodes one)")
    path = files[0]
    proc = bastion.dcmsend(path)
    assert "with status SUCCESS  : 1" in proc.stdout, proc.stdout


def test_object_without_study_uid_is_rejected(bastion: BastionServer) -> None:
    path = _sample("JPEGLSNearLossless_16.dcm")
    assert "StudyInstanceUID" not in pydicom.dcmread(path, stop_before_pixels=True)
    before = _snapshot(bastion)
    proc = bastion.dcmsend(path)
    assert "Received C-STORE Response (Error: CannotUnderstand)" in proc.stdout, proc.stdout
    assert "with status ERROR    : 1" in proc.stdout
    _assert_nothing_stored(bastion, before)
    assert "StudyInstanceUID is missing" in bastion.log()
    assert any("StudyInstanceUID" in e["message"] for e in bastion.stats()["last_errors"])
    _assert_still_serves(bastion)


# -- duplicates and new versions ------------------------------------------------------------------------
def test_same_file_twice_is_stored_once(bastion: BastionServer, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", series=1, per_series=1)
    before = bastion.stats()
    proc = bastion.storescu(study.files[0], study.files[0])
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.count("Received Store Response (Success)") == 2
    after = bastion.stats()
    assert after["instances"] - before["instances"] == 1
    assert after["versions"] == before["versions"]
    assert len(bastion.blobs_of(study.sop_uids[0])) == 1
    # And once more on a new association.
    proc = bastion.storescu(study.files[0])
    assert "Received Store Response (Success)" in proc.stdout
    assert bastion.stats()["instances"] == after["instances"]
    assert len(bastion.blobs_of(study.sop_uids[0])) == 1


def test_changed_file_with_same_sop_uid_supersedes(bastion: BastionServer, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", series=1, per_series=1)
    proc = bastion.storescu(study.files[0])
    assert "Received Store Response (Success)" in proc.stdout, proc.stdout
    before = bastion.stats()
    ds = pydicom.dcmread(study.files[0])
    ds.StudyDescription = "CORRECTED DESCRIPTION"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed, enforce_file_format=True)
    proc = bastion.storescu(changed)
    assert proc.returncode == 0 and "Received Store Response (Success)" in proc.stdout, proc.stdout
    after = bastion.stats()
    assert after["instances"] == before["instances"]
    assert after["versions"] - before["versions"] == 1
    old, new = bastion.blobs_of(study.sop_uids[0])
    assert dataset_part(old.read_bytes()) == dataset_part(study.files[0].read_bytes())
    assert dataset_part(new.read_bytes()) == dataset_part(changed.read_bytes())


# -- bad input ------------------------------------------------------------------------------------------
def _valid_dataset(tmp_path: Path) -> Dataset:
    study = make_study(tmp_path / "bad", series=1, per_series=1)
    return pydicom.dcmread(study.files[0])


def _check_rejected(server: BastionServer, status: int, expected: int, before: tuple[int, int, list[Path]],
                    log_fragment: str, errors_before: int) -> None:
    assert status == expected, f"status 0x{status:04X}, expected 0x{expected:04X}"
    _assert_nothing_stored(server, before)
    log = server.log()
    assert "rejected object from dimse:RAWSCU" in log and log_fragment in log, log[-2000:]
    assert server.stats()["ingest"]["rejected"] > errors_before
    _assert_still_serves(server)


def test_garbage_dataset_is_rejected(bastion: BastionServer) -> None:
    before, errors = _snapshot(bastion), bastion.stats()["ingest"]["rejected"]
    garbage = os.urandom(4096)
    status = raw_c_store(bastion, garbage, sop_class=CTImageStorage, sop_uid=generate_uid())
    _check_rejected(bastion, status, 0xC000, before, "rejected object", errors)


def test_truncated_dataset_is_rejected(bastion: BastionServer, tmp_path: Path) -> None:
    ds = _valid_dataset(tmp_path)
    body = _dataset_bytes(ds)
    truncated = body[: len(body) - 1000]  # cut inside Pixel Data
    before, errors = _snapshot(bastion), bastion.stats()["ingest"]["rejected"]
    status = raw_c_store(bastion, truncated, sop_class=CTImageStorage, sop_uid=str(ds.SOPInstanceUID))
    _check_rejected(bastion, status, 0xC000, before, "truncated", errors)
    assert bastion.blobs_of(str(ds.SOPInstanceUID)) == []


def test_dataset_without_sop_instance_uid_is_rejected(bastion: BastionServer, tmp_path: Path) -> None:
    ds = _valid_dataset(tmp_path)
    sop = str(ds.SOPInstanceUID)
    del ds.SOPInstanceUID
    before, errors = _snapshot(bastion), bastion.stats()["ingest"]["rejected"]
    status = raw_c_store(bastion, _dataset_bytes(ds), sop_class=CTImageStorage, sop_uid=sop)
    _check_rejected(bastion, status, 0xC000, before, "SOPInstanceUID is missing", errors)


def test_dataset_sop_uid_differing_from_command_is_rejected(bastion: BastionServer, tmp_path: Path) -> None:
    ds = _valid_dataset(tmp_path)
    other = generate_uid()
    before, errors = _snapshot(bastion), bastion.stats()["ingest"]["rejected"]
    status = raw_c_store(bastion, _dataset_bytes(ds), sop_class=CTImageStorage, sop_uid=other)
    _check_rejected(bastion, status, 0xA900, before, other, errors)
    assert bastion.blobs_of(str(ds.SOPInstanceUID)) == [] and bastion.blobs_of(other) == []


def test_unknown_transfer_syntax_context_is_rejected(bastion: BastionServer) -> None:
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.4.999"])
    assoc = ae.associate(bastion.host, bastion.dicom_port, ae_title=bastion.aet)
    try:
        assert assoc.is_established
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [Verification]
        rejected = [cx for cx in assoc.rejected_contexts if cx.abstract_syntax == CTImageStorage]
        assert len(rejected) == 1
        assert rejected[0].result == 0x04  # transfer syntaxes not supported (PS3.8 9.3.3.2)
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
        ae.shutdown()


def test_only_unknown_transfer_syntax_association_is_rejected(bastion: BastionServer) -> None:
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.4.999"])
    assoc = ae.associate(bastion.host, bastion.dicom_port, ae_title=bastion.aet)
    try:
        assert not assoc.is_established
        assert assoc.is_rejected or assoc.is_aborted
    finally:
        ae.shutdown()
    _assert_still_serves(bastion)


def test_dataset_sop_class_differing_from_command_is_rejected(bastion: BastionServer, tmp_path: Path) -> None:
    ds = _valid_dataset(tmp_path)  # a CT image, sent as MR Image Storage
    before, errors = _snapshot(bastion), bastion.stats()["ingest"]["rejected"]
    status = raw_c_store(bastion, _dataset_bytes(ds), sop_class=MRImageStorage, sop_uid=str(ds.SOPInstanceUID))
    _check_rejected(bastion, status, 0xA900, before, MRImageStorage, errors)
