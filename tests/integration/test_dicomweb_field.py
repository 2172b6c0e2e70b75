"""DICOMweb as field peers and hostile clients meet it (issue 19): person names split into component groups,
Orthanc's DICOMweb client storing to Bastion, STOW-RS parts streamed with bounded memory, and deadlines on
stalled or trickled requests.

Every test runs a real ``bastion serve`` (``bastion_factory``); the peers are real too: dicomweb-client, Orthanc.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
from conftest import BastionServer, _stop, corpus, dataset_part, free_port, unavailable, wait_for_port
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from bastion.archive import Archive
from bastion.dicomweb.metadata import MetadataCache, cache_directory
from bastion.settings import load_settings

CHARSET_FILES = ("chrH31.dcm", "chrH32.dcm", "chrX1.dcm", "chrX2.dcm", "chrI2.dcm", "chrFren.dcm", "chrRuss.dcm")
ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
MIB = 1024 * 1024


def charset_file(name: str) -> str:
    found = get_charset_files(name)
    if not found:
        unavailable(f"pydicom character-set sample {name} not available")
    return str(found[0])


def expected_groups(name: pydicom.valuerep.PersonName) -> dict[str, str]:
    """The PS3.18 F.2.2 object of a person name, worked out from pydicom's decoded components."""
    return {group: text for group, text in zip(("Alphabetic", "Ideographic", "Phonetic"), name.components,
                                               strict=False) if text}


def multipart(parts: list[bytes], boundary: str) -> bytes:
    out = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), p) for p in parts)
    return out + b"--%s--\r\n" % boundary.encode()


def stow_type(boundary: str) -> str:
    return f'multipart/related; type="application/dicom"; boundary={boundary}'


def instances_of(server: BastionServer, sop: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(server.url(f"/dicom-web/instances?SOPInstanceUID={sop}"), timeout=30) as rsp:
        return list(json.loads(rsp.read()))


# -- person names (PS3.18 F.2.2) --------------------------------------------------------------------------------
def test_person_names_are_split_by_qido_and_metadata_for_a_real_client(bastion_factory: Any) -> None:
    server = bastion_factory()
    client = DICOMwebClient(server.url("/dicom-web"))
    datasets = [pydicom.dcmread(charset_file(name)) for name in CHARSET_FILES]
    client.store_instances(datasets)
    for name, ds in zip(CHARSET_FILES, datasets, strict=True):
        want = expected_groups(ds.PatientName)
        found = client.search_for_instances(search_filters={"SOPInstanceUID": ds.SOPInstanceUID},
                                            fields=["PatientName"])
        assert len(found) == 1, name
        assert found[0]["00100010"]["Value"] == [want], name
        assert str(Dataset.from_json(found[0]).PatientName) == str(ds.PatientName), name
        studies = client.search_for_studies(search_filters={"StudyInstanceUID": ds.StudyInstanceUID})
        assert want in [s["00100010"]["Value"][0] for s in studies], name
        metadata = client.retrieve_instance_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert metadata["00100010"]["Value"] == [want], name
        name_only = Dataset.from_json({"00100010": metadata["00100010"]})
        assert str(name_only.PatientName) == str(ds.PatientName), name
    # The Japanese sample has all three groups; the Chinese one two: nothing is left in one member.
    h31 = client.search_for_instances(search_filters={"SOPInstanceUID": datasets[0].SOPInstanceUID})[0]
    assert set(h31["00100010"]["Value"][0]) == {"Alphabetic", "Ideographic", "Phonetic"}
    assert "=" not in json.dumps(h31["00100010"])


def test_empty_person_name_groups_are_left_out(bastion_factory: Any, tmp_path: Path) -> None:
    server = bastion_factory()
    ds = pydicom.dcmread(charset_file("chrX1.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientName = "Wang^XiaoDong=王^小東="  # a trailing empty phonetic group
    ds.ReferringPhysicianName = "=王^小東"  # no alphabetic group
    client = DICOMwebClient(server.url("/dicom-web"))
    client.store_instances([ds])
    found = client.search_for_instances(search_filters={"SOPInstanceUID": ds.SOPInstanceUID},
                                        fields=["PatientName", "ReferringPhysicianName"])[0]
    assert found["00100010"]["Value"] == [{"Alphabetic": "Wang^XiaoDong", "Ideographic": "王^小東"}]
    assert found["00080090"]["Value"] == [{"Ideographic": "王^小東"}]
    metadata = client.retrieve_instance_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert metadata["00100010"]["Value"] == [{"Alphabetic": "Wang^XiaoDong", "Ideographic": "王^小東"}]
    assert metadata["00080090"]["Value"] == [{"Ideographic": "王^小東"}]


def test_metadata_cached_before_names_were_split_is_answered_split(tmp_path: Path) -> None:
    """An archive whose metadata cache holds PN values whole (as earlier versions wrote them) answers split
    names without a rebuild, and the cache entry is fixed once."""
    settings = load_settings(env={}, data=str(tmp_path / "data"))
    archive = Archive.open(settings)
    try:
        path = charset_file("chrH31.dcm")
        record = archive.ingest.store_bytes(Path(path).read_bytes(), origin="test").record
        directory = cache_directory(settings.data)
        entry = directory / "v1" / f"{record.blob_key}.json"
        entry.parent.mkdir(parents=True, exist_ok=True)
        old = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Yamada^Tarou=山田^太郎=やまだ^たろう"}]},
               "00080018": {"vr": "UI", "Value": [record.sop_uid]}}
        entry.write_text(json.dumps(old, ensure_ascii=False), "utf-8")
        cache = MetadataCache(archive.retriever, directory)
        answered = json.loads(cache.response_text([record], "http://x/dicom-web"))
        assert answered[0]["00100010"]["Value"] == [
            {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}]
        assert "山田^太郎=" not in entry.read_text("utf-8")  # rewritten once, not split on every read
    finally:
        archive.close()


# -- Orthanc's DICOMweb client (73-character boundaries) --------------------------------------------------------
@contextlib.contextmanager
def orthanc(tmp_path: Path, bastion_url: str) -> Iterator[str]:
    if not (os.access(ORTHANC, os.X_OK) and os.path.exists(DICOMWEB_PLUGIN)):
        unavailable("Orthanc or its DICOMweb plugin is not installed")
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "field-test", "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANCFT",
        "StorageDirectory": str(tmp_path / "orthanc-storage"), "IndexDirectory": str(tmp_path / "orthanc-index"),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {"bastion": [bastion_url]}},
    }
    config_path = tmp_path / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log = open(tmp_path / "orthanc.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([ORTHANC, str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "TCP_NODELAY": "1"}, cwd=tmp_path)
    log.close()
    try:
        wait_for_port(http_port, timeout=60, proc=proc)
        yield f"http://127.0.0.1:{http_port}"
    finally:
        _stop(proc)


def test_orthanc_stores_to_bastion_over_stow_rs(bastion_factory: Any, tmp_path: Path) -> None:
    server = bastion_factory()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    source = tmp_path / "ct.dcm"
    ds.save_as(source, enforce_file_format=True)
    with orthanc(tmp_path, server.url("/dicom-web/")) as base, httpx.Client(base_url=base, timeout=60) as http:
        uploaded = http.post("/instances", content=source.read_bytes())
        assert uploaded.status_code == 200, uploaded.text
        sent = http.post("/dicom-web/servers/bastion/stow", json={"Resources": [uploaded.json()["ID"]]})
        assert sent.status_code == 200, f"{sent.status_code} {sent.text}\n{server.log()[-3000:]}"
    found = instances_of(server, ds.SOPInstanceUID)
    assert [f["00080018"]["Value"][0] for f in found] == [ds.SOPInstanceUID]
    assert "multipart boundary" not in server.log()


def test_boundaries_past_the_bound_are_refused_clearly(bastion_factory: Any) -> None:
    server = bastion_factory()
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    with httpx.Client(timeout=30) as http:
        long_ok = "b" * 200
        r = http.post(server.url("/dicom-web/studies"), content=multipart([data], long_ok),
                      headers={"Content-Type": stow_type(long_ok)})
        assert r.status_code == 200, r.text
        too_long = "b" * 201
        r = http.post(server.url("/dicom-web/studies"), content=multipart([data], too_long),
                      headers={"Content-Type": stow_type(too_long)})
        assert r.status_code == 400
        assert "1 to 200 characters" in r.json()["error"]


# -- STOW-RS memory: parts are streamed, not held ---------------------------------------------------------------
def group_rss(pgid: int) -> int:
    """The resident memory (bytes) of every process in process group ``pgid``."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError):
            if os.getpgid(int(entry)) != pgid:
                continue
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def big_multiframe(path: Path, frames: int) -> Dataset:
    """A 512 x 512 x 16-bit CT object of ``frames`` frames (``frames`` / 2 MiB of pixel data)."""
    ds = corpus.make_instance(corpus.KINDS["small"], 0, 1)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.NumberOfFrames = frames
    rng = np.random.default_rng(7)
    ds.PixelData = rng.integers(0, 4096, size=(frames, 512, 512), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_a_large_stow_part_is_streamed_with_bounded_memory(bastion_factory: Any, tmp_path: Path) -> None:
    server = bastion_factory()
    path = tmp_path / "big.dcm"
    # 80 MiB: well past the 8 MB the blob writer keeps in memory, and twice what the writer's buffer, the
    # threads and the allocator's slack of one STOW cost together (about 14-26 MiB, whatever the part's size).
    ds = big_multiframe(path, frames=160)
    size = path.stat().st_size
    assert size > 80 * MIB
    boundary = "field-test-boundary"
    small = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    with httpx.Client(timeout=120) as http:  # warm up the STOW path first
        r = http.post(server.url("/dicom-web/studies"), content=multipart([small], boundary),
                      headers={"Content-Type": stow_type(boundary)})
        assert r.status_code == 200, r.text
    time.sleep(1.0)
    assert server.proc is not None
    pgid = server.proc.pid
    before = group_rss(pgid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], group_rss(pgid))
            done.wait(0.02)

    def body() -> Iterator[bytes]:
        yield b"--%s\r\nContent-Type: application/dicom\r\n\r\n" % boundary.encode()
        with open(path, "rb") as fh:
            while chunk := fh.read(MIB):
                yield chunk
        yield b"\r\n--%s--\r\n" % boundary.encode()

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with httpx.Client(timeout=120) as http:
            r = http.post(server.url("/dicom-web/studies"), content=body(),
                          headers={"Content-Type": stow_type(boundary)})
    finally:
        done.set()
        sampler.join()
    assert r.status_code == 200, r.text
    after = group_rss(pgid)
    growth = peak[0] - before
    print(f"part {size / MIB:.1f} MiB; server group RSS before {before / MIB:.1f} MiB, peak +{growth / MIB:.1f} "
          f"MiB, after +{(after - before) / MIB:.1f} MiB")
    assert growth < size / 2, f"the server's memory grew by {growth / MIB:.1f} MiB for a {size / MIB:.1f} MiB part"
    [stored] = server.blobs_of(ds.SOPInstanceUID)
    assert stored.stat().st_size == size
    assert stored.read_bytes() == path.read_bytes()
    assert instances_of(server, ds.SOPInstanceUID)
    assert server.spool_files() == []


# -- deadlines: stalled and trickled requests -------------------------------------------------------------------
TIMEOUTS = {"BASTION_HTTP_BODY_TIMEOUT": "2", "BASTION_HTTP_HEADER_TIMEOUT": "2"}
DEADLINE_S = 90.0


def stow_head(server: BastionServer, boundary: str, content_length: int) -> bytes:
    return (f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1:{server.http_port}\r\n"
            f"Content-Type: {stow_type(boundary)}\r\nContent-Length: {content_length}\r\n\r\n").encode()


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (at most DEADLINE_S)."""
    sock.settimeout(DEADLINE_S)
    out = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            out += chunk
    return bytes(out)


def trickle(sock: socket.socket, stop: threading.Event, data: bytes = b"x") -> None:
    """Send one byte a second until told to stop or the server closes the connection."""
    while not stop.wait(1.0):
        try:
            sock.sendall(data)
        except OSError:
            return


def test_stalled_and_trickled_requests_are_dropped_and_nothing_is_stored(bastion_factory: Any,
                                                                          tmp_path: Path) -> None:
    server = bastion_factory(settings=TIMEOUTS)
    path = tmp_path / "big.dcm"
    ds = big_multiframe(path, frames=24)  # 12 MiB: past the 8 MB the blob writer keeps in memory
    data = path.read_bytes()
    boundary = "stall-boundary"
    head = b"--%s\r\nContent-Type: application/dicom\r\n\r\n" % boundary.encode()
    length = len(head) + len(data) + len(b"\r\n--%s--\r\n" % boundary.encode())

    # 1. A body that stops after 10 MiB, well into the spool.
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        sock.sendall(stow_head(server, boundary, length) + head + data[: 10 * MIB])
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]

    # 2. A body that trickles a byte a second after its first kilobytes.
    stop = threading.Event()
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        sock.sendall(stow_head(server, boundary, length) + head + data[:4096])
        sender = threading.Thread(target=trickle, args=(sock, stop))
        sender.start()
        try:
            answer = read_until_closed(sock)
        finally:
            stop.set()
            sender.join()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]

    # 3. A request head that trickles (slowloris).
    stop = threading.Event()
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        sender = threading.Thread(target=trickle, args=(sock, stop))
        sender.start()
        try:
            answer = read_until_closed(sock)
        finally:
            stop.set()
            sender.join()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]

    # The server keeps serving, stored nothing of the dropped bodies and left no spool file behind.
    with urllib.request.urlopen(server.url("/health"), timeout=30) as rsp:
        assert rsp.status == 200
    assert instances_of(server, ds.SOPInstanceUID) == []
    assert server.blobs_of(ds.SOPInstanceUID) == []
    assert server.spool_files() == []
    log = server.log()
    assert log.count("http_body_timeout") == 2, log[-3000:]
    assert log.count("http_header_timeout") == 1, log[-3000:]
    assert "Traceback" not in log
    # ... and a whole STOW of the same object still works.
    with httpx.Client(timeout=120) as http:
        r = http.post(server.url("/dicom-web/studies"), content=multipart([data], boundary),
                      headers={"Content-Type": stow_type(boundary)})
    assert r.status_code == 200, r.text
    assert [f["00080018"]["Value"][0] for f in instances_of(server, ds.SOPInstanceUID)] == [ds.SOPInstanceUID]


def test_a_slow_but_steady_body_is_not_dropped(bastion_factory: Any) -> None:
    """A body bringing more than 1 KiB in every window is kept, however long it takes in all."""
    server = bastion_factory(settings=TIMEOUTS)
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()  # about 39 KB: sent over about 5 windows
    boundary = "steady"
    body = multipart([data], boundary)
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        sock.sendall(stow_head(server, boundary, len(body)))
        for start in range(0, len(body), 4096):
            sock.sendall(body[start: start + 4096])
            time.sleep(1.0)  # pacing only: the assertion is on the answer, not on time
        sock.settimeout(DEADLINE_S)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_bare_datasets_are_framed_whatever_their_size(bastion_factory: Any, tmp_path: Path) -> None:
    """A part holding a dataset without File Meta Information is stored with File Meta added, whether it fits
    the head the stream keeps (CT_small.dcm) or runs past it (a 2 MiB multi-frame object)."""
    server = bastion_factory()
    big = tmp_path / "big.dcm"
    big_ds = big_multiframe(big, frames=4)
    small_ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    small_ds.SOPInstanceUID = small_ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    small = tmp_path / "small.dcm"
    small_ds.save_as(small, enforce_file_format=True)
    parts = [dataset_part(p.read_bytes()) for p in (small, big)]
    boundary = "bare"
    with httpx.Client(timeout=60) as http:
        r = http.post(server.url("/dicom-web/studies"), content=multipart(parts, boundary),
                      headers={"Content-Type": stow_type(boundary)})
    assert r.status_code == 200, r.text
    for ds, part in ((small_ds, parts[0]), (big_ds, parts[1])):
        [stored] = server.blobs_of(ds.SOPInstanceUID)
        assert dataset_part(stored.read_bytes()) == part
