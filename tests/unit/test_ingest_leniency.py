"""What ingest accepts, accepts with a warning and refuses: storage SOP classes at negotiation (PS3.4 B, PS3.8
9.3.3), UIDs breaking PS3.5 9.1, a File Meta naming another SOP instance, and the bound on sequence nesting."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom._uid_dict import UID_dictionary
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from bastion.dimse.negotiation import RESULT_ABSTRACT_SYNTAX, RESULT_ACCEPT, negotiate
from bastion.dimse.pdu import AssociateRQ, PresentationContext, RoleSelection
from bastion.errors import InvalidObject, InvalidUID, MissingAttribute
from bastion.ingest.header import META_SOP_MISMATCH, read_header, read_header_pydicom
from bastion.ingest.nesting import MAX_SEQUENCE_DEPTH, dataset_nested_too_deep, raw_nested_too_deep
from bastion.model.part10 import dataset_offset
from bastion.model.records import object_key, parse_object_key
from bastion.model.uids import is_identifiable_uid, is_storage_sop_class, is_valid_uid

PHILIPS_MR_SERIES = "1.3.46.670589.11.0.0.12.1"
PHILIPS_MR_SERIES_2 = "1.3.46.670589.11.0.0.12.2"
SIEMENS_CSA = "1.3.12.2.1107.5.9.1"
HARDCOPY_GRAYSCALE = "1.2.840.10008.5.1.1.29"
STANDALONE_OVERLAY = "1.2.840.10008.5.1.4.1.1.8"
CT = "1.2.840.10008.5.1.4.1.1.2"
MWL = "1.2.840.10008.5.1.4.31"
LONG_UID = "1.2.826.0.1.3680043.8.498." + "1234567890" * 4 + "123"  # 69 characters


# -- which abstract syntaxes are storage ---------------------------------------------------------------------
@pytest.mark.parametrize("uid", [PHILIPS_MR_SERIES, PHILIPS_MR_SERIES_2, SIEMENS_CSA, HARDCOPY_GRAYSCALE,
                                 STANDALONE_OVERLAY, CT, "1.2.840.10008.5.1.1.27", "1.2.840.10008.5.1.4.38.1"])
def test_private_retired_and_standard_storage_classes_are_storage(uid: str) -> None:
    assert is_storage_sop_class(uid)


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.1", MWL, "1.2.840.10008.3.1.2.3.3", "1.2.840.10008.1.20.1",
                                 "1.2.840.10008.5.1.1.9", "1.2.840.10008.5.1.4.1.2.2.3",
                                 "1.2.840.10008.5.1.4.38.2", "1.2.840.10008.5.1.4.34.6.1", ""])
def test_services_are_not_storage(uid: str) -> None:
    assert not is_storage_sop_class(uid)


def test_every_sop_class_of_ps3_6_is_classified_by_its_name() -> None:
    """pydicom's copy of PS3.6 Annex A: a SOP class named "... Storage" (not Storage Commitment) is storage, any
    other is a service; every transfer syntax is a service too (never proposed as storage)."""
    wrong = []
    for uid, (name, kind, *_) in UID_dictionary.items():
        if kind in ("SOP Class", "Meta SOP Class"):
            storage = ("Storage" in name and "Storage Commitment" not in name) or name == ""  # two retired storage
            if is_storage_sop_class(uid) != storage:
                wrong.append((uid, name))
        elif kind == "Transfer Syntax" and is_storage_sop_class(uid):
            wrong.append((uid, name))
    assert wrong == []


def _rq(*abstract_syntaxes: str, roles: tuple[str, ...] = ()) -> AssociateRQ:
    contexts = [PresentationContext(2 * i + 1, a, [ExplicitVRLittleEndian]) for i, a in enumerate(abstract_syntaxes)]
    return AssociateRQ("BASTION", "SCU", contexts, roles=[RoleSelection(r, True, True) for r in roles])


def test_negotiation_accepts_private_storage_and_echoes_its_role() -> None:
    answered, roles, accepted = negotiate(_rq(PHILIPS_MR_SERIES, SIEMENS_CSA, MWL,
                                              roles=(PHILIPS_MR_SERIES, SIEMENS_CSA, MWL)))
    assert [pc.result for pc in answered] == [RESULT_ACCEPT, RESULT_ACCEPT, RESULT_ABSTRACT_SYNTAX]
    assert {r.sop_class for r in roles} == {PHILIPS_MR_SERIES, SIEMENS_CSA}  # no role for a service
    assert all(c.scp_role for c in accepted.values())  # C-GET may send these classes back


def test_negotiation_refuses_a_denied_class_and_its_role() -> None:
    answered, roles, accepted = negotiate(_rq(PHILIPS_MR_SERIES, CT, roles=(PHILIPS_MR_SERIES, CT)),
                                          (PHILIPS_MR_SERIES,))
    assert [pc.result for pc in answered] == [RESULT_ABSTRACT_SYNTAX, RESULT_ACCEPT]
    assert [r.sop_class for r in roles] == [CT]
    assert [c.abstract_syntax for c in accepted.values()] == [CT]


# -- UIDs -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("uid", ["1.2.03.4", "00.1", LONG_UID, "1." + "2" * 126])
def test_uids_breaking_ps3_5_but_identifying_an_object(uid: str) -> None:
    assert is_identifiable_uid(uid) and not is_valid_uid(uid)


@pytest.mark.parametrize("uid", ["", "1..2", ".1", "1.", "1.2.a", "1.2 .3", "1." + "2" * 127, "1.2\\3"])
def test_uids_that_identify_nothing(uid: str) -> None:
    assert not is_identifiable_uid(uid)


@pytest.mark.parametrize("uid", ["1.2.03.4", LONG_UID, "1." + "2" * 126])
def test_blob_key_holds_a_long_or_leading_zero_uid(uid: str) -> None:
    key = object_key(uid, "01796581348396388344", "b3-" + "0" * 64)
    parts = parse_object_key(key)
    assert parts is not None and parts["sop"] == uid
    assert len(key.rsplit("/", 1)[1]) < 255  # a file name


# -- warnings from the header ---------------------------------------------------------------------------------
def _part10(ds: Dataset, *, implicit: bool = False, meta_sop: str | None = None) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = meta_sop or ds.SOPInstanceUID
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, implicit
    write_dataset(body, ds)
    return out.getvalue() + body.getvalue()


def _dataset(sop_uid: str, **uids: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = uids.get("sop_class", CT)
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = uids.get("study", generate_uid())
    ds.SeriesInstanceUID = uids.get("series", generate_uid())
    ds.PatientID = "LENIENT"
    return ds


def _both(data: bytes) -> list[object]:
    """What the scan and pydicom make of ``data``: the Header's UIDs and warnings, or the error's class."""
    out: list[object] = []
    for read in (lambda: read_header(io.BytesIO(data)), lambda: read_header_pydicom(io.BytesIO(data), len(data))):
        try:
            h = read()
            out.append((h.sop_uid, h.study_uid, h.warnings))
        except InvalidObject as exc:
            out.append(type(exc))
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("implicit", [False, True])
def test_leading_zero_and_long_uids_are_accepted_with_warnings(implicit: bool) -> None:
    study = "1.2.826.0.1.3680043.8.498.07"
    data = _part10(_dataset(LONG_UID, study=study), implicit=implicit)
    expected = (LONG_UID, study, ("SOPInstanceUID is longer than 64 characters (PS3.5 9.1)",
                                  "StudyInstanceUID has a component with a leading zero (PS3.5 9.1)"))
    assert _both(data) == [expected, expected]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("sop", "error"), [("", MissingAttribute), ("1..2", InvalidUID), ("1.2.x", InvalidUID),
                                            ("1." + "2" * 127, InvalidUID)])
def test_an_object_that_cannot_be_identified_is_refused(sop: str, error: type) -> None:
    data = _part10(_dataset(sop), meta_sop="1.2.3")
    assert _both(data) == [error, error]


def test_file_meta_naming_another_instance_is_a_warning_and_the_dataset_identifies() -> None:
    path = get_testdata_file("rtdose.dcm")
    assert path is not None
    data = Path(path).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID  # the sample's own defect
    header = read_header(io.BytesIO(data))
    assert header.sop_uid == ds.SOPInstanceUID and header.warnings == (META_SOP_MISMATCH,)


def test_a_conformant_object_has_no_warnings() -> None:
    assert _both(_part10(_dataset(generate_uid())))[0][2] == ()  # type: ignore[index]


# -- nesting --------------------------------------------------------------------------------------------------
def nested_dataset(depth: int, *, implicit: bool = False, defined: bool = False) -> tuple[bytes, str]:
    """A Part 10 object with ``depth`` levels of ContentSequence (0040,A730), written by hand (pydicom's writer
    recurses): undefined lengths with delimiters, or defined lengths computed inside out. Returns it and its
    SOP Instance UID."""
    sop = generate_uid()
    head = _part10(_dataset(sop), implicit=implicit)
    if defined:
        inner = b""
        for _ in range(depth):
            item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
            if implicit:
                inner = struct.pack("<HHI", 0x0040, 0xA730, len(item)) + item
            else:
                inner = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, len(item)) + item
        return head + inner, sop
    seq = (struct.pack("<HHI", 0x0040, 0xA730, 0xFFFFFFFF) if implicit
           else struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF))
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return head + (seq + item) * depth + end * depth, sop


ENCODINGS = [(False, False), (False, True), (True, False), (True, True)]


@pytest.mark.parametrize(("implicit", "defined"), ENCODINGS)
def test_nesting_up_to_the_bound_is_stored_and_beyond_it_refused(implicit: bool, defined: bool) -> None:
    ok, sop = nested_dataset(MAX_SEQUENCE_DEPTH, implicit=implicit, defined=defined)
    assert [r[0] for r in _both(ok)] == [sop, sop]  # type: ignore[index]
    for depth in (MAX_SEQUENCE_DEPTH + 1, 1000):
        deep, _ = nested_dataset(depth, implicit=implicit, defined=defined)
        assert _both(deep) == [InvalidObject, InvalidObject], depth


@pytest.mark.parametrize(("implicit", "defined"), ENCODINGS)
def test_the_two_nesting_checks_agree(implicit: bool, defined: bool) -> None:
    for depth in (3, MAX_SEQUENCE_DEPTH - 1, MAX_SEQUENCE_DEPTH, MAX_SEQUENCE_DEPTH + 1, 120):
        data, _ = nested_dataset(depth, implicit=implicit, defined=defined)
        raw = raw_nested_too_deep(data, dataset_offset(data), len(data), not implicit)
        ds = pydicom.dcmread(io.BytesIO(data))
        assert raw == dataset_nested_too_deep(ds) == (depth > MAX_SEQUENCE_DEPTH), depth


def test_a_thousand_levels_is_an_invalid_object_not_a_recursion_error() -> None:
    data, _ = nested_dataset(1000)
    with pytest.raises(InvalidObject, match="nested more than 64 deep"):
        read_header_pydicom(io.BytesIO(data), len(data))
