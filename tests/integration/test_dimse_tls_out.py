"""Bastion's own associations over DICOM TLS (PS3.15 B.9): C-MOVE sub-operations, forwarding and an edge's
upstream queries to ``tls://`` remotes, with DCMTK's ``storescp +tls`` as the destination (its default BCP 195
non-downgrading profile, which requires a client certificate). Bastion verifies the destination's certificate
against ``tls_ca`` and the host name it dials, and shows its own ``tls_cert``; a destination it cannot verify, or
one that does not speak TLS, receives nothing, the sub-operations are reported failed, and one log line says why.
"""
# ruff: noqa: F811 - a test takes the imported ``pki`` and ``tls_server`` fixtures as parameters

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
import pytest
from conftest import BastionServer, StoreSCP, free_port, make_study, requires_dcmtk
from test_dimse_retrieve import movescu
from test_dimse_tls import PKI, Identity, _ca, _issue, pki, tls_server  # noqa: F401 - the TLS server's fixtures
from test_forward import wait_for

from bastion.dimse.tls import client_context
from bastion.forward.upstream import DimseUpstream
from bastion.model.remotes import ForwardRule, RemoteAE
from bastion.settings import load_settings

pytestmark = [requires_dcmtk, pytest.mark.timeout(300)]

SERVER_AND_CLIENT = ("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                     "extendedKeyUsage=serverAuth,clientAuth\n")
LOOPBACK_NAMES = "subjectAltName=IP:127.0.0.1,DNS:localhost\n"


@dataclass
class Destinations:
    ca: Path  # the CA of Bastion's certificate and of the destinations' it trusts
    node: Identity  # Bastion's own certificate (serverAuth and clientAuth)
    tls: StoreSCP  # storescp +tls, its certificate from Bastion's CA
    forwarded: StoreSCP  # the same, for the forwarding rule
    rogue: StoreSCP  # storescp +tls, its certificate from a CA that Bastion does not trust
    plain: StoreSCP  # no TLS, though Bastion's remote says tls://


@pytest.fixture(scope="module")
def destinations(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Destinations]:
    d = tmp_path_factory.mktemp("pki-out")
    ca, rogue_ca = _ca(d, "ca"), _ca(d, "rogue-ca")
    node = _issue(d, ca, "node", "bastion.example.org", SERVER_AND_CLIENT)  # Bastion's own certificate
    good = _issue(d, ca, "dest", "localhost", SERVER_AND_CLIENT + LOOPBACK_NAMES)
    rogue = _issue(d, rogue_ca, "rogue", "localhost", SERVER_AND_CLIENT + LOOPBACK_NAMES)

    def tls_scp(aet: str, who: Identity) -> StoreSCP:  # trusts Bastion's CA, requires a client certificate
        return StoreSCP(aet, free_port(), tmp_path_factory.mktemp(aet.lower()) / "received",
                        options=("+tls", str(who.key), str(who.cert), "+cf", str(ca.cert)))

    scps = Destinations(ca.cert, node, tls_scp("TLSDEST", good), tls_scp("TLSFWD", good), tls_scp("ROGUEDEST", rogue),
                        StoreSCP("PLAINDEST", free_port(), tmp_path_factory.mktemp("plaindest") / "received"))
    started: list[StoreSCP] = []
    try:
        for scp in (scps.tls, scps.forwarded, scps.rogue, scps.plain):
            started.append(scp.start())
        yield scps
    finally:
        for scp in started:
            scp.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, destinations: Destinations) -> Iterator[BastionServer]:
    root = tmp_path_factory.mktemp("tls-out")
    node = destinations.node
    config = root / "bastion.toml"
    config.write_text(f"""
tls_cert = "{node.cert}"
tls_key = "{node.key}"
tls_ca = "{destinations.ca}"

[remotes]
TLSDEST = "tls://127.0.0.1:{destinations.tls.port}"
ROGUEDEST = "tls://127.0.0.1:{destinations.rogue.port}"
PLAINDEST = "tls://127.0.0.1:{destinations.plain.port}"

[[forward]]
name = "over-tls"
to = "TLSFWD@tls://127.0.0.1:{destinations.forwarded.port}"
match = {{ Modality = "MR" }}
""")
    started = BastionServer(root / "data", settings={"BASTION_CONFIG": str(config)}).start()
    yield started
    started.stop()


def _stored(server: BastionServer, tmp: Path, modality: str) -> tuple[str, dict[str, Path]]:
    study = make_study(tmp, series=1, per_series=3, modality=modality)
    sent = server.storescu(*study.files)
    assert sent.returncode == 0, sent.stdout
    return study.study_uid, {str(pydicom.dcmread(f).SOPInstanceUID): f for f in study.files}


def _same_pixels(received: dict[str, Path], sent: dict[str, Path]) -> None:
    assert sorted(received) == sorted(sent)
    for sop, path in sent.items():
        assert pydicom.dcmread(received[sop]).PixelData == pydicom.dcmread(path).PixelData


def test_a_c_move_to_a_tls_destination_goes_over_tls(server: BastionServer, destinations: Destinations,
                                                     tmp_path: Path) -> None:
    study_uid, sent = _stored(server, tmp_path / "ct", "CT")
    output, rsps = movescu(server, "TLSDEST", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid})
    assert rsps and rsps[-1]["status"] == "0x0000" and int(rsps[-1]["completed"]) == 3, output
    _same_pixels(destinations.tls.received(), sent)  # that storescp speaks only TLS, with a client certificate


@pytest.mark.parametrize(("aet", "why"), [("ROGUEDEST", "TLS handshake with ROGUEDEST at 127.0.0.1:{port} failed: "
                                                        "CERTIFICATE_VERIFY_FAILED"),
                                          ("PLAINDEST", "PLAINDEST at 127.0.0.1:{port}")])
def test_a_destination_that_cannot_be_verified_gets_nothing(server: BastionServer, destinations: Destinations,
                                                            tmp_path: Path, aet: str, why: str) -> None:
    scp = destinations.rogue if aet == "ROGUEDEST" else destinations.plain
    study_uid, _ = _stored(server, tmp_path / aet.lower(), "CT")
    output, rsps = movescu(server, aet, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid})
    assert rsps and int(rsps[-1]["failed"]) == 3 and int(rsps[-1]["completed"]) == 0, output
    assert scp.files() == []
    line = next((ln for ln in server.log().splitlines() if why.format(port=scp.port) in ln), None)
    assert line is not None, server.log()[-3000:]
    if aet == "PLAINDEST":  # storescp read the TLS ClientHello as a bad PDU and dropped the connection
        assert "TLS" in line, line
    assert "Traceback" not in server.log()


def test_forwarding_to_a_tls_destination(server: BastionServer, destinations: Destinations, tmp_path: Path) -> None:
    _, sent = _stored(server, tmp_path / "mr", "MR")
    received = wait_for("the MR study forwarded over TLS",
                        lambda: (lambda got: got if len(got) == 3 else None)(destinations.forwarded.received()),
                        server)
    _same_pixels(received, sent)


def test_an_edge_reaches_a_dimse_upstream_over_tls(tls_server: BastionServer, pki: PKI) -> None:
    """An edge's DIMSE upstream (pynetdicom's requestor) with a ``tls://`` remote: its C-ECHO reaches the TLS port
    of a Bastion that requires client certificates when the edge's certificate and CA are right, and not when the
    edge does not trust the upstream's certificate."""
    remote = RemoteAE(tls_server.aet, "127.0.0.1", tls_server.tls_port, tls=True)  # type: ignore[attr-defined]
    edge = replace(load_settings(env={}), aet="ANYCERT", tls_cert=str(pki.client.cert), tls_key=str(pki.client.key),
                   tls_ca=str(pki.ca))
    rule = ForwardRule.parse({"name": "upstream", "to": str(remote)})
    assert rule.remote == remote
    assert DimseUpstream(remote, "ANYCERT", "", tls=client_context(edge)).answers()
    untrusting = replace(edge, tls_ca=str(pki.rogue.cert))  # not the CA that issued the upstream's certificate
    assert not DimseUpstream(remote, "ANYCERT", "", tls=client_context(untrusting)).answers()
