"""DICOM TLS (PS3.15 B.9, BCP 195) over real DCMTK clients: a CA, the server's and clients' certificates made here
with the ``openssl`` command; client certificates required (``tls_ca``), TLS 1.2+ only, the same access rules as
the plain port, and a handshake that fails or never comes costs one log line and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from conftest import (
    BASTION,
    BastionServer,
    _stop,
    free_port,
    make_study,
    requires_dcmtk,
    run_dcmtk,
    unavailable,
    wait_for_port,
)
from test_dimse_access import audit_entries, not_authorized, wait_for_audit

pytestmark = [requires_dcmtk, pytest.mark.timeout(300)]


@dataclass
class Identity:
    key: Path
    cert: Path


@dataclass
class PKI:
    ca: Path
    server: Identity
    client: Identity  # CN=ct1.example.org, from the CA
    other: Identity  # CN=other.example.org, from the CA
    rogue: Identity  # CN=ct1.example.org, from a CA the server does not trust


def _openssl(*args: str | Path) -> None:
    proc = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def _ca(directory: Path, name: str) -> Identity:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return Identity(key, cert)


def _issue(directory: Path, ca: Identity, name: str, cn: str, extensions: str) -> Identity:
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    ext = directory / f"{name}.ext"
    ext.write_text(extensions)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial", "-out", cert,
             "-days", "2", "-extfile", ext)
    return Identity(key, cert)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    if shutil.which("openssl") is None:
        unavailable("the openssl command is not installed")
    d = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = _ca(d, "ca"), _ca(d, "rogue-ca")
    client_ext = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    return PKI(
        ca=ca.cert,
        server=_issue(d, ca, "server", "localhost", "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
                      "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"),
        client=_issue(d, ca, "client", "ct1.example.org", client_ext),
        other=_issue(d, ca, "other", "other.example.org", client_ext),
        rogue=_issue(d, rogue_ca, "rogue", "ct1.example.org", client_ext))


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[BastionServer]:
    root = tmp_path_factory.mktemp("tls")
    config = root / "bastion.toml"
    config.write_text(f"""
tls_cert = "{pki.server.cert}"
tls_key = "{pki.server.key}"
tls_ca = "{pki.ca}"

[dimse.peers]
TLSCT = {{ host = "127.0.0.1", services = ["echo", "store", "find"], tls_subject = "ct1.example.org" }}
ANYCERT = {{ host = "127.0.0.1", services = ["echo"] }}
GETTER = {{ host = "127.0.0.1", services = ["get"] }}
""")
    port = free_port()
    server = BastionServer(root / "data", settings={"BASTION_CONFIG": str(config), "BASTION_TLS_PORT": str(port),
                                                    "BASTION_DICOM_ARTIM_TIMEOUT": "3"})
    server.start()
    server.tls_port = port  # type: ignore[attr-defined]
    yield server
    server.stop()


def tls_args(server: BastionServer, pki: PKI, who: Identity | None, calling: str) -> list[str]:
    """DCMTK's TLS options (BCP 195 non-downgrading profile, its default) and the TLS port."""
    client = ["+tls", str(who.key), str(who.cert)] if who is not None else ["+tla"]
    return [*client, "+cf", str(pki.ca), "-aet", calling, "-aec", server.aet, server.host,
            str(server.tls_port)]  # type: ignore[attr-defined]


@pytest.mark.parametrize("profile", ["+py", "+px"])  # DCMTK's BCP 195 profiles: non-downgrading (default), plain
def test_echo_over_tls_with_a_client_certificate(tls_server: BastionServer, pki: PKI, profile: str) -> None:
    proc = run_dcmtk("echoscu", "-v", profile, *tls_args(tls_server, pki, pki.client, "TLSCT"), timeout=30)
    assert proc.returncode == 0, proc.stdout
    assert "Received Echo Response (Success)" in proc.stdout, proc.stdout
    entry = wait_for_audit(tls_server.data, lambda e: e.get("kind") == "association" and e.get("user") == "TLSCT"
                           and int(e.get("outcome", 0)) == 0)
    assert "(TLS, client certificate 'ct1.example.org')" in entry.get("detail", "")


def test_store_over_tls_then_retrieve_it(tls_server: BastionServer, pki: PKI, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", series=1, per_series=2)
    stored = run_dcmtk("storescu", "-v", *tls_args(tls_server, pki, pki.client, "TLSCT"), *study.files, timeout=120)
    assert stored.returncode == 0, stored.stdout
    assert stored.stdout.count("Received Store Response (Success)") == 2, stored.stdout
    found = tmp_path / "found"
    found.mkdir()
    query = run_dcmtk("findscu", "-v", "-S", "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={study.study_uid}",
                      "-k", f"SeriesInstanceUID={next(iter(study.series))}", "-k", "SOPInstanceUID", "-X", "-od", found,
                      *tls_args(tls_server, pki, pki.client, "TLSCT"), timeout=60)
    assert query.returncode == 0, query.stdout
    assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in found.glob("rsp*.dcm")} == set(study.sop_uids)
    # DCMTK's getscu has no TLS: the bytes come back on the plain port, to a peer granted C-GET there
    out = tmp_path / "got"
    out.mkdir()
    got = run_dcmtk("getscu", "-v", "-S", "-aet", "GETTER", "-k", "QueryRetrieveLevel=STUDY",
                    "-k", f"StudyInstanceUID={study.study_uid}", "-od", out, *tls_server.addr(), timeout=120)
    assert got.returncode == 0, got.stdout
    received = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in out.iterdir()}
    assert set(received) == set(study.sop_uids)
    for original in study.files:
        sent = pydicom.dcmread(original)
        assert pydicom.dcmread(received[str(sent.SOPInstanceUID)]).PixelData == sent.PixelData


def test_the_plain_port_rules_apply_over_tls(tls_server: BastionServer, pki: PKI) -> None:
    unknown = run_dcmtk("echoscu", "-v", *tls_args(tls_server, pki, pki.client, "UNKNOWN"), timeout=30)
    assert "Calling AE Title Not Recognized" in unknown.stdout, unknown.stdout
    # TLSCT is bound to the certificate subject ct1.example.org: another certificate, or the plain port, is refused
    other = run_dcmtk("echoscu", "-v", *tls_args(tls_server, pki, pki.other, "TLSCT"), timeout=30)
    assert "Calling AE Title Not Recognized" in other.stdout, other.stdout
    plain = run_dcmtk("echoscu", "-v", "-aet", "TLSCT", *tls_server.addr(), timeout=30)
    assert "Calling AE Title Not Recognized" in plain.stdout, plain.stdout
    # ANYCERT may only echo, whatever certificate it shows
    assert run_dcmtk("echoscu", *tls_args(tls_server, pki, pki.other, "ANYCERT"), timeout=30).returncode == 0
    study_files = make_study(Path(tls_server.data.parent) / "anycert", series=1, per_series=1).files
    refused = run_dcmtk("storescu", "-v", *tls_args(tls_server, pki, pki.other, "ANYCERT"), *study_files, timeout=60)
    assert not_authorized(refused.stdout), refused.stdout
    assert "needs TLS with certificate subject 'ct1.example.org'" in tls_server.log()


def _handshake_failures(server: BastionServer) -> list[str]:
    return [line for line in server.log().splitlines() if "TLS handshake failed" in line]


def _wait_for_new_failure(server: BastionServer, before: int, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = _handshake_failures(server)
        if len(lines) > before:
            return lines[-1]
        time.sleep(0.1)
    pytest.fail(f"no new 'TLS handshake failed' line in the log:\n{server.log()[-3000:]}")


def test_a_client_without_a_certificate_is_refused(tls_server: BastionServer, pki: PKI) -> None:
    before = len(_handshake_failures(tls_server))
    proc = run_dcmtk("echoscu", "-v", *tls_args(tls_server, pki, None, "TLSCT"), timeout=30)
    assert proc.returncode != 0, proc.stdout
    assert "Received Echo Response" not in proc.stdout, proc.stdout
    line = _wait_for_new_failure(tls_server, before)
    assert "CERTIFICATE" in line.upper(), line
    assert "Traceback" not in tls_server.log()


def test_a_certificate_from_another_ca_is_refused(tls_server: BastionServer, pki: PKI) -> None:
    before = len(_handshake_failures(tls_server))
    proc = run_dcmtk("echoscu", "-v", *tls_args(tls_server, pki, pki.rogue, "TLSCT"), timeout=30)
    assert proc.returncode != 0 and "Received Echo Response" not in proc.stdout, proc.stdout
    assert "CERTIFICATE_VERIFY_FAILED" in _wait_for_new_failure(tls_server, before).upper()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_a_tls_1_1_client_is_refused(tls_server: BastionServer, pki: PKI) -> None:
    """A client that offers TLS 1.1 at most (Python's ssl, OpenSSL's security level lowered so it may): the server
    refuses the handshake (OpenSSL: unsupported protocol), and says so in its log."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ssl.SSLError, ValueError) as exc:
        unavailable(f"this OpenSSL cannot make a TLS 1.1 client: {exc}")
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    before = len(_handshake_failures(tls_server))
    with socket.create_connection((tls_server.host, tls_server.tls_port), timeout=30) as raw:  # type: ignore[attr-defined]
        with pytest.raises(ssl.SSLError) as refused:
            ctx.wrap_socket(raw, server_hostname="localhost").close()
    assert refused.value is not None  # the server ends the handshake (an alert, or the connection closed)
    assert "UNSUPPORTED_PROTOCOL" in _wait_for_new_failure(tls_server, before).upper()


def test_a_silent_connection_is_closed_within_the_handshake_deadline(tls_server: BastionServer, pki: PKI) -> None:
    """A connection that sends nothing is closed once the ARTIM timeout (3 s here) runs out, and the listener
    serves others meanwhile and after."""
    before = len(_handshake_failures(tls_server))
    with socket.create_connection((tls_server.host, tls_server.tls_port), timeout=60) as silent:  # type: ignore[attr-defined]
        assert run_dcmtk("echoscu", *tls_args(tls_server, pki, pki.client, "TLSCT"), timeout=30).returncode == 0
        silent.settimeout(60)
        assert silent.recv(1024) == b""  # closed by the server
    _wait_for_new_failure(tls_server, before)
    assert run_dcmtk("echoscu", *tls_args(tls_server, pki, pki.client, "TLSCT"), timeout=30).returncode == 0
    failed = [e for e in audit_entries(tls_server.data) if "TLS handshake failed" in e.get("detail", "")]
    assert failed, "handshake failures are audited"


def test_an_unusable_certificate_stops_serve_with_its_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env |= {"BASTION_TLS_PORT": str(free_port()), "BASTION_TLS_CERT": str(bad), "BASTION_TLS_KEY": str(bad)}
    proc = subprocess.run([BASTION, "serve", "--data", str(tmp_path / "data"), "--dicom-port", str(free_port()),
                           "--http-port", str(free_port())], capture_output=True, text=True, timeout=60, env=env,
                          check=False)
    assert proc.returncode != 0
    assert f"cannot use tls_cert {bad}" in proc.stderr, proc.stderr


def test_a_shutdown_during_a_handshake_is_clean(tmp_path: Path, pki: PKI) -> None:
    """A connection still in its TLS handshake when the server stops is dropped after the grace period, with no
    traceback, and the server exits 0."""
    port = free_port()
    server = BastionServer(tmp_path / "data", settings={
        "BASTION_TLS_PORT": str(port), "BASTION_TLS_CERT": str(pki.server.cert),
        "BASTION_TLS_KEY": str(pki.server.key), "BASTION_TLS_CA": str(pki.ca), "BASTION_WORKERS": "1"}).start()
    try:
        with socket.create_connection((server.host, port), timeout=60):
            time.sleep(0.5)  # accepted, waiting for a ClientHello that never comes
            assert server.proc is not None
            server.proc.terminate()
            assert server.proc.wait(60) == 0, server.log()
    finally:
        server.stop()
    assert "Traceback" not in server.log(), server.log()


# -- Orthanc as a DICOM TLS client (its DicomTls* options, BCP 195 as DCMTK's) ------------------------------------
ORTHANC = "/usr/sbin/Orthanc"


def test_orthanc_echoes_and_stores_over_tls(tls_server: BastionServer, pki: PKI, tmp_path: Path) -> None:
    """Orthanc, calling as TLSCT with the ct1.example.org certificate, echoes and stores over Bastion's TLS port;
    the same Orthanc on the plain port is rejected (TLSCT is bound to its certificate)."""
    if not os.access(ORTHANC, os.X_OK):
        unavailable("Orthanc is not installed")
    import httpx
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    source = tmp_path / "ct.dcm"
    ds.save_as(source, enforce_file_format=True)
    http_port = free_port()
    tls_port = tls_server.tls_port  # type: ignore[attr-defined]
    config = {
        "Name": "tls-test", "HttpPort": http_port, "DicomPort": free_port(), "DicomAet": "TLSCT",
        "StorageDirectory": str(tmp_path / "storage"), "IndexDirectory": str(tmp_path / "index"),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.client.cert),
        "DicomTlsPrivateKey": str(pki.client.key), "DicomTlsTrustedCertificates": str(pki.ca),
        "DicomModalities": {
            "BASTION": {"AET": tls_server.aet, "Host": "127.0.0.1", "Port": tls_port, "UseDicomTls": True},
            "PLAIN": {"AET": tls_server.aet, "Host": "127.0.0.1", "Port": tls_server.dicom_port, "UseDicomTls": False},
        },
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    with open(tmp_path / "orthanc.log", "w") as log:
        proc = subprocess.Popen([ORTHANC, str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "TCP_NODELAY": "1"}, cwd=tmp_path)
    try:
        wait_for_port(http_port, timeout=60, proc=proc)
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as http:
            echo = http.post("/modalities/BASTION/echo", json={})
            assert echo.status_code == 200, f"{echo.status_code} {echo.text}\n{(tmp_path / 'orthanc.log').read_text()}"
            uploaded = http.post("/instances", content=source.read_bytes())
            assert uploaded.status_code == 200, uploaded.text
            stored = http.post("/modalities/BASTION/store", json={"Resources": [uploaded.json()["ID"]]})
            assert stored.status_code == 200, stored.text
            assert stored.json().get("FailedInstancesCount", 0) == 0, stored.text
            plain = http.post("/modalities/PLAIN/echo", json={})
            assert plain.status_code != 200, plain.text
    finally:
        _stop(proc)
    entry = wait_for_audit(tls_server.data, lambda e: e.get("kind") == "store" and e.get("user") == "TLSCT"
                           and ds.StudyInstanceUID in e.get("studies", []))
    assert int(entry.get("outcome", 0)) == 0
