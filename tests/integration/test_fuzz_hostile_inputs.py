"""Hostile inputs a fuzzer finds only by luck, each with the answer it must get from a running ``bastion serve``.

* UIDs with path characters (``../``, ``/``, NUL, backslash) in WADO-RS, QIDO-RS, STOW-RS and WADO-URI URLs (sent
  byte for byte, without a client's path normalisation): 400 or 404, never an object or a 5xx; in the UID
  attributes of a stored dataset (STOW-RS and C-STORE): refused, 0xC000 (PS3.5 9.1: a UID is digits and dots);
* SQL-looking values (``' OR 1=1 --``, ``%``, ``_``) in QIDO-RS and C-FIND keys: matched as the literal text
  they are (PS3.4 C.2.2.2), with ``*`` and ``?`` the only wildcards;
* absurd ``limit`` / ``offset``: 400;
* a dataset whose sequences nest 10,000 levels deep, by STOW-RS and by C-STORE: refused with 0xC000, no
  recursion blow-up;
* a 100 KB ``Accept`` or ``Content-Type`` header, a QIDO-RS with 10,000 ``includefield`` values: a clear 4xx or
  the right answer.

After each: the objects stored before are unchanged, and the server answers ``/health`` and C-ECHO with no
traceback in its log.
"""

from __future__ import annotations

import io
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from conftest import BastionServer, dataset_part, make_study, requires_dcmtk
from fuzzing import StoreSnapshot, encode_parts, first_traceback, snapshot
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from test_fuzz_dimse import (
    A_ASSOCIATE_AC,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    P_DATA_TF,
    c_store_rq,
    exchange,
    good_associate_rq,
)

pytestmark = [requires_dcmtk, pytest.mark.timeout(300)]

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=b'
CANNOT_UNDERSTAND = 0xC000
FAILURE_REASON, FAILED = "00081197", "00081198"


class Hostile:
    """The module's server, the study it holds, and what it held at the start."""

    def __init__(self, server: BastionServer, study_uid: str, series_uid: str, sop_uid: str, files: list[Path]):
        self.server, self.study_uid, self.series_uid, self.sop_uid, self.files = (server, study_uid, series_uid,
                                                                                  sop_uid, files)
        self.before: StoreSnapshot = snapshot(server)

    def intact(self) -> None:
        """The objects stored at the start are unchanged, and the server is well."""
        later = snapshot(self.server)
        assert not self.before.unchanged_in(later), self.before.unchanged_in(later)
        assert self.server.get_json("/health")["status"] == "ok"
        assert self.server.echo().returncode == 0
        assert not first_traceback(self.server.log()), first_traceback(self.server.log())


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    work = tmp_path_factory.mktemp("hostile")
    server = BastionServer(work / "data").start()
    names = [("P'1", "O'Brien^Liam"), ("P%1", "Percent^Pat"), ("P_1", "Under^Score"), ("PX1", "Plain^Pat")]
    first = None
    for pid, name in names:
        study = make_study(work / pid.replace("%", "pc"), series=1, per_series=1, patient_id=pid, patient_name=name)
        assert server.storescu(*study.files).returncode == 0
        first = first or study
    assert first is not None
    series_uid = next(iter(first.series))
    yield Hostile(server, first.study_uid, series_uid, first.sop_uids[0], first.files)
    server.stop()


def raw_http(server: BastionServer, request: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request sent byte for byte (no client normalises its path); the status and body."""
    got = b""
    with socket.create_connection((server.host, server.http_port), timeout=60) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before the whole request was read: the answer is still to be read
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass  # the rest of a refused request reset the connection after the answer
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), f"no HTTP answer: {got[:200]!r}"
    return int(head.split(b" ", 2)[1]), body


def raw_get(server: BastionServer, target: str, headers: str = "") -> tuple[int, bytes]:
    return raw_http(server, f"GET {target} HTTP/1.1\r\nHost: bastion\r\n{headers}Connection: close\r\n\r\n".encode())


# -- UIDs with path characters ----------------------------------------------------------------------------------
BAD_UIDS = ["..", "../..", "../../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "1.2%2F3", "1.2%003",
            "1.2%5C3", "1.2\\3", "%00", "1.2/../3"]


@pytest.mark.parametrize("uid", BAD_UIDS)
def test_path_characters_in_url_uids_are_refused(hostile: Hostile, uid: str) -> None:
    study, series, sop = hostile.study_uid, hostile.series_uid, hostile.sop_uid
    targets = [f"/dicom-web/studies/{uid}", f"/dicom-web/studies/{uid}/metadata", f"/dicom-web/studies/{uid}/series",
               f"/dicom-web/studies/{study}/series/{uid}", f"/dicom-web/studies/{study}/series/{series}/instances/{uid}",
               f"/dicom-web/studies/{study}/series/{series}/instances/{uid}/frames/1",
               f"/dicom-web/studies/{study}/series/{uid}/instances", f"/dicom-web/studies/{uid}/series/{series}/instances/{sop}",
               f"/wado?requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={uid}"]
    for target in targets:
        status, body = raw_get(hostile.server, target, "Accept: */*\r\n")
        assert status in (400, 404), (target, status, body[:200])
    body = encode_parts("b", [([("Content-Type", "application/dicom")], hostile.files[0].read_bytes())])
    status, answer = raw_http(hostile.server, (f"POST /dicom-web/studies/{uid} HTTP/1.1\r\nHost: bastion\r\n"
                                               f"Content-Type: {STOW_TYPE}\r\nContent-Length: {len(body)}\r\n"
                                               "Connection: close\r\n\r\n").encode() + body)
    assert status in (400, 404, 405, 409), (uid, status, answer[:300])
    hostile.intact()


def _with_uid(source: Path, keyword: str, uid: str) -> bytes:
    ds = pydicom.dcmread(source)
    if keyword == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = uid
    else:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    setattr(ds, keyword, uid)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


DATASET_UIDS = ["../../x", "1.2/3", "/etc/passwd", "1.2.3/../../../../tmp/evil", "1.2\\3", "1.2\x003", "..", "."]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_path_characters_in_dataset_uids_are_refused_by_stow(hostile: Hostile, keyword: str) -> None:
    for uid in DATASET_UIDS:
        body = encode_parts("b", [([("Content-Type", "application/dicom")], _with_uid(hostile.files[0], keyword, uid))])
        r = httpx.post(hostile.server.url("/dicom-web/studies"), content=body, timeout=60,
                       headers={"Content-Type": STOW_TYPE, "Accept": "application/dicom+json"})
        assert r.status_code == 409, (uid, r.status_code, r.text[:300])
        failed = r.json()[FAILED]["Value"]
        assert [item[FAILURE_REASON]["Value"][0] for item in failed] == [CANNOT_UNDERSTAND], (uid, failed)
        if keyword == "SOPInstanceUID":  # the failure names the instance as sent, one value (found by this test),
            sent = uid if uid.isprintable() else uid.encode("unicode_escape").decode()  # control characters escaped
            assert failed[0]["00081155"]["Value"] == [sent], failed
    hostile.intact()


def _pdvs(context: int, control_last: int, data: bytes, size: int = 16_000) -> bytes:
    """P-DATA-TF PDUs carrying ``data`` in fragments of ``size`` (PS3.8 9.3.5, E.2); ``control_last`` is the
    message control header of the last fragment (0x03 command, 0x02 dataset)."""
    out = b""
    for at in range(0, max(len(data), 1), size):
        piece = data[at:at + size]
        control = control_last if at + size >= len(data) else control_last & 0x01
        out += struct.pack(">BxIIBB", P_DATA_TF, len(piece) + 6, len(piece) + 2, context, control) + piece
    return out


def c_store_status(server: BastionServer, sop_uid: str, dataset: bytes) -> int:
    """C-STORE ``dataset`` (Explicit VR Little Endian, CT Image Storage, presentation context 3) from a raw client
    and return the C-STORE-RSP status (PS3.7 9.3.1.2)."""
    then = _pdvs(3, 0x03, c_store_rq(sop_uid)) + _pdvs(3, 0x02, dataset) + struct.pack(">BxI4x", A_RELEASE_RQ, 4)
    answer = exchange(server.host, server.dicom_port, good_associate_rq(), then, until=A_RELEASE_RP)
    assert answer[0] == A_ASSOCIATE_AC, answer[:20]
    status_element = struct.pack("<HHI", 0x0000, 0x0900, 2)
    at = answer.find(status_element)
    assert at > 0, answer[:400]
    return int(struct.unpack_from("<H", answer, at + 8)[0])


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("uid", DATASET_UIDS)
def test_path_characters_in_dataset_uids_are_refused_by_c_store(hostile: Hostile, uid: str) -> None:
    data = dataset_part(_with_uid(hostile.files[0], "SOPInstanceUID", uid))
    status = c_store_status(hostile.server, uid, data)
    assert status == CANNOT_UNDERSTAND, hex(status)
    hostile.intact()


# -- log injection -----------------------------------------------------------------------------------------------
FORGED = "2026-01-01 00:00:00,000 CRITICAL bastion: FORGED"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_newline_in_a_uid_or_ae_title_forges_no_log_line(hostile: Hostile) -> None:
    """A SOP Instance UID sent by STOW-RS and a calling AE title sent in an A-ASSOCIATE-RQ, each holding a newline
    and a whole log line: the log shows them escaped, on the line that names them (found by this test: both
    wrote the forged line into the log as a line of its own)."""
    body = encode_parts("b", [([("Content-Type", "application/dicom")],
                               _with_uid(hostile.files[0], "SOPInstanceUID", "1.2\n" + FORGED))])
    r = httpx.post(hostile.server.url("/dicom-web/studies"), content=body, timeout=60,
                   headers={"Content-Type": STOW_TYPE, "Accept": "application/dicom+json"})
    assert r.status_code == 409, r.text[:300]
    rq = bytearray(good_associate_rq())
    rq[26:42] = b"X\nCRITICAL FAKE!"  # the calling AE title (PS3.8 9.3.2)
    exchange(hostile.server.host, hostile.server.dicom_port, bytes(rq), struct.pack(">BxI4x", A_RELEASE_RQ, 4),
             until=A_RELEASE_RP)
    lines = hostile.server.log().splitlines()
    assert not [line for line in lines if line.startswith(FORGED) or line.startswith("CRITICAL FAKE")], lines[-20:]
    hostile.intact()


# -- SQL-looking keys ---------------------------------------------------------------------------------------------
#: PatientID value: the patients it must match, of P'1, P%1, P_1 and PX1.
KEYS = {"' OR 1=1 --": set(), "' OR '1'='1": set(), "%": set(), "_": set(), "P%1": {"P%1"}, "P_1": {"P_1"},
        "P'1": {"P'1"}, "P%": set(), "P_": set(), "P*": {"P'1", "P%1", "P_1", "PX1"},
        "P?1": {"P'1", "P%1", "P_1", "PX1"}, "*'*": {"P'1"}, "*%*": {"P%1"}, "*_*": {"P_1"}, "P'1'; DROP TABLE studies; --": set(),
        "\\": set()}


def test_sql_looking_qido_keys_match_literally(hostile: Hostile) -> None:
    for value, expected in KEYS.items():
        r = httpx.get(hostile.server.url("/dicom-web/studies"), params={"PatientID": value, "includefield": "PatientID"},
                      timeout=60)
        assert r.status_code == 200, (value, r.status_code, r.text[:300])
        assert {s["00100020"]["Value"][0] for s in r.json()} == expected, value
    r = httpx.get(hostile.server.url("/dicom-web/studies"), params={"PatientName": "O'Brien*"}, timeout=60)
    assert [s["00100020"]["Value"][0] for s in r.json()] == ["P'1"]
    hostile.intact()


def test_sql_looking_c_find_keys_match_literally(hostile: Hostile, tmp_path: Path) -> None:
    for value, expected in KEYS.items():
        if value == "\\":
            continue  # findscu takes a backslash as a value separator
        proc, responses = hostile.server.find({"QueryRetrieveLevel": "STUDY", "PatientID": value},
                                              out=tmp_path / "find")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert {str(ds.PatientID) for ds in responses} == expected, value
    hostile.intact()


# -- limit and offset ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["-1", "-0", "99999999999", "9" * 5000, "abc", "1e3", "1.5", " 5", "+5", "1_0",
                                   "\u0663", "0x10", ""])
@pytest.mark.parametrize("name", ["limit", "offset"])
def test_absurd_limit_and_offset_are_refused(hostile: Hostile, name: str, value: str) -> None:
    """Negative, huge or not plain decimal digits: 400 (found by this test: " 5", "+5", "1_0" and other scripts'
    digits were taken, as Python's int() takes them)."""
    r = httpx.get(hostile.server.url("/dicom-web/studies"), params={name: value}, timeout=60)
    assert r.status_code == 400, (name, value, r.status_code, r.text[:200])
    assert "error" in r.json()


def test_limit_and_offset_page_through_the_studies(hostile: Hostile) -> None:
    url = hostile.server.url("/dicom-web/studies")
    every = [s["0020000D"]["Value"][0] for s in httpx.get(url, timeout=60).json()]
    paged: list[str] = []
    while page := httpx.get(url, params={"limit": "2", "offset": str(len(paged))}, timeout=60).json():
        assert len(page) <= 2
        paged += [s["0020000D"]["Value"][0] for s in page]
    assert sorted(paged) == sorted(every) and len(every) >= 4
    assert httpx.get(url, params={"limit": "0"}, timeout=60).json() == []
    assert httpx.get(url, params={"offset": "2147483647"}, timeout=60).json() == []


# -- deeply nested sequences -----------------------------------------------------------------------------------
def nested(depth: int) -> tuple[str, bytes]:
    """A CT Image Storage dataset (Part 10, Explicit VR Little Endian) whose Content Sequence nests ``depth`` levels
    deep, in undefined lengths (PS3.5 7.5.2); its SOP Instance UID and bytes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CT_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "DEEP", "Deep^Nest", "CT"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    opening = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000,
                                                                                         0xFFFFFFFF)
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return str(ds.SOPInstanceUID), buf.getvalue() + opening * depth + closing * depth


@pytest.mark.parametrize("depth", [65, 1_000, 10_000])
def test_deeply_nested_sequences_are_refused(hostile: Hostile, depth: int) -> None:
    sop, data = nested(depth)
    body = encode_parts("b", [([("Content-Type", "application/dicom")], data)])
    r = httpx.post(hostile.server.url("/dicom-web/studies"), content=body, timeout=120,
                   headers={"Content-Type": STOW_TYPE, "Accept": "application/dicom+json"})
    assert r.status_code == 409, (r.status_code, r.text[:300])
    assert r.json()[FAILED]["Value"][0][FAILURE_REASON]["Value"] == [CANNOT_UNDERSTAND]
    assert c_store_status(hostile.server, sop, dataset_part(data)) == CANNOT_UNDERSTAND
    hostile.intact()


def test_nesting_within_the_bound_is_stored(hostile: Hostile) -> None:
    """The control: 60 levels (under the bound of 64) is stored, by both ways."""
    sop, data = nested(60)
    body = encode_parts("b", [([("Content-Type", "application/dicom")], data)])
    r = httpx.post(hostile.server.url("/dicom-web/studies"), content=body, timeout=120,
                   headers={"Content-Type": STOW_TYPE, "Accept": "application/dicom+json"})
    assert r.status_code == 200, (r.status_code, r.text[:300])
    sop, data = nested(60)
    assert c_store_status(hostile.server, sop, dataset_part(data)) == 0x0000


# -- huge headers and many includefields ---------------------------------------------------------------------------
def test_a_100_kb_accept_header_is_answered_406(hostile: Hostile) -> None:
    status, body = raw_get(hostile.server, "/dicom-web/studies", "Accept: " + "a" * 100_000 + "\r\n")
    assert status == 406, (status, body[:200])
    many = ", ".join(["application/x-nothing"] * 5000 + ["application/dicom+json"])  # 115 KB, acceptable at its end
    status, body = raw_get(hostile.server, "/dicom-web/studies", f"Accept: {many}\r\n")
    assert status == 200, (status, body[:200])
    hostile.intact()


def test_a_100_kb_content_type_is_answered_4xx(hostile: Hostile) -> None:
    for ctype in ["multipart/related; boundary=" + "b" * 100_000, "multipart/related; " + "x" * 100_000,
                  "application/dicom; " + ";".join(["a=b"] * 20_000)]:
        status, body = raw_http(hostile.server, (f"POST /dicom-web/studies HTTP/1.1\r\nHost: bastion\r\n"
                                                 f"Content-Type: {ctype}\r\nContent-Length: 2\r\n"
                                                 "Connection: close\r\n\r\nxx").encode())
        assert status in (400, 415), (status, body[:200])
    hostile.intact()


def test_ten_thousand_includefields(hostile: Hostile) -> None:
    """10,000 includefield values in one parameter (90 KB of URL): the right answer; 10,000 parameters (250 KB,
    past the HTTP server's request-line bound): 400 before the application sees them."""
    fields = ",".join([f"{0x00090010 + (i << 16):08X}" for i in range(5000)] + ["00100010"] * 5000)
    status, body = raw_get(hostile.server, f"/dicom-web/studies?PatientID=PX1&includefield={fields}",
                           "Accept: application/dicom+json\r\n")
    assert status == 200, (status, body[:300])
    found = httpx.Response(200, content=body).json()
    assert [s["00100010"]["Value"][0]["Alphabetic"] for s in found] == ["Plain^Pat"]
    query = "&".join(["includefield=PatientName"] * 10_000)
    status, body = raw_get(hostile.server, f"/dicom-web/studies?{query}", "Accept: application/dicom+json\r\n")
    assert status in (400, 414, 431), (status, body[:200])
    hostile.intact()
