"""What a Storage Commitment counts as committed (PS3.4 J.3.3.1.2, :class:`bastion.dimse.commitment.Committer`):
the copies a C-STORE success needed, checked against their digest, and on an edge its upstream's word; and the
Storage Commitment Request's Action Information (PS3.4 Table J.3-1)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from bastion.archive import Archive
from bastion.dimse.commitment import (
    CLASS_INSTANCE_CONFLICT,
    DUPLICATE_TRANSACTION_UID,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
    REFERENCED_SOP_CLASS_NOT_SUPPORTED,
    CommitmentRequest,
    CommitmentRequestError,
    CommitmentResult,
    Committer,
    Reference,
    StorageCommitment,
    parse_request,
)
from bastion.model.records import InstanceRecord
from bastion.model.uids import EXPLICIT_VR_LITTLE_ENDIAN
from bastion.settings import load_settings

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def _open(tmp_path: Path, required: int) -> Archive:
    data = tmp_path / "data"
    return Archive.open(load_settings(None, env={}, data=data, blobs=(str(data / "a"), str(data / "b")),
                                      copies_required=required))


@pytest.fixture(params=[1, 2], ids=["one-copy-required", "two-copies-required"])
def two_stores(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Archive, InstanceRecord]]:
    """An archive with two blob stores, ``copies_required`` 1 or 2, holding CT_small in both."""
    archive = _open(tmp_path, request.param)
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    record = archive.ingest.store_bytes(Path(path).read_bytes(), "test").record
    assert record is not None
    yield archive, record
    archive.close()


def _copy(archive: Archive, store: int, record: InstanceRecord) -> Path:
    return Path(archive.blobs.stores[store].location.removeprefix("file://")) / record.blob_key


def test_committed_when_every_copy_is_good(two_stores: tuple[Archive, InstanceRecord]) -> None:
    archive, record = two_stores
    committer = Committer(archive.index, archive.blobs)
    assert committer.check(Reference(CT_IMAGE_STORAGE, record.sop_uid)) is None


def test_one_lost_copy_fails_only_when_both_were_required(two_stores: tuple[Archive, InstanceRecord]) -> None:
    archive, record = two_stores
    _copy(archive, 0, record).unlink()
    reason = Committer(archive.index, archive.blobs).check(Reference(CT_IMAGE_STORAGE, record.sop_uid))
    assert reason == (PROCESSING_FAILURE if archive.blobs.required == 2 else None)
    if archive.blobs.required == 2:
        assert [f.problem for f in archive.blobs.findings.outstanding()] == ["missing"]  # for the repair


def test_corrupt_copies_fail(two_stores: tuple[Archive, InstanceRecord]) -> None:
    archive, record = two_stores
    for store in (0, 1):
        path = _copy(archive, store, record)
        data = bytearray(path.read_bytes())
        data[-10] ^= 0x01
        path.write_bytes(bytes(data))
    reason = Committer(archive.index, archive.blobs).check(Reference(CT_IMAGE_STORAGE, record.sop_uid))
    assert reason == PROCESSING_FAILURE


def test_every_copy_lost_is_no_such_object_instance(two_stores: tuple[Archive, InstanceRecord]) -> None:
    archive, record = two_stores
    for store in (0, 1):
        _copy(archive, store, record).unlink()
    reason = Committer(archive.index, archive.blobs).check(Reference(CT_IMAGE_STORAGE, record.sop_uid))
    assert reason == NO_SUCH_OBJECT_INSTANCE


def test_failure_reasons_of_the_references(two_stores: tuple[Archive, InstanceRecord]) -> None:
    archive, record = two_stores
    committer = Committer(archive.index, archive.blobs, storage_deny=[MR_IMAGE_STORAGE])
    result = committer.commit(CommitmentRequest("1.2.3", (
        Reference(CT_IMAGE_STORAGE, record.sop_uid),
        Reference("1.2.840.10008.5.1.4.1.1.7", record.sop_uid),  # Secondary Capture: another class
        Reference(MR_IMAGE_STORAGE, "1.2.3.4"),  # denied here
        Reference("1.2.840.10008.1.1", "1.2.3.5"),  # Verification: not a storage class
        Reference(CT_IMAGE_STORAGE, "1.2.3.6"),  # never stored
    )))
    assert result.event_type == 2
    assert result.committed == (Reference(CT_IMAGE_STORAGE, record.sop_uid),)
    assert [reason for _, reason in result.failed] == [CLASS_INSTANCE_CONFLICT, REFERENCED_SOP_CLASS_NOT_SUPPORTED,
                                                       REFERENCED_SOP_CLASS_NOT_SUPPORTED, NO_SUCH_OBJECT_INSTANCE]


@pytest.mark.parametrize(("upstream", "committed"), [(True, True), (False, False), (None, False)])
def test_an_edge_commits_only_what_upstream_holds(two_stores: tuple[Archive, InstanceRecord], upstream: bool | None,
                                                  committed: bool) -> None:
    archive, record = two_stores
    asked: list[str] = []

    def upstream_holds(sop_uid: str) -> bool | None:
        asked.append(sop_uid)
        return upstream

    committer = Committer(archive.index, archive.blobs, upstream_holds=upstream_holds)
    reason = committer.check(Reference(CT_IMAGE_STORAGE, record.sop_uid))
    assert reason == (None if committed else PROCESSING_FAILURE)
    assert asked == [record.sop_uid]
    assert committer.check(Reference(CT_IMAGE_STORAGE, "1.2.3.7")) == NO_SUCH_OBJECT_INSTANCE
    assert asked == [record.sop_uid]  # not asked about what is not stored here


def test_an_upstream_that_cannot_be_asked_fails_the_instance(two_stores: tuple[Archive, InstanceRecord]) -> None:
    archive, record = two_stores

    def upstream_holds(sop_uid: str) -> bool | None:
        raise ConnectionError("upstream down")

    committer = Committer(archive.index, archive.blobs, upstream_holds=upstream_holds)
    assert committer.check(Reference(CT_IMAGE_STORAGE, record.sop_uid)) == PROCESSING_FAILURE


def _encoded(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def test_parse_request() -> None:
    ds = Dataset()
    ds.TransactionUID = "1.2.3"
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CT_IMAGE_STORAGE, "1.2.3.4"
    ds.ReferencedSOPSequence = [item]
    request = parse_request(_encoded(ds), EXPLICIT_VR_LITTLE_ENDIAN)
    assert request == CommitmentRequest("1.2.3", (Reference(CT_IMAGE_STORAGE, "1.2.3.4"),))
    del item.ReferencedSOPClassUID
    with pytest.raises(CommitmentRequestError) as caught:
        parse_request(_encoded(ds), EXPLICIT_VR_LITTLE_ENDIAN)
    assert (caught.value.dimse_status, caught.value.tag) == (0x0120, 0x00081150)
    with pytest.raises(CommitmentRequestError) as caught:
        parse_request(b"\x08\x00\x99\x11SQ\x00\x00\x10\x00\x00\x00\xfe\xff", EXPLICIT_VR_LITTLE_ENDIAN)  # cut short
    assert caught.value.dimse_status == 0x0110


def test_result_encodes_both_sequences() -> None:
    result = CommitmentResult("1.2.3", (Reference(CT_IMAGE_STORAGE, "1.2.3.4"),),
                              ((Reference(MR_IMAGE_STORAGE, "1.2.3.5"), NO_SUCH_OBJECT_INSTANCE),))
    ds = pydicom.dcmread(DicomBytesIO(result.encode(EXPLICIT_VR_LITTLE_ENDIAN, "BASTION")), force=True)
    assert ds.TransactionUID == "1.2.3" and ds.RetrieveAETitle == "BASTION"
    assert ds.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "1.2.3.4"
    assert ds.FailedSOPSequence[0].FailureReason == 0x0112


def test_a_transaction_uid_in_use_fails_with_duplicate_transaction_uid(tmp_path: Path) -> None:
    """A second request under the Transaction UID of one whose result is not delivered yet: every reference fails
    with 0x0131 Duplicate Transaction UID (PS3.3 C.14.1.1); the first is answered as usual."""
    archive = _open(tmp_path, 1)
    executor = ThreadPoolExecutor(2)
    commitment = StorageCommitment(archive, executor)
    release = threading.Event()
    delivered: list[CommitmentResult] = []
    commit = commitment.committer.commit

    def slow_commit(request: CommitmentRequest) -> CommitmentResult:
        release.wait(30)
        return commit(request)

    async def report_anew(calling: str, result: CommitmentResult) -> None:
        delivered.append(result)
        release.set()

    commitment.committer.commit = slow_commit  # type: ignore[method-assign]
    commitment._report_anew = report_anew  # type: ignore[method-assign]
    request = CommitmentRequest("1.2.3", (Reference(CT_IMAGE_STORAGE, "1.2.3.4"),))
    # the association of the requests has ended: their results go on new ones
    session = SimpleNamespace(assoc=SimpleNamespace(calling_aet="MODALITY"), open=False, results_pending=2)

    async def both() -> None:
        first = asyncio.create_task(commitment._result(session, None, request))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        await commitment._result(session, None, request)  # type: ignore[arg-type]
        await first

    try:
        asyncio.run(both())
    finally:
        executor.shutdown()
        archive.close()
    assert session.results_pending == 0
    assert [r.failed for r in delivered] == [((request.references[0], DUPLICATE_TRANSACTION_UID),),
                                             ((request.references[0], NO_SUCH_OBJECT_INSTANCE),)]
