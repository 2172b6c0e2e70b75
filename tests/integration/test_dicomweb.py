"""DICOMweb (PS3.18) against a real server: uvicorn on a free port, an archive in a tmp dir.

pydicom's sample files are stored with STOW-RS (raw bytes, and through ``dicomweb-client``),
then searched (QIDO-RS), retrieved (WADO-RS, WADO-URI) and rendered; malformed requests
must answer 4xx with a message, never 500.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import uvicorn
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from bastion.archive import Archive
from bastion.settings import load_settings
from bastion.web.app import ServerStatus, create_app

FILES = {
    "ct": "CT_small.dcm",  # explicit VR LE, 128x128 16-bit
    "mr": "MR_small.dcm",  # explicit VR LE, 64x64
    "j2k": "JPEG2000.dcm",  # JPEG 2000, NM 1024x256
    "rle": "SC_rgb_rle.dcm",  # RLE, RGB 100x100
    "emri": "emri_small.dcm",  # 10 frames, native
    "jpegll": "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG lossless, US 8-bit
    "seg": "liver_expb.dcm",  # SEG, explicit VR big endian, 1-bit, 3 frames
}
EXPLICIT = "1.2.840.10008.1.2.1"
BOUNDARY = "test-boundary-1234"


@dataclass
class Sample:
    path: Path
    data: bytes
    ds: pydicom.Dataset

    @property
    def study(self) -> str:
        return str(self.ds.StudyInstanceUID)

    @property
    def series(self) -> str:
        return str(self.ds.SeriesInstanceUID)

    @property
    def sop(self) -> str:
        return str(self.ds.SOPInstanceUID)

    @property
    def instance_path(self) -> str:
        return f"/studies/{self.study}/series/{self.series}/instances/{self.sop}"


SAMPLES = {
    key: Sample(Path(get_testdata_file(name)), Path(get_testdata_file(name)).read_bytes(),
                pydicom.dcmread(get_testdata_file(name)))
    for key, name in FILES.items()
}


def multipart_body(parts: list[bytes], part_type: str = "application/dicom") -> bytes:
    """A STOW-RS body built by hand (independent of bastion.dicomweb.multipart)."""
    out = b""
    for p in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode() + p + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def parse_parts(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart response (checks it starts with the boundary line, as OHIF needs)."""
    ctype = response.headers["content-type"]
    boundary = [p.split("=", 1)[1].strip('"') for p in ctype.split(";") if p.strip().startswith("boundary=")][0]
    body = response.content
    assert body.startswith(f"--{boundary}\r\n".encode())
    chunks = body.split(f"--{boundary}".encode())
    out = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, content = chunk[2:].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        out.append(({k.lower(): v for k, v in headers.items()}, content[:-2]))
    return out


@dataclass
class Server:
    url: str
    archive: Archive
    http: httpx.Client

    @property
    def web(self) -> str:
        return self.url + "/dicom-web"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("dicomweb")
    archive = Archive.open(load_settings(env={}, data=str(data)))
    app = create_app(archive, ServerStatus(dicom_listening=True))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url + "/dicom-web", timeout=30) as http:
        r = http.post("/studies", content=multipart_body([s.data for s in SAMPLES.values()]),
                      headers={"Content-Type": STOW_TYPE})
        assert r.status_code == 200, r.text
        yield Server(url, archive, http)
    uv.should_exit = True
    thread.join(10)
    archive.close()


@pytest.fixture(scope="module")
def client(server: Server) -> DICOMwebClient:
    return DICOMwebClient(server.web)


def uids(results: list[dict], tag: str = "0020000D") -> set[str]:
    return {r[tag]["Value"][0] for r in results}


# -- STOW-RS ---------------------------------------------------------------------------------------------------

def test_stow_response_lists_every_stored_instance(server: Server) -> None:
    r = server.http.post("/studies", content=multipart_body([SAMPLES["ct"].data, SAMPLES["mr"].data]),
                         headers={"Content-Type": STOW_TYPE})  # duplicates: stored already, still success
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/dicom+json")
    refs = r.json()["00081199"]["Value"]
    assert [x["00081155"]["Value"][0] for x in refs] == [SAMPLES["ct"].sop, SAMPLES["mr"].sop]
    assert refs[0]["00081190"]["Value"][0].endswith(SAMPLES["ct"].instance_path)
    assert "00081198" not in r.json()


def test_stow_through_dicomweb_client(server: Server, client: DICOMwebClient) -> None:
    ds = pydicom.dcmread(SAMPLES["ct"].path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = "STOWCLIENT"
    result = client.store_instances([ds], study_instance_uid=ds.StudyInstanceUID)
    assert result.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    found = client.search_for_studies(search_filters={"PatientID": "STOWCLIENT"})
    assert uids(found) == {ds.StudyInstanceUID}


def test_stow_to_another_study_fails_each_instance(server: Server) -> None:
    other = generate_uid()
    r = server.http.post(f"/studies/{other}", content=multipart_body([SAMPLES["ct"].data]),
                         headers={"Content-Type": STOW_TYPE})
    assert r.status_code == 409
    failed = r.json()["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0xC409]
    assert failed["00081155"]["Value"] == [SAMPLES["ct"].sop]


def test_stow_partial_failure_is_202_with_reason(server: Server) -> None:
    ds = pydicom.dcmread(SAMPLES["mr"].path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    r = server.http.post("/studies", content=multipart_body([buf.getvalue(), b"not dicom at all" * 20]),
                         headers={"Content-Type": STOW_TYPE})
    assert r.status_code == 202
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert len(r.json()["00081199"]["Value"]) == 1


@pytest.mark.parametrize("ctype", ["application/dicom", "application/json",
                                   f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}'])
def test_stow_wrong_content_type_is_415(server: Server, ctype: str) -> None:
    r = server.http.post("/studies", content=multipart_body([SAMPLES["ct"].data]), headers={"Content-Type": ctype})
    assert r.status_code == 415
    assert r.json()["error"]


@pytest.mark.parametrize("body,ctype", [
    (multipart_body([SAMPLES["ct"].data])[:-40], STOW_TYPE),  # truncated before the closing boundary
    (b"no boundary anywhere", STOW_TYPE),
    (b"", STOW_TYPE),
    (multipart_body([b"x"]), 'multipart/related; type="application/dicom"'),  # no boundary parameter
])
def test_stow_malformed_multipart_is_400(server: Server, body: bytes, ctype: str) -> None:
    r = server.http.post("/studies", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 400
    assert r.json()["error"]


# -- QIDO-RS ---------------------------------------------------------------------------------------------------

def test_search_all_studies_with_default_and_computed_attributes(server: Server) -> None:
    r = server.http.get("/studies")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/dicom+json")
    by_uid = {s["0020000D"]["Value"][0]: s for s in r.json()}
    assert {s.study for s in SAMPLES.values()} <= set(by_uid)
    ct = by_uid[SAMPLES["ct"].study]
    assert ct["00080061"]["Value"] == ["CT"]  # ModalitiesInStudy
    assert ct["00201208"]["Value"] == [1]  # NumberOfStudyRelatedInstances
    assert ct["00201206"]["Value"] == [1]  # NumberOfStudyRelatedSeries
    assert ct["00100020"]["Value"] == ["1CT1"]
    assert ct["00081190"]["Value"][0] == f"{server.web}/studies/{SAMPLES['ct'].study}"
    assert "00081030" not in ct or ct["00081030"]["vr"] == "LO"


@pytest.mark.parametrize("params,expected", [
    ({"PatientName": "CompressedSamples*"}, {"ct", "mr", "j2k"}),
    ({"PatientName": "compressedsamples^ct1"}, {"ct"}),  # person names match regardless of case
    ({"00100020": "4MR1"}, {"mr"}),  # by tag
    ({"StudyDate": "20040101-20041231"}, {"ct", "mr", "j2k"}),  # range
    ({"StudyDate": "-20010101"}, {"emri"}),
    ({"ModalitiesInStudy": "NM"}, {"j2k"}),
    ({"PatientName": "samples", "fuzzymatching": "true"}, set()),
    ({"PatientName": "compressed", "fuzzymatching": "true"}, {"ct", "mr", "j2k"}),
])
def test_search_studies_matching(server: Server, params: dict, expected: set[str]) -> None:
    r = server.http.get("/studies", params=params)
    assert r.status_code == 200, r.text
    found = uids(r.json()) & {s.study for s in SAMPLES.values()}
    assert found == {SAMPLES[k].study for k in expected}


def test_search_studies_by_uid_list_with_encoded_comma(server: Server) -> None:
    a, b = SAMPLES["ct"].study, SAMPLES["rle"].study
    r = server.http.get(f"/studies?StudyInstanceUID={a}%2C{b}")
    assert uids(r.json()) == {a, b}
    r = server.http.get("/studies", params={"StudyInstanceUID": f"{a}\\{b}"})
    assert uids(r.json()) == {a, b}


def test_search_empty_result_is_200_empty_list(server: Server) -> None:
    r = server.http.get("/studies", params={"PatientID": "NOBODY"})
    assert r.status_code == 200 and r.json() == []


def test_includefield_list_and_all(server: Server) -> None:
    study = SAMPLES["ct"].study
    r = server.http.get(f"/studies?StudyInstanceUID={study}&includefield=00080020%2CInstitutionName")
    (result,) = r.json()
    assert "00080020" in result and "00100010" in result
    r = server.http.get("/studies", params={"StudyInstanceUID": study, "includefield": "all"})
    (full,) = r.json()
    assert "00080062" in full  # SOPClassesInStudy is not a default attribute
    assert "00080062" not in result


def test_limit_and_offset_page_through_results(server: Server) -> None:
    everything = server.http.get("/studies").json()
    pages = []
    for offset in range(0, len(everything), 2):
        page = server.http.get("/studies", params={"limit": 2, "offset": offset}).json()
        assert len(page) <= 2
        pages += page
    assert uids(pages) == uids(everything) and len(pages) == len(everything)


def test_search_series_and_instances(server: Server, client: DICOMwebClient) -> None:
    mr = SAMPLES["mr"]
    series = server.http.get(f"/studies/{mr.study}/series").json()
    assert uids(series, "0020000E") == {mr.series}
    assert series[0]["00080060"]["Value"] == ["MR"]
    assert series[0]["00201209"]["Value"] == [1]
    assert series[0]["00081190"]["Value"][0].endswith(f"/studies/{mr.study}/series/{mr.series}")
    mr_series = server.http.get("/series", params={"Modality": "MR"}).json()
    assert {mr.series, SAMPLES["emri"].series} <= uids(mr_series, "0020000E")
    assert "0020000D" in mr_series[0] and "00100010" in mr_series[0]  # study attributes without a study
    inst = server.http.get(f"/studies/{mr.study}/series/{mr.series}/instances").json()
    assert uids(inst, "00080018") == {mr.sop}
    assert inst[0]["00083002"]["Value"] == [EXPLICIT]  # AvailableTransferSyntaxUID
    assert inst[0]["00280010"]["Value"] == [64]
    emri = client.search_for_instances(study_instance_uid=SAMPLES["emri"].study)
    assert emri[0]["00280008"]["Value"] == [10]
    every = client.search_for_instances(search_filters={"SOPClassUID": str(SAMPLES["j2k"].ds.SOPClassUID)})
    assert SAMPLES["j2k"].sop in uids(every, "00080018")
    assert client.search_for_series(SAMPLES["rle"].study)[0]["0020000E"]["Value"] == [SAMPLES["rle"].series]


def test_dicomweb_client_search_for_studies(client: DICOMwebClient) -> None:
    found = client.search_for_studies(search_filters={"PatientName": "Lestrade*"},
                                      fields=["StudyDescription"], limit=5)
    assert uids(found) == {SAMPLES["rle"].study}


@pytest.mark.parametrize("query", [
    "limit=100000", "limit=-1", "limit=abc", "offset=x", "fuzzymatching=maybe",
    "NoSuchKeyword=1", "includefield=NoSuchKeyword", "Modality=CT",  # Modality is not a study key
    "StudyInstanceUID=1.2.abc", "StudyDate=2004", "00400275.00401001=X",
])
def test_bad_search_parameters_are_400(server: Server, query: str) -> None:
    r = server.http.get(f"/studies?{query}")
    assert r.status_code == 400, r.text
    assert r.json()["error"]


def test_bad_uid_in_search_path_is_400(server: Server) -> None:
    assert server.http.get("/studies/1.02.x/series").status_code == 400


def test_search_and_metadata_only_in_json(server: Server) -> None:
    assert server.http.get("/studies", headers={"Accept": "application/dicom+xml"}).status_code == 406
    ct = SAMPLES["ct"]
    assert server.http.get(f"{ct.instance_path}/metadata", headers={"Accept": "application/dicom+xml"}
                           ).status_code == 406


# -- WADO-RS ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", list(FILES))
@pytest.mark.parametrize("quote", ['"', ""])
def test_retrieve_instance_as_stored_is_byte_identical(server: Server, key: str, quote: str) -> None:
    s = SAMPLES[key]
    accept = f"multipart/related; type={quote}application/dicom{quote}; transfer-syntax=*"
    r = server.http.get(s.instance_path, headers={"Accept": accept})
    assert r.status_code == 200
    (headers, body), = parse_parts(r)
    assert body == s.data
    assert f"transfer-syntax={s.ds.file_meta.TransferSyntaxUID}" in headers["content-type"]


def test_retrieve_study_and_series_with_dicomweb_client(server: Server, client: DICOMwebClient) -> None:
    emri = SAMPLES["emri"]
    study = client.retrieve_study(emri.study, media_types=(("application/dicom", "*"),))
    assert [str(d.SOPInstanceUID) for d in study] == [emri.sop]
    series = client.retrieve_series(emri.study, emri.series)
    assert series[0].NumberOfFrames == 10
    inst = client.retrieve_instance(emri.study, emri.series, emri.sop)
    assert inst.pixel_array.shape == (10, 64, 64)


def test_retrieve_default_syntax_decompresses(server: Server) -> None:
    j2k = SAMPLES["j2k"]
    r = server.http.get(f"/studies/{j2k.study}", headers={"Accept": 'multipart/related; type="application/dicom"'})
    (headers, body), = parse_parts(r)
    assert f"transfer-syntax={EXPLICIT}" in headers["content-type"]
    ds = pydicom.dcmread(io.BytesIO(body))
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT
    assert (ds.pixel_array == j2k.ds.pixel_array).all()


@pytest.mark.parametrize("accept", [
    'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50',
    "text/html",
    'multipart/related; type="application/octet-stream"',
])
def test_retrieve_unsatisfiable_accept_is_406(server: Server, accept: str) -> None:
    r = server.http.get(SAMPLES["ct"].instance_path, headers={"Accept": accept})
    assert r.status_code == 406
    assert r.json()["error"]


def test_retrieve_unknown_and_invalid_uids(server: Server) -> None:
    assert server.http.get(f"/studies/{generate_uid()}").status_code == 404
    ct = SAMPLES["ct"]
    assert server.http.get(f"/studies/{ct.study}/series/{generate_uid()}/metadata").status_code == 404
    r = server.http.get("/studies/1..4")
    assert r.status_code == 400 and "UID" in r.json()["error"]
    # a leading zero breaks PS3.5 9.1, but ingest accepts such a UID (with a warning): a lookup may name one
    assert server.http.get("/studies/1.2.03.4").status_code == 404


def test_metadata_with_bulk_data_uris(server: Server, client: DICOMwebClient) -> None:
    ct = SAMPLES["ct"]
    (m,) = client.retrieve_series_metadata(ct.study, ct.series)
    assert m["00080018"]["Value"] == [ct.sop]
    # dicomweb-client sends "Host: 127.0.0.1" without the port, so check the URI with httpx.
    (m,) = server.http.get(f"/studies/{ct.study}/series/{ct.series}/metadata").json()
    assert m["00100010"]["Value"] == [{"Alphabetic": "CompressedSamples^CT1"}]
    uri = m["7FE00010"]["BulkDataURI"]
    assert uri == f"{server.web}{ct.instance_path}/bulkdata/7FE00010"
    r = server.http.get(uri.removeprefix(server.web), headers={"Accept": "application/octet-stream"})
    assert r.status_code == 200 and r.content == ct.ds.PixelData
    study_meta = server.http.get(f"/studies/{SAMPLES['emri'].study}/metadata").json()
    assert study_meta[0]["00280008"]["Value"] == [10]
    cache = server.archive.settings.data / "cache" / "metadata"
    assert list(cache.rglob("*.json"))


def test_bulkdata_range_requests(server: Server, client: DICOMwebClient) -> None:
    ct = SAMPLES["ct"]
    path = f"{ct.instance_path}/bulkdata/7FE00010"
    size = len(ct.ds.PixelData)
    r = server.http.get(path, headers={"Accept": "application/octet-stream", "Range": "bytes=10-19"})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes 10-19/{size}"
    assert r.content == ct.ds.PixelData[10:20]
    r = server.http.get(path, headers={"Accept": "application/octet-stream", "Range": "bytes=-4"})
    assert r.status_code == 206 and r.content == ct.ds.PixelData[-4:]
    r = server.http.get(path, headers={"Accept": "application/octet-stream", "Range": f"bytes={size}-"})
    assert r.status_code == 416
    parts = client.retrieve_bulkdata(server.web + path, byte_range=(0, 99))
    assert parts == [ct.ds.PixelData[:100]]
    assert server.http.get(f"{ct.instance_path}/bulkdata/7FE0").status_code == 400
    assert server.http.get(f"{ct.instance_path}/bulkdata/00091234").status_code == 404


def test_metadata_of_a_large_series_is_answered_from_the_cache(server: Server) -> None:
    base = pydicom.dcmread(SAMPLES["mr"].path)
    series, study = generate_uid(), generate_uid()
    parts, uids = [], []
    for n in range(200):
        base.StudyInstanceUID, base.SeriesInstanceUID, base.SOPInstanceUID = study, series, generate_uid()
        uids.append(base.SOPInstanceUID)
        base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
        base.InstanceNumber = n + 1
        buf = io.BytesIO()
        base.save_as(buf, enforce_file_format=True)
        parts.append(buf.getvalue())
    r = server.http.post(f"/studies/{study}", content=multipart_body(parts), headers={"Content-Type": STOW_TYPE})
    assert r.status_code == 200 and len(r.json()["00081199"]["Value"]) == 200
    url = f"/studies/{study}/series/{series}/metadata"
    first = server.http.get(url)
    assert first.status_code == 200 and len(first.json()) == 200
    # Cached: answered again with none of the 200 stored objects readable.
    stored = [Path(server.archive.blobs.stores[0].path_of(server.archive.index.current(uid).blob_key)) for uid in uids]
    for path in stored:
        path.rename(path.with_name(path.name + ".away"))
    try:
        again = server.http.get(url)
    finally:
        for path in stored:
            path.with_name(path.name + ".away").rename(path)
    assert again.status_code == 200
    assert again.json() == first.json()


def test_frames_native_and_compressed(server: Server) -> None:
    emri, j2k = SAMPLES["emri"], SAMPLES["j2k"]
    ohif = "multipart/related; type=application/octet-stream; transfer-syntax=*"
    r = server.http.get(f"{emri.instance_path}/frames/1,3", headers={"Accept": ohif})
    assert r.status_code == 200
    parts = parse_parts(r)
    frame_size = 64 * 64 * 2
    assert [body for _, body in parts] == [emri.ds.PixelData[:frame_size],
                                           emri.ds.PixelData[2 * frame_size: 3 * frame_size]]
    assert "transfer-syntax=1.2.840.10008.1.2.1" in parts[0][0]["content-type"]
    quoted = 'multipart/related; type="application/octet-stream"; transfer-syntax="*"'
    r = server.http.get(f"{j2k.instance_path}/frames/1", headers={"Accept": quoted})
    (headers, body), = parse_parts(r)
    assert headers["content-type"] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.91"
    assert body.startswith(b"\xff\x4f\xff\x51")  # a JPEG 2000 codestream, as stored
    explicit = f"multipart/related; type=application/octet-stream; transfer-syntax={EXPLICIT}"
    r = server.http.get(f"{j2k.instance_path}/frames/1", headers={"Accept": explicit})
    (headers, body), = parse_parts(r)
    assert f"transfer-syntax={EXPLICIT}" in headers["content-type"]
    assert body == j2k.ds.pixel_array.astype("<u2").tobytes()


def test_frames_of_a_big_endian_bit_packed_segmentation(server: Server) -> None:
    little = pydicom.dcmread(get_testdata_file("liver.dcm"))  # the same segmentation, little endian
    r = server.http.get(f"{SAMPLES['seg'].instance_path}/frames/2,3",
                        headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"})
    parts = parse_parts(r)
    assert f"transfer-syntax={EXPLICIT}" in parts[0][0]["content-type"]
    size = 512 * 512 // 8
    assert [b for _, b in parts] == [little.PixelData[size: 2 * size], little.PixelData[2 * size: 3 * size]]


def test_compressed_frames_under_their_image_media_type(server: Server) -> None:
    r = server.http.get(f"{SAMPLES['jpegll'].instance_path}/frames/1",
                        headers={"Accept": 'multipart/related; type="image/jpeg"'})
    (headers, body), = parse_parts(r)
    assert headers["content-type"] == "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.70"
    assert body.startswith(b"\xff\xd8")


def test_frames_with_dicomweb_client(server: Server, client: DICOMwebClient) -> None:
    rle = SAMPLES["rle"]
    frames = client.retrieve_instance_frames(rle.study, rle.series, rle.sop, [1],
                                             media_types=(("application/octet-stream", "*"),))
    assert frames[0][:4] == b"\x03\x00\x00\x00"  # an RLE header with three segments


@pytest.mark.parametrize("frames,status", [("99", 404), ("0", 400), ("1,x", 400)])
def test_bad_frame_numbers(server: Server, frames: str, status: int) -> None:
    r = server.http.get(f"{SAMPLES['emri'].instance_path}/frames/{frames}")
    assert r.status_code == status, r.text


def _image(r: httpx.Response) -> Image.Image:
    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(r.content))


def test_rendered_instance_jpeg_png_window_viewport(server: Server) -> None:
    ct = SAMPLES["ct"]
    img = _image(server.http.get(f"{ct.instance_path}/rendered"))
    assert img.format == "JPEG" and img.size == (128, 128)
    img = _image(server.http.get(f"{ct.instance_path}/rendered", params={"viewport": "64,64", "window": "40,400"},
                                 headers={"Accept": "image/png"}))
    assert img.format == "PNG" and img.size == (64, 64)
    bright = _image(server.http.get(f"{ct.instance_path}/rendered", params={"window": "-1000,10"}))
    dark = _image(server.http.get(f"{ct.instance_path}/rendered", params={"window": "5000,10", "quality": "50"}))
    assert np.asarray(bright.convert("L")).sum() > np.asarray(dark.convert("L")).sum()
    rgb = _image(server.http.get(f"{SAMPLES['rle'].instance_path}/rendered"))
    assert rgb.mode == "RGB"
    frame = _image(server.http.get(f"{SAMPLES['emri'].instance_path}/frames/2/rendered"))
    assert frame.size == (64, 64)


def test_rendered_and_thumbnail_at_every_level(server: Server) -> None:
    j2k = SAMPLES["j2k"]
    for path in (f"/studies/{j2k.study}", f"/studies/{j2k.study}/series/{j2k.series}", j2k.instance_path):
        assert _image(server.http.get(f"{path}/rendered")).size == (256, 1024)
        thumb = _image(server.http.get(f"{path}/thumbnail"))
        assert max(thumb.size) == 128


@pytest.mark.parametrize("query,accept,status", [
    ("window=abc", "image/jpeg", 400),
    ("window=40,0", "image/jpeg", 400),
    ("window=nan,inf", "image/jpeg", 400),
    ("viewport=0,10", "image/jpeg", 400),
    ("quality=101", "image/jpeg", 400),
    ("", "image/gif", 406),
])
def test_bad_rendered_requests(server: Server, query: str, accept: str, status: int) -> None:
    r = server.http.get(f"{SAMPLES['ct'].instance_path}/rendered?{query}", headers={"Accept": accept})
    assert r.status_code == status


# -- WADO-URI --------------------------------------------------------------------------------------------------

def test_wado_uri(server: Server) -> None:
    j2k = SAMPLES["j2k"]
    q = {"requestType": "WADO", "studyUID": j2k.study, "seriesUID": j2k.series, "objectUID": j2k.sop}
    r = httpx.get(f"{server.url}/wado", params={**q, "contentType": "application/dicom", "transferSyntax": "*"})
    assert r.status_code == 200 and r.content == j2k.data
    r = httpx.get(f"{server.url}/wado", params={**q, "contentType": "application/dicom"})
    assert pydicom.dcmread(io.BytesIO(r.content)).file_meta.TransferSyntaxUID == EXPLICIT
    img = _image(httpx.get(f"{server.url}/wado", params=q))
    assert img.format == "JPEG"
    img = _image(httpx.get(f"{server.url}/wado", params={**q, "contentType": "image/png", "rows": "128"}))
    assert img.format == "PNG" and img.size == (32, 128)
    assert httpx.get(f"{server.url}/wado", params={**q, "contentType": "text/plain"}).status_code == 406
    assert httpx.get(f"{server.url}/wado", params={**q, "objectUID": generate_uid()}).status_code == 404
    missing = {k: v for k, v in q.items() if k != "seriesUID"}
    r = httpx.get(f"{server.url}/wado", params=missing)
    assert r.status_code == 400 and "seriesUID" in r.json()["error"]
    assert httpx.get(f"{server.url}/wado", params={**q, "requestType": "X"}).status_code == 400


def test_no_client_mistake_is_a_server_error(server: Server) -> None:
    ct = SAMPLES["ct"]
    for path in ("/studies/x/metadata", f"{ct.instance_path}/frames/", f"{ct.instance_path}/bulkdata/zz",
                 f"{ct.instance_path}/thumbnail?viewport=a,b", "/instances?Rows=abc",
                 f"/studies/{ct.study}/instances?SOPInstanceUID=1.2,x"):
        r = server.http.get(path)
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
    r = server.http.get(ct.instance_path, headers={"Accept": 'multipart/related; type="application/dicom"; '
                                                             "transfer-syntax=bogus"})
    assert r.status_code == 400
    json.dumps(server.http.get("/studies").json())
