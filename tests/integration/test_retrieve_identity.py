"""A retrieve that decompresses sends the same object: only the transfer syntax changes (PS3.4 C.4.2, C.4.3;
PS3.18 10.4), never the SOP Instance UID or any other identifying attribute.

Each of pydicom's compressed samples (JPEG baseline, extended and lossless, JPEG-LS, JPEG 2000, RLE) is stored
as it is, then retrieved by a peer that accepts only uncompressed syntaxes: C-GET from pynetdicom, C-MOVE to
DCMTK's storescp (without ``+xa``) and WADO-RS in its default syntax.
"""

from __future__ import annotations

import re
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import (
    BastionServer,
    StoreSCP,
    dcmtk_env,
    free_port,
    relabel_sample,
    requires_dcmtk,
    run_dcmtk,
    wait_for_port,
)
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

pytestmark = [requires_dcmtk, pytest.mark.timeout(180)]

#: pydicom samples in compressed syntaxes that decode here, one or more per codec family.
SAMPLES = (
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline (process 1), YBR_FULL_422
    "JPGExtended.dcm",  # JPEG extended (process 2 and 4), 12 bit
    "JPEG-LL.dcm",  # JPEG lossless (process 14, SV1)
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "JPEG2000.dcm",  # JPEG 2000
    "US1_J2KR.dcm",  # JPEG 2000 lossless, RGB
    "MR_small_RLE.dcm",  # RLE, 16 bit
    "SC_rgb_rle.dcm",  # RLE, RGB
)
UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
IDENTIFYING = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID")
PLAIN_AET = "PLAIN"


@dataclass(frozen=True)
class Sample:
    """One stored sample: its file and what identifies it."""

    name: str
    path: Path
    identity: dict[str, str]
    transfer_syntax: str


def identity_of(ds: Dataset) -> dict[str, str]:
    return {k: str(ds.get(k, "")) for k in IDENTIFYING}


@pytest.fixture(scope="module")
def plain_storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    """DCMTK storescp as it comes: it accepts Explicit/Implicit VR Little Endian (and Big Endian) only."""
    directory = tmp_path_factory.mktemp("plain-storescp") / "received"
    directory.mkdir()
    scp = StoreSCP(PLAIN_AET, free_port(), directory)
    with open(directory.parent / "storescp.log", "w") as log:
        scp.proc = subprocess.Popen(["/usr/bin/storescp", "-od", str(directory), "+B", "-aet", PLAIN_AET,
                                     str(scp.port)], env=dcmtk_env(), stdout=log, stderr=subprocess.STDOUT)
    wait_for_port(scp.port, proc=scp.proc)
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, plain_storescp: StoreSCP) -> Iterator[BastionServer]:
    bastion = BastionServer(tmp_path_factory.mktemp("identity") / "data",
                            remotes=[f"{PLAIN_AET}@127.0.0.1:{plain_storescp.port}"]).start()
    yield bastion
    bastion.stop()


@pytest.fixture(scope="module")
def samples(server: BastionServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Sample]:
    """Every sample under a study of its own, stored in its own compressed syntax (dcmsend proposes it)."""
    root = tmp_path_factory.mktemp("identity-samples")
    out: dict[str, Sample] = {}
    for i, name in enumerate(SAMPLES):
        path = relabel_sample(name, root, study_uid=generate_uid(prefix=None), patient_name=f"Identity^{i}",
                              patient_id=f"IDENT{i}")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ts = str(ds.file_meta.TransferSyntaxUID)
        assert ts not in UNCOMPRESSED and pydicom.uid.UID(ts).is_compressed, name
        proc = server.dcmsend(path)
        assert "with status SUCCESS  : 1" in proc.stdout, proc.stdout
        out[name] = Sample(name, path, identity_of(ds), ts)
    return out


def assert_same_object(sample: Sample, received: Dataset, how: str) -> None:
    """``received`` (a Part 10 dataset with its File Meta) is the stored object, decompressed."""
    meta = received.file_meta
    assert str(meta.TransferSyntaxUID) in UNCOMPRESSED, f"{how}: not converted ({meta.TransferSyntaxUID})"
    assert identity_of(received) == sample.identity, how
    assert str(meta.MediaStorageSOPInstanceUID) == str(received.SOPInstanceUID), how
    assert str(meta.MediaStorageSOPClassUID) == str(received.SOPClassUID), how
    original = pydicom.dcmread(sample.path)
    assert received.pixel_array.shape == original.pixel_array.shape, how


@pytest.mark.parametrize("name", SAMPLES)
def test_c_get_uncompressed_only_keeps_identity(server: BastionServer, samples: dict[str, Sample],
                                                name: str) -> None:
    sample = samples[name]
    received: list[bytes] = []

    def on_store(event: Any) -> int:
        received.append(event.encoded_dataset())  # File Meta from the C-STORE-RQ + the dataset as sent
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    sop_class = sample.identity["SOPClassUID"]
    ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(server.host, server.dicom_port, ae_title=server.aet,
                         ext_neg=[build_role(sop_class, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = sample.identity["StudyInstanceUID"]
    try:
        statuses = [status.Status for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
                    if status]
    finally:
        assoc.release()
        ae.shutdown()
    assert statuses and statuses[-1] == 0x0000, [hex(s) for s in statuses]
    (data,) = received
    assert_same_object(sample, pydicom.dcmread(DicomBytesIO(data)), "C-GET")


@pytest.mark.parametrize("name", SAMPLES)
def test_c_move_to_uncompressed_only_destination_keeps_identity(
        server: BastionServer, plain_storescp: StoreSCP, samples: dict[str, Sample], name: str) -> None:
    sample = samples[name]
    plain_storescp.clear()
    proc = run_dcmtk("movescu", "-v", "-S", "-aem", PLAIN_AET, "-k", "QueryRetrieveLevel=STUDY",
                     "-k", f"StudyInstanceUID={sample.identity['StudyInstanceUID']}", *server.addr(), timeout=90)
    assert re.search(r"Received Final Move Response \(Success\)", proc.stdout), proc.stdout
    (path,) = plain_storescp.files()
    assert_same_object(sample, pydicom.dcmread(path), "C-MOVE")


def wado_instance(server: BastionServer, sample: Sample) -> bytes:
    """WADO-RS RetrieveInstance with the default syntax (PS3.18 8.7.3.5.2: Explicit VR Little Endian)."""
    ident = sample.identity
    url = server.url(f"/dicom-web/studies/{ident['StudyInstanceUID']}/series/{ident['SeriesInstanceUID']}"
                     f"/instances/{ident['SOPInstanceUID']}")
    request = urllib.request.Request(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    with urllib.request.urlopen(request, timeout=60) as rsp:
        ctype, body = rsp.headers["Content-Type"], rsp.read()
    boundary = re.search(r'boundary="?([^";]+)"?', ctype)
    assert boundary, ctype
    parts = [p for p in body.split(b"--" + boundary.group(1).encode())[1:] if not p.startswith(b"--")]
    (part,) = parts
    return part.partition(b"\r\n\r\n")[2][:-2]


@pytest.mark.parametrize("name", SAMPLES)
def test_wado_rs_default_syntax_keeps_identity(server: BastionServer, samples: dict[str, Sample], name: str) -> None:
    sample = samples[name]
    received = pydicom.dcmread(DicomBytesIO(wado_instance(server, sample)))
    assert_same_object(sample, received, "WADO-RS")
