"""Storage Commitment Push Model (PS3.4 J.3) with pynetdicom as the modality: it stores instances, asks for their
commitment with N-ACTION, and takes the N-EVENT-REPORT on the same association or on a new one that Bastion
opens to its configured AE.

DCMTK (Debian's dcmtk) has no Storage Commitment SCU, so there is no DCMTK check here.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import backends
import pydicom
import pytest
from conftest import BastionServer, free_port, wait_for_port
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StorageCommitmentPushModel

pytestmark = pytest.mark.timeout(120)

MODALITY_AET = "MODALITY"
STRANGER_AET = "STRANGER"  # not in Bastion's remotes
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
SAMPLES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
#: How long a report may take to arrive: generous, the machine may be loaded.
DEADLINE_S = 60.0


@dataclass(frozen=True)
class Report:
    """One N-EVENT-REPORT the modality received."""

    event_type: int
    info: Dataset
    #: True when it came on the association the modality requested (the N-ACTION's), False on one Bastion opened.
    on_own_association: bool

    @property
    def committed(self) -> dict[str, str]:
        """SOP Instance UID -> SOP Class UID of the Referenced SOP Sequence."""
        return {i.ReferencedSOPInstanceUID: i.ReferencedSOPClassUID for i in self.info.get("ReferencedSOPSequence", [])}

    @property
    def failed(self) -> dict[str, int]:
        """SOP Instance UID -> Failure Reason of the Failed SOP Sequence."""
        return {i.ReferencedSOPInstanceUID: int(i.FailureReason) for i in self.info.get("FailedSOPSequence", [])}


class Reports:
    """An EVT_N_EVENT_REPORT handler that keeps what it receives, answering success."""

    def __init__(self) -> None:
        self.received: queue.Queue[Report] = queue.Queue()

    def handle(self, event: Any) -> tuple[int, None]:
        self.received.put(Report(int(event.request.EventTypeID), event.event_information, event.assoc.is_requestor))
        return 0x0000, None

    def next(self, transaction_uid: str) -> Report:
        """The report of ``transaction_uid``, waiting up to :data:`DEADLINE_S`."""
        deadline = time.monotonic() + DEADLINE_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                report = self.received.get(timeout=left)
            except queue.Empty:
                break
            if report.info.TransactionUID == transaction_uid:
                return report
        raise AssertionError(f"no N-EVENT-REPORT for {transaction_uid} within {DEADLINE_S:g} s")


@dataclass
class Modality:
    """The modality's side: its AE title, the port Bastion's remotes name for it, what its listener received."""

    port: int
    reports: Reports
    ae: AE | None = None

    def listen(self) -> None:
        """Accept Bastion's associations as SCU of Storage Commitment, Bastion proposing the SCP role."""
        self.ae = AE(ae_title=MODALITY_AET)
        self.ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        self.ae.start_server(("127.0.0.1", self.port), block=False,
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, self.reports.handle)])
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.ae is not None:
            self.ae.shutdown()


def _sample(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom sample {name} not available")
    return Path(path)


def _ae(aet: str = MODALITY_AET) -> AE:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def _associate(server: BastionServer, aet: str = MODALITY_AET, reports: Reports | None = None) -> Association:
    ae = _ae(aet)
    ae.add_requested_context(StorageCommitmentPushModel)
    handlers = [(evt.EVT_N_EVENT_REPORT, reports.handle)] if reports is not None else []
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.aet, evt_handlers=handlers)
    assert assoc.is_established
    return assoc


def store(server: BastionServer, datasets: list[Dataset]) -> None:
    """C-STORE ``datasets`` to ``server`` with pynetdicom, each successfully."""
    ae = _ae()
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.aet)
    assert assoc.is_established
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status.Status == 0x0000, status
    finally:
        assoc.release()


def request(assoc: Association, references: list[tuple[str, str]], transaction_uid: str | None = None,
            *, action_type: int = 1) -> tuple[str, int]:
    """Send an N-ACTION Storage Commitment Request for ``references`` (SOP Class, SOP Instance); returns its
    Transaction UID and the N-ACTION-RSP status."""
    transaction_uid = transaction_uid or generate_uid()
    info = Dataset()
    info.TransactionUID = transaction_uid
    info.ReferencedSOPSequence = [_reference(cls, uid) for cls, uid in references]
    status, _ = assoc.send_n_action(info, action_type, StorageCommitmentPushModel, WELL_KNOWN_INSTANCE)
    return transaction_uid, int(status.Status)


def _reference(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    return item


@pytest.fixture(scope="module")
def modality() -> Iterator[Modality]:
    scp = Modality(free_port(), Reports())
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, modality: Modality) -> Iterator[BastionServer]:
    """A Bastion that knows the modality's AE (``MODALITY``) at the port its listener will take."""
    started = BastionServer(tmp_path_factory.mktemp("commitment") / "data",
                            remotes=(f"{MODALITY_AET}@127.0.0.1:{modality.port}",)).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def stored(server: BastionServer) -> list[Dataset]:
    """The three pydicom samples, stored."""
    datasets = [pydicom.dcmread(_sample(name)) for name in SAMPLES]
    store(server, datasets)
    return datasets


def test_report_on_the_same_association(server: BastionServer, stored: list[Dataset]) -> None:
    """Three stored instances and one unknown: the report, on the association kept open, lists the three as
    committed and the unknown one as failed with 0x0112 No such object instance."""
    reports = Reports()
    unknown = generate_uid()
    refs = [(ds.SOPClassUID, ds.SOPInstanceUID) for ds in stored] + [(MR_IMAGE_STORAGE, unknown)]
    assoc = _associate(server, reports=reports)
    try:
        transaction, status = request(assoc, refs)
        assert status == 0x0000
        report = reports.next(transaction)
    finally:
        assoc.release()
    assert report.on_own_association
    assert report.event_type == 2
    assert report.committed == {ds.SOPInstanceUID: ds.SOPClassUID for ds in stored}
    assert report.failed == {unknown: 0x0112}
    assert report.info.RetrieveAETitle == server.aet


def test_all_committed_is_event_type_1(server: BastionServer, stored: list[Dataset]) -> None:
    reports = Reports()
    assoc = _associate(server, reports=reports)
    try:
        transaction, status = request(assoc, [(ds.SOPClassUID, ds.SOPInstanceUID) for ds in stored])
        report = reports.next(transaction)
    finally:
        assoc.release()
    assert status == 0x0000
    assert report.event_type == 1
    assert len(report.committed) == len(stored)
    assert "FailedSOPSequence" not in report.info


def test_report_on_a_new_association(server: BastionServer, stored: list[Dataset], modality: Modality) -> None:
    """The modality releases as soon as the N-ACTION is answered: the report comes on an association Bastion opens
    to the modality's configured AE, proposing the SCP role."""
    modality.listen()
    unknown = generate_uid()
    assoc = _associate(server)
    transaction, status = request(assoc, [(stored[0].SOPClassUID, stored[0].SOPInstanceUID),
                                          (stored[1].SOPClassUID, unknown)])
    assoc.release()
    assert status == 0x0000
    report = modality.reports.next(transaction)
    assert not report.on_own_association
    assert report.event_type == 2
    assert report.committed == {stored[0].SOPInstanceUID: stored[0].SOPClassUID}
    assert report.failed == {unknown: 0x0112}


def test_wrong_sop_class_fails(server: BastionServer, stored: list[Dataset]) -> None:
    """A stored instance referenced with another SOP Class fails with 0x0119 Class/Instance conflict; one
    referenced with a class that is not a Storage SOP Class with 0x0122 Referenced SOP Class not supported."""
    ct = stored[0]
    reports = Reports()
    assoc = _associate(server, reports=reports)
    try:
        transaction, status = request(assoc, [(MR_IMAGE_STORAGE, ct.SOPInstanceUID),
                                              (VERIFICATION, stored[1].SOPInstanceUID),
                                              (stored[2].SOPClassUID, stored[2].SOPInstanceUID)])
        report = reports.next(transaction)
    finally:
        assoc.release()
    assert status == 0x0000
    assert report.event_type == 2
    assert report.failed == {ct.SOPInstanceUID: 0x0119, stored[1].SOPInstanceUID: 0x0122}
    assert report.committed == {stored[2].SOPInstanceUID: stored[2].SOPClassUID}


def test_corrupt_copy_is_not_committed(server: BastionServer) -> None:
    """An instance whose only copy no longer matches its digest is not durably stored: 0x0110 Processing failure."""
    if backends.REMOTE:
        pytest.skip("corrupts the filesystem blob store's file in place")
    ds = pydicom.dcmread(_sample("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    store(server, [ds])
    (blob,) = server.blobs_of(ds.SOPInstanceUID)
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0xFF
    blob.write_bytes(bytes(data))
    reports = Reports()
    assoc = _associate(server, reports=reports)
    try:
        transaction, _ = request(assoc, [(ds.SOPClassUID, ds.SOPInstanceUID)])
        report = reports.next(transaction)
    finally:
        assoc.release()
    assert report.failed == {ds.SOPInstanceUID: 0x0110}


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize(("mangle", "expected"), [
    ("no transaction", 0x0120),
    ("empty sequence", 0x0120),
    ("not a uid", 0x0115),
    ("action type 2", 0x0123),
])
def test_malformed_request_is_refused(server: BastionServer, stored: list[Dataset], mangle: str,
                                      expected: int) -> None:
    """A malformed Storage Commitment Request is answered with the N-ACTION failure status (PS3.4 J.3.2.1.3,
    PS3.7 10.1.4.1.10), and no result follows."""
    info = Dataset()
    info.TransactionUID = generate_uid()
    info.ReferencedSOPSequence = [_reference(stored[0].SOPClassUID, stored[0].SOPInstanceUID)]
    action_type = 1
    if mangle == "no transaction":
        del info.TransactionUID
    elif mangle == "empty sequence":
        info.ReferencedSOPSequence = []
    elif mangle == "not a uid":
        info.ReferencedSOPSequence[0].ReferencedSOPInstanceUID = "1.2.x"
    else:
        action_type = 2
    reports = Reports()
    assoc = _associate(server, reports=reports)
    try:
        status, _ = assoc.send_n_action(info, action_type, StorageCommitmentPushModel, WELL_KNOWN_INSTANCE)
    finally:
        assoc.release()
    assert int(status.Status) == expected
    assert reports.received.empty()


def test_report_for_an_unknown_requester_that_left_is_logged(server: BastionServer, stored: list[Dataset]) -> None:
    """A requester that released at once and is not a configured remote AE cannot be reached: the server says so."""
    assoc = _associate(server, aet=STRANGER_AET)
    transaction, status = request(assoc, [(stored[0].SOPClassUID, stored[0].SOPInstanceUID)])
    assoc.release()
    assert status == 0x0000
    said = f"storage commitment result {transaction} for {STRANGER_AET} lost"
    deadline = time.monotonic() + DEADLINE_S
    while said not in server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert said in server.log()


def test_a_long_check_keeps_its_association(bastion_factory: Any) -> None:
    """While a request's instances are being checked the association is busy, not idle: with a 1 s idle timeout, a
    6 MB instance referenced 500 times (each reference hashes its copy again: seconds of work; 50 times where the
    copy comes from S3) still gets its report on the request's association."""
    references = 50 if backends.REMOTE else 500
    server = bastion_factory(settings={"BASTION_DICOM_IDLE_TIMEOUT": "1"})
    ds = pydicom.dcmread(_sample("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = 1536, 2048
    ds.PixelData = bytes(1536 * 2048 * 2)
    store(server, [ds])
    reports = Reports()
    assoc = _associate(server, reports=reports)
    try:
        transaction, status = request(assoc, [(ds.SOPClassUID, ds.SOPInstanceUID)] * references)
        report = reports.next(transaction)
    finally:
        assoc.release()
    assert status == 0x0000
    assert report.on_own_association and report.event_type == 1
    assert len(report.info.ReferencedSOPSequence) == references
