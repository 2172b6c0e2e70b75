"""C-MOVE (PS3.4 C.4.2) to a DCMTK storescp and C-GET (C.4.3) into getscu, plus C-CANCEL via pynetdicom."""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import (
    DEST_AET,
    DOWN_AET,
    BastionServer,
    StoreSCP,
    Study,
    dataset_part,
    dcmtk_env,
    free_port,
    make_ct_series,
    make_study,
    requires_dcmtk,
    run_dcmtk,
    transfer_syntax_of,
    wait_for_port,
)
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelMove

pytestmark = [requires_dcmtk, pytest.mark.timeout(120)]

JP2K_LOSSLESS = "MR_small_jp2klossless.dcm"
JP2K = "JPEG2000.dcm"


def _sample(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom sample {name} not available")
    return Path(path)


@pytest.fixture(scope="module")
def corpus(bastion: BastionServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Study]:
    root = tmp_path_factory.mktemp("retrieve-corpus")
    out = {"ct": make_study(root / "ct", series=2, per_series=3),
           "big": make_study(root / "big", series=1, per_series=120)}
    files = out["ct"].files + out["big"].files
    proc = bastion.storescu(*files)
    assert proc.stdout.count("Received Store Response (Success)") == len(files), proc.stdout
    for name in (JP2K_LOSSLESS, JP2K):
        proc = bastion.dcmsend(_sample(name))
        assert "with status SUCCESS  : 1" in proc.stdout, proc.stdout
    return out


def move_responses(output: str) -> list[dict[str, str]]:
    """The C-MOVE-RSP messages in ``movescu -d`` output: counts and status per response."""
    out = []
    for block in re.findall(r"Message Type\s+: C-MOVE RSP\n(.*?)END DIMSE MESSAGE", output, re.S):
        fields = dict(re.findall(r"D: ([A-Za-z ]+?)\s+: (.*)", block))
        out.append({"remaining": fields.get("Remaining Suboperations", ""),
                    "completed": fields.get("Completed Suboperations", ""),
                    "failed": fields.get("Failed Suboperations", ""),
                    "warning": fields.get("Warning Suboperations", ""),
                    "status": fields.get("DIMSE Status", "")[:6]})
    return out


def movescu(server: BastionServer, dest: str, keys: dict[str, str], *options: str) -> tuple[str, list[dict[str, str]]]:
    args = ["-d", "-S", *options, "-aem", dest]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}"]
    proc = run_dcmtk("movescu", *args, *server.addr(), timeout=90)
    return proc.stdout, move_responses(proc.stdout)


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _assert_received_exactly(scp: StoreSCP, files: list[Path]) -> None:
    received = scp.received()
    assert sorted(received) == sorted(_sop(f) for f in files)
    for f in files:
        assert dataset_part(received[_sop(f)].read_bytes()) == dataset_part(f.read_bytes()), f


# -- C-MOVE ------------------------------------------------------------------------------------------
def test_move_study(bastion: BastionServer, storescp: StoreSCP, corpus: dict[str, Study]) -> None:
    study = corpus["ct"]
    storescp.clear()
    output, rsps = movescu(bastion, DEST_AET, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study.study_uid})
    n = len(study.files)
    pending, final = rsps[:-1], rsps[-1]
    assert [r["status"] for r in pending] == ["0xff00"] * n
    assert [int(r["remaining"]) for r in pending] == list(range(n - 1, -1, -1))
    assert [int(r["completed"]) for r in pending] == list(range(1, n + 1))
    assert all(r["failed"] == "0" and r["warning"] == "0" for r in pending)
    assert final["status"] == "0x0000" and int(final["completed"]) == n and final["failed"] == "0"
    _assert_received_exactly(storescp, study.files)


def test_move_series(bastion: BastionServer, storescp: StoreSCP, corpus: dict[str, Study]) -> None:
    study = corpus["ct"]
    series_uid, files = list(study.series.items())[1]
    storescp.clear()
    output, rsps = movescu(bastion, DEST_AET, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study.study_uid,
                                               "SeriesInstanceUID": series_uid})
    assert rsps[-1]["status"] == "0x0000", output
    assert int(rsps[-1]["completed"]) == len(files)
    _assert_received_exactly(storescp, files)


def test_move_image(bastion: BastionServer, storescp: StoreSCP, corpus: dict[str, Study]) -> None:
    study = corpus["ct"]
    series_uid, files = list(study.series.items())[0]
    storescp.clear()
    output, rsps = movescu(bastion, DEST_AET, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study.study_uid,
                                               "SeriesInstanceUID": series_uid, "SOPInstanceUID": _sop(files[1])})
    assert rsps[-1]["status"] == "0x0000", output
    assert len(rsps) == 2 and int(rsps[-1]["completed"]) == 1
    _assert_received_exactly(storescp, [files[1]])


@pytest.mark.parametrize("name", [JP2K, JP2K_LOSSLESS])
def test_move_compressed_as_stored(bastion: BastionServer, storescp: StoreSCP, corpus: dict[str, Study],
                                   name: str) -> None:
    meta = pydicom.dcmread(_sample(name), stop_before_pixels=True)
    storescp.clear()
    output, _ = movescu(bastion, DEST_AET, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": meta.StudyInstanceUID})
    assert move_responses(output)[-1]["status"] == "0x0000", output
    received = storescp.received()
    sop = str(meta.SOPInstanceUID)
    assert list(received) == [sop]
    assert transfer_syntax_of(received[sop]) == str(meta.file_meta.TransferSyntaxUID)
    stored = bastion.blobs_of(sop)[-1]
    assert dataset_part(received[sop].read_bytes()) == dataset_part(stored.read_bytes())


def test_move_to_unknown_destination(bastion: BastionServer, storescp: StoreSCP, corpus: dict[str, Study]) -> None:
    storescp.clear()
    output, rsps = movescu(bastion, "NOSUCHAE", {"QueryRetrieveLevel": "STUDY",
                                                "StudyInstanceUID": corpus["ct"].study_uid})
    assert "Refused: MoveDestinationUnknown" in output, output
    assert [r["status"] for r in rsps] == ["0xa801"]
    assert storescp.files() == []


def test_move_to_destination_down(bastion: BastionServer, storescp: StoreSCP, corpus: dict[str, Study]) -> None:
    output, rsps = movescu(bastion, DOWN_AET, {"QueryRetrieveLevel": "STUDY",
                                              "StudyInstanceUID": corpus["ct"].study_uid})
    final = rsps[-1]["status"]
    assert final.startswith(("0xa", "0xc", "0xb")), output  # failure or warning, never success
    assert f"cannot reach {DOWN_AET}" in bastion.log()
    assert "Received Echo Response (Success)" in bastion.echo().stdout


def test_move_without_unique_key_is_refused(bastion: BastionServer, storescp: StoreSCP,
                                            corpus: dict[str, Study]) -> None:
    storescp.clear()
    output, rsps = movescu(bastion, DEST_AET, {"QueryRetrieveLevel": "SERIES",
                                               "StudyInstanceUID": corpus["ct"].study_uid})
    assert rsps and rsps[-1]["status"] not in ("0x0000", "0xff00"), output
    assert storescp.files() == []


def test_move_of_nothing_succeeds_with_no_suboperations(bastion: BastionServer, storescp: StoreSCP,
                                                        corpus: dict[str, Study]) -> None:
    output, rsps = movescu(bastion, DEST_AET, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.3.4.5.6.7"})
    assert rsps[-1]["status"] == "0x0000", output
    assert len(rsps) == 1 and rsps[0]["completed"] == "0"


def test_move_cancel(bastion: BastionServer, storescp: StoreSCP, corpus: dict[str, Study]) -> None:
    """C-CANCEL after the first pending response stops the sub-operations (PS3.4 C.4.2.3.1)."""
    study = corpus["big"]
    storescp.clear()
    ae = AE(ae_title="CANCELSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(bastion.host, bastion.dicom_port, ae_title=bastion.aet)
    assert assoc.is_established
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study.study_uid
    statuses = []
    try:
        for status, _identifier in assoc.send_c_move(ds, DEST_AET, StudyRootQueryRetrieveInformationModelMove,
                                                     msg_id=7):
            assert status, "no response"
            statuses.append(status)
            if len(statuses) == 1:
                assert status.Status == 0xFF00
                assoc.send_c_cancel(7, query_model=StudyRootQueryRetrieveInformationModelMove)
    finally:
        assoc.release()
        ae.shutdown()
    final = statuses[-1]
    assert final.Status == 0xFE00, f"final status 0x{final.Status:04X} after {len(statuses)} responses"
    completed = int(final.NumberOfCompletedSuboperations)
    assert 1 <= completed < len(study.files)
    assert int(final.NumberOfRemainingSuboperations) == len(study.files) - completed - int(
        final.NumberOfFailedSuboperations) - int(final.NumberOfWarningSuboperations)
    assert len(storescp.files()) == completed
    assert "Received Echo Response (Success)" in bastion.echo().stdout


def start_storescp(aet: str, directory: Path, *options: str) -> StoreSCP:
    """A DCMTK storescp with its own ``options`` (the fixture's accepts every syntax and never aborts)."""
    scp = StoreSCP(aet, free_port(), directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f"storescp-{scp.port}.log", "w") as log:
        scp.proc = subprocess.Popen(["/usr/bin/storescp", "-od", str(directory), "+B", *options, "-aet", aet,
                                     str(scp.port)], env=dcmtk_env(), stdout=log, stderr=subprocess.STDOUT)
    wait_for_port(scp.port, proc=scp.proc)
    return scp


@pytest.fixture
def aborting_destination(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StoreSCP]:
    """A storescp that aborts its association (``--abort-after`` or ``--abort-during`` a C-STORE-RQ)."""
    scp = start_storescp("ABORTER", tmp_path / "aborter", str(request.param))
    yield scp
    scp.stop()


@pytest.mark.parametrize("aborting_destination", ["--abort-after", "--abort-during"], indirect=True)
def test_move_to_destination_that_aborts(bastion_factory: Any, aborting_destination: StoreSCP,
                                         tmp_path: Path) -> None:
    """An A-ABORT from the destination ends the sub-operations at once: the final C-MOVE-RSP reports every
    sub-operation failed, 0xA702 (PS3.4 C.4.2.1.4), before the requesting SCU's DIMSE timeout (10 s; the
    association with the destination would otherwise have been waited on for 30 s)."""
    server = bastion_factory(remotes=[f"ABORTER@127.0.0.1:{aborting_destination.port}"])
    study = make_study(tmp_path / "study", series=1, per_series=3)
    proc = server.storescu(*study.files)
    assert proc.stdout.count("Received Store Response (Success)") == 3, proc.stdout
    output, rsps = movescu(server, "ABORTER", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study.study_uid},
                           "-td", "10")
    assert rsps, output
    final = rsps[-1]
    assert final["status"] == "0xa702", output
    assert (final["completed"], final["failed"], final["warning"]) == ("0", "3", "0"), output
    assert final["remaining"] in ("", "none", "0"), output
    assert "Received Echo Response (Success)" in server.echo().stdout


def test_move_to_destination_with_odd_maximum_pdu(bastion_factory: Any, tmp_path: Path) -> None:
    """A destination whose maximum PDU length is odd still gets fragments of even length (PS3.8 9.3.5.1; DCMTK
    refuses an odd one, "Odd Fragment Length", but rounds its own odd maximum down, so pynetdicom is the peer
    here and every PDV it receives is measured)."""
    data_lengths: list[int] = []
    stored: list[str] = []

    def on_pdu(event: Any) -> None:
        for pdv in getattr(event.pdu, "presentation_data_value_items", []):
            data_lengths.append(len(pdv.presentation_data_value) - 1)  # less the message control header

    def on_store(event: Any) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="ODDPDU")
    ae.maximum_pdu_size = 16385
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    port = free_port()
    scp = ae.start_server(("127.0.0.1", port), block=False,
                          evt_handlers=[(evt.EVT_PDU_RECV, on_pdu), (evt.EVT_C_STORE, on_store)])
    try:
        server = bastion_factory(remotes=[f"ODDPDU@127.0.0.1:{port}"])
        study = make_study(tmp_path / "study", series=1, per_series=2, kind="ct")
        assert all(f.stat().st_size > 3 * 16385 for f in study.files)  # several fragments each
        proc = server.storescu(*study.files)
        assert proc.stdout.count("Received Store Response (Success)") == 2, proc.stdout
        output, rsps = movescu(server, "ODDPDU", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study.study_uid})
    finally:
        scp.shutdown()
    assert rsps and rsps[-1]["status"] == "0x0000", output
    assert sorted(stored) == sorted(_sop(f) for f in study.files)
    assert len(data_lengths) > 6 and max(data_lengths) <= 16385 - 6
    assert [n for n in data_lengths if n % 2] == []


#: A-ABORT (PS3.8 9.3.8), source 0 (service-user), reason 0.
A_ABORT_PDU = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])


def test_move_to_destination_that_aborts_and_keeps_the_connection(bastion_factory: Any, tmp_path: Path) -> None:
    """A destination that sends A-ABORT on the first C-STORE-RQ and leaves closing the connection to us (the
    receiver of an A-ABORT closes it, PS3.8 9.2 AA-3): the sub-operations end on the A-ABORT, not on a timeout."""
    release = threading.Event()
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        event.assoc.dul.socket.send(A_ABORT_PDU)  # the raw PDU: pynetdicom's own abort() closes at once
        release.wait(60)  # hold the connection open
        return 0x0000

    ae = AE(ae_title="HALFOPEN")
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    port = free_port()
    scp = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        server = bastion_factory(remotes=[f"HALFOPEN@127.0.0.1:{port}"])
        study = make_study(tmp_path / "study", series=1, per_series=3)
        proc = server.storescu(*study.files)
        assert proc.stdout.count("Received Store Response (Success)") == 3, proc.stdout
        output, rsps = movescu(server, "HALFOPEN", {"QueryRetrieveLevel": "STUDY",
                                                   "StudyInstanceUID": study.study_uid}, "-td", "10")
    finally:
        release.set()
        scp.shutdown()
    assert rsps, output
    final = rsps[-1]
    assert final["status"] == "0xa702", output
    assert (final["completed"], final["failed"], final["warning"]) == ("0", "3", "0"), output
    assert len(received) == 1  # nothing was sent after the A-ABORT


# -- C-GET -------------------------------------------------------------------------------------------
def getscu(server: BastionServer, out: Path, keys: dict[str, str], *options: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    args = ["-v", "-S", *options, "-od", str(out)]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}"]
    return run_dcmtk("getscu", *args, *server.addr(), timeout=90).stdout


def test_get_study(bastion: BastionServer, corpus: dict[str, Study], tmp_path: Path) -> None:
    study = corpus["ct"]
    output = getscu(bastion, tmp_path / "get", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study.study_uid})
    assert "Received C-GET Response (Success)" in output, output
    received = {_sop(p): p for p in (tmp_path / "get").iterdir()}
    assert sorted(received) == sorted(_sop(f) for f in study.files)
    for f in study.files:
        assert dataset_part(received[_sop(f)].read_bytes()) == dataset_part(f.read_bytes())


def test_get_jpeg2000_lossless_as_stored(bastion: BastionServer, corpus: dict[str, Study], tmp_path: Path) -> None:
    path = _sample(JP2K_LOSSLESS)
    meta = pydicom.dcmread(path, stop_before_pixels=True)
    output = getscu(bastion, tmp_path / "get", {"QueryRetrieveLevel": "STUDY",
                                                "StudyInstanceUID": meta.StudyInstanceUID}, "+xv")
    assert "Received C-GET Response (Success)" in output, output
    (received,) = list((tmp_path / "get").iterdir())
    assert transfer_syntax_of(received) == str(meta.file_meta.TransferSyntaxUID)
    stored = bastion.blobs_of(str(meta.SOPInstanceUID))[-1]
    assert dataset_part(received.read_bytes()) == dataset_part(stored.read_bytes())


def test_get_jpeg2000_decompressed_when_not_accepted(bastion: BastionServer, corpus: dict[str, Study],
                                                     tmp_path: Path) -> None:
    path = _sample(JP2K_LOSSLESS)
    meta = pydicom.dcmread(path, stop_before_pixels=True)
    output = getscu(bastion, tmp_path / "get", {"QueryRetrieveLevel": "STUDY",
                                                "StudyInstanceUID": meta.StudyInstanceUID})
    assert "Received C-GET Response (Success)" in output, output
    (received,) = list((tmp_path / "get").iterdir())
    assert transfer_syntax_of(received) in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
    original = pydicom.dcmread(path)
    assert (pydicom.dcmread(received).pixel_array == original.pixel_array).all()  # lossless: same pixels


def test_move_to_destination_that_stops_reading(bastion_factory: Any, tmp_path: Path) -> None:
    """A destination that accepts the association and then reads nothing more, mid-way through a 32 MB instance:
    the sub-operation's send gives up (the destination is lost) and the C-MOVE ends with a failure instead of
    waiting for it forever."""
    release = threading.Event()
    stalled = threading.Event()

    def on_data(event: Any) -> None:
        if event.data[:1] == b"\x04":  # the first P-DATA-TF: stop reading the socket
            stalled.set()
            release.wait(120)

    ae = AE(ae_title="STALLED")
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    port = free_port()
    scp = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_DATA_RECV, on_data)])
    try:
        server = bastion_factory(remotes=[f"STALLED@127.0.0.1:{port}"])
        study = make_ct_series(tmp_path / "big", slices=1, size=4096)
        proc = server.storescu(*study.files)
        assert proc.stdout.count("Received Store Response (Success)") == 1, proc.stdout
        output, rsps = movescu(server, "STALLED", {"QueryRetrieveLevel": "STUDY",
                                                  "StudyInstanceUID": study.study_uid})
        assert stalled.is_set()
    finally:
        release.set()
        scp.shutdown()
    assert rsps, output
    final = rsps[-1]
    assert final["status"] == "0xa702", output
    assert (final["completed"], final["failed"], final["warning"]) == ("0", "1", "0"), output
