"""An archive keeps whatever a modality sends (issue 19): private and retired storage classes over real DCMTK,
identifiable objects with UIDs breaking PS3.5 9.1 (a warning status and a recorded note), pydicom's rtdose.dcm
over STOW-RS, a rebuild that keeps them, and a 1,000-deep nested object refused with one short log line."""

from __future__ import annotations

import io
import re
import sys
import warnings
from pathlib import Path

import httpx
import pydicom
import pytest
from conftest import BastionServer, dataset_part, requires_dcmtk, run_bastion
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from test_dimse_store import raw_c_store  # noqa: E402
from test_ingest_leniency import nested_dataset  # noqa: E402

pytestmark = [requires_dcmtk, pytest.mark.timeout(180)]

PHILIPS = ["1.3.46.670589.11.0.0.12.1", "1.3.46.670589.11.0.0.12.2"]
SIEMENS_CSA = "1.3.12.2.1107.5.9.1"
HARDCOPY = "1.2.840.10008.5.1.1.29"
OVERLAY = "1.2.840.10008.5.1.4.1.1.8"
LONG_UID = "1.2.826.0.1.3680043.8.498." + "1234567890" * 4 + "123"  # 69 characters: DCMTK cuts it to 64
LEADING_ZERO_UID = "1.2.826.0.1.3680043.8.498.0" + generate_uid()[27:40]


def _write(path: Path, sop_class: str, sop_uid: str, study: str) -> Path:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "KEEPALL", "Keep^All", "OT"
    ds.add_new(0x00291010, "OB", b"CSA\x00" * 8)  # a private payload, as such objects carry
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the UIDs breaking PS3.5 9.1, on purpose here
        ds.save_as(path, enforce_file_format=True)
    return path


def _wado_instance(server: BastionServer, study: str, sop: str) -> bytes:
    """The instance as stored, through WADO-RS (one part of multipart/related)."""
    r = httpx.get(server.url(f"/dicom-web/studies/{study}"), headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}, timeout=30)
    assert r.status_code == 200, r.text[:300]
    found = re.search(r'boundary="?([^";]+)', r.headers["content-type"], re.IGNORECASE)
    assert found, r.headers["content-type"]
    boundary = found.group(1).encode()
    for part in r.content.split(b"--" + boundary)[1:-1]:
        body = part.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")
        if pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True).SOPInstanceUID == sop:
            return body
    raise AssertionError(f"{sop} not in the study")


def _c_get(server: BastionServer, study: str, classes: list[str]) -> dict[str, bytes]:
    """C-GET the study with pynetdicom, proposing ``classes`` with the SCP role; dataset bytes by SOP UID."""
    received: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        received[event.request.AffectedSOPInstanceUID] = event.request.DataSet.getvalue()
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for c in classes:
        ae.add_requested_context(c, ExplicitVRLittleEndian)
    roles = []
    for c in classes:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid, role.scu_role, role.scp_role = c, False, True
        roles.append(role)
    assoc = ae.associate(server.host, server.dicom_port, ae_title=server.aet, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", study
        statuses = [s.Status for s, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet) if s]
        assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    finally:
        assoc.release()
        ae.shutdown()
    return received


def test_private_and_retired_storage_classes_are_stored_and_retrieved_as_sent(bastion: BastionServer,
                                                                             tmp_path: Path) -> None:
    study = generate_uid()
    classes = [*PHILIPS, SIEMENS_CSA, HARDCOPY, OVERLAY]
    files = {c: _write(tmp_path / f"{i}.dcm", c, generate_uid(), study) for i, c in enumerate(classes)}
    for f in files.values():  # dcmsend proposes each file's own class, known to DCMTK or not
        proc = bastion.dcmsend(f)
        assert proc.returncode == 0 and "with status SUCCESS  : 1" in proc.stdout, proc.stdout
    proc = bastion.storescu(files[HARDCOPY], options=["-R"])  # storescu proposes the retired class it knows
    assert "Received Store Response (Success)" in proc.stdout, proc.stdout
    got = _c_get(bastion, study, classes)
    for c, f in files.items():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        original = dataset_part(f.read_bytes())
        assert got[ds.SOPInstanceUID] == original, c
        assert dataset_part(_wado_instance(bastion, study, ds.SOPInstanceUID)) == original, c


def test_a_denied_storage_class_is_refused_at_negotiation(bastion_factory: object, tmp_path: Path) -> None:
    server: BastionServer = bastion_factory(settings={"BASTION_STORAGE_DENY": PHILIPS[0]})  # type: ignore[operator]
    denied = _write(tmp_path / "denied.dcm", PHILIPS[0], generate_uid(), generate_uid())
    proc = server.dcmsend(denied)
    assert "with status SUCCESS  : 1" not in proc.stdout, proc.stdout
    ae = AE(ae_title="DENIED")
    ae.add_requested_context(PHILIPS[0], ExplicitVRLittleEndian)
    ae.add_requested_context(PHILIPS[1], ExplicitVRLittleEndian)
    assoc = ae.associate(server.host, server.dicom_port, ae_title=server.aet)
    try:
        assert assoc.is_established
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [PHILIPS[1]]
        assert [(cx.abstract_syntax, cx.result) for cx in assoc.rejected_contexts] == [(PHILIPS[0], 0x03)]
    finally:
        assoc.release()
        ae.shutdown()
    assert server.stats()["instances"] == 0


def test_lenient_uids_warn_are_recorded_retrievable_and_survive_a_rebuild(bastion_factory: object,
                                                                          tmp_path: Path) -> None:
    server: BastionServer = bastion_factory()  # type: ignore[operator]
    study = "1.2.826.0.1.3680043.8.498.01." + generate_uid()[27:50]  # a leading zero in the study too
    files = {uid: _write(tmp_path / f"{i}.dcm", "1.2.840.10008.5.1.4.1.1.7", uid, study)
             for i, uid in enumerate((LONG_UID, LEADING_ZERO_UID))}
    problems = {LONG_UID: "SOPInstanceUID is longer than 64 characters", LEADING_ZERO_UID: "leading zero"}
    for uid, f in files.items():
        proc = server.storescu(f, options=["-d"])
        assert proc.returncode == 0, proc.stdout
        assert "DIMSE Status                  : 0x0116: Warning" in proc.stdout, proc.stdout  # DCMTK's words
        comment = [line for line in proc.stdout.splitlines() if "ErrorComment" in line]
        assert len(comment) == 1 and problems[uid] in comment[0], proc.stdout  # names the problem
    rtdose = Path(str(get_testdata_file("rtdose.dcm")))
    body = b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n" + rtdose.read_bytes() + b"\r\n--XyZ--\r\n"
    r = httpx.post(server.url("/dicom-web/studies"), content=body, timeout=30,
                   headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=XyZ'})
    assert r.status_code == 202, r.text
    (item,) = r.json()["00081199"]["Value"]
    rt = pydicom.dcmread(rtdose, stop_before_pixels=True)
    assert item["00081155"]["Value"] == [rt.SOPInstanceUID] and item["00081196"]["Value"] == [0x0116]
    assert "00081198" not in r.json()

    stats = server.stats()
    assert stats["ingest"]["warned"] == 3 and stats["ingest"]["rejected"] == 0
    notes = {w["sop_instance_uid"]: w["warnings"] for w in stats["last_warnings"]}
    assert notes[LONG_UID] == ["SOPInstanceUID is longer than 64 characters (PS3.5 9.1)",
                               "StudyInstanceUID has a component with a leading zero (PS3.5 9.1)"]
    assert notes[rt.SOPInstanceUID] == ["MediaStorageSOPInstanceUID differs from SOPInstanceUID"]
    assert "accepted object" in server.log() and "Traceback" not in server.log()

    def stored() -> dict[str, bytes]:
        return {uid: dataset_part(_wado_instance(server, study, uid)) for uid in files}

    before = stored()
    assert before == {uid: dataset_part(f.read_bytes()) for uid, f in files.items()}
    stored_file = server.blobs_of(LONG_UID)
    assert len(stored_file) == 1  # under the dataset's whole UID, not the 64 characters DCMTK's command held
    meta = pydicom.dcmread(stored_file[0], stop_before_pixels=True).file_meta
    assert meta.MediaStorageSOPInstanceUID == LONG_UID
    def instances() -> list[dict[str, object]]:  # the Retrieve URL names the port, which a restart changes
        return [{k: v for k, v in i.items() if k != "00081190"}
                for i in server.get_json(f"/dicom-web/studies/{study}/instances")]

    before_rebuild = instances()
    server.stop()
    proc = run_bastion("index", "rebuild", "--data", server.data)
    assert proc.returncode == 0 and "3 with warnings" in proc.stdout, proc.stdout + proc.stderr
    server.start()
    assert instances() == before_rebuild and len(before_rebuild) == 2
    assert stored() == before


def test_a_thousand_levels_deep_object_is_refused_with_one_short_line(bastion: BastionServer) -> None:
    data, sop = nested_dataset(1000)
    dataset = dataset_part(data)
    lines = len(bastion.log().splitlines())
    status = raw_c_store(bastion, dataset, sop_class="1.2.840.10008.5.1.4.1.1.2", sop_uid=sop)
    assert status == 0xC000, hex(status)
    new = bastion.log().splitlines()[lines:]
    rejected = [line for line in new if "nested more than 64 deep" in line]
    assert len(rejected) == 1 and len(rejected[0]) < 300, new
    assert not any("Traceback" in line or "RecursionError" in line for line in new), new
    assert bastion.blobs_of(sop) == []
    echo = bastion.echo()
    assert "Received Echo Response (Success)" in echo.stdout
    body = b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--XyZ--\r\n"
    r = httpx.post(bastion.url("/dicom-web/studies"), content=body, timeout=30,
                   headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=XyZ'})
    assert r.status_code == 409 and r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
