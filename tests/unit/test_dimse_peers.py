"""``[dimse.peers]`` and the TLS settings as configured (TOML and environment), and the access decision they
give (:mod:`bastion.dimse.access`, PS3.8 9.3.4 reasons)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bastion.dimse import messages as m
from bastion.dimse.access import ALL, AccessPolicy, Grant, Rejection, service_of
from bastion.dimse.pdu import REASON_CALLED_AE_NOT_RECOGNIZED, REASON_CALLING_AE_NOT_RECOGNIZED
from bastion.model.uids import STORAGE_COMMITMENT_PUSH
from bastion.settings import Settings, SettingsError, load_settings


def _from_toml(tmp_path: Path, text: str, **env: str) -> Settings:
    path = tmp_path / "bastion.toml"
    path.write_text(text)
    return load_settings(path, env=env)


def test_the_toml_table(tmp_path: Path) -> None:
    s = _from_toml(tmp_path, """
[remotes]
WS1 = "10.0.0.9:104"

[dimse]
allow_unknown = false

[dimse.peers]
CT1 = { host = "10.0.0.5", services = ["echo", "store"] }
WS1 = { host = ["10.0.1.0/24", "ws1.example.org"], services = ["find", "move"], move_destinations = ["WS1"] }
""")
    ct1, ws1 = s.dimse_peers
    assert ct1.aet == "CT1" and ct1.services == {"echo", "store"} and ct1.move_destinations is None
    assert ct1.covers("10.0.0.5") and ct1.covers("::ffff:10.0.0.5") and not ct1.covers("10.0.0.6")
    assert ws1.covers("10.0.1.77") and ws1.hostnames == ("ws1.example.org",) and ws1.move_destinations == {"WS1"}
    assert s.dimse_allow_unknown is False and not s.allows_unknown_peers


def test_the_environment_form() -> None:
    s = load_settings(None, env={"BASTION_DIMSE_PEERS": "CT1@10.0.0.5=echo+store, ANY@0.0.0.0/0|::/0=*",
                                 "BASTION_TLS_PORT": "2762", "BASTION_TLS_CERT": "c.pem", "BASTION_TLS_KEY": "k.pem"})
    ct1, any_ = s.dimse_peers
    assert ct1.services == {"echo", "store"} and any_.services == {"echo", "store", "find", "move", "get", "commit"}
    assert any_.covers("192.0.2.1") and any_.covers("2001:db8::1")
    assert s.tls_port == 2762 and s.tls_cert == "c.pem"


def test_allow_unknown_is_auto_by_default() -> None:
    assert load_settings(None, env={}).allows_unknown_peers
    assert not load_settings(None, env={"BASTION_DIMSE_PEERS": "CT1@10.0.0.5=echo"}).allows_unknown_peers
    assert load_settings(None, env={"BASTION_DIMSE_PEERS": "CT1@10.0.0.5=echo",
                                    "BASTION_DIMSE_ALLOW_UNKNOWN": "true"}).allows_unknown_peers
    assert load_settings(None, env={"BASTION_DIMSE_ALLOW_UNKNOWN": "auto"}).dimse_allow_unknown is None


@pytest.mark.parametrize(("env", "message"), [
    ({"BASTION_DIMSE_PEERS": "CT1@10.0.0.5=echo+print"}, "unknown service(s) print"),
    ({"BASTION_DIMSE_PEERS": "CT1@not a host=echo"}, "neither an IP address"),
    ({"BASTION_DIMSE_PEERS": "CT1=echo"}, "AET@HOST"),
    ({"BASTION_DIMSE_PEERS": "CT1@10.0.0.5=echo,CT1@10.0.0.6=echo"}, "CT1 twice"),
    ({"BASTION_DIMSE_PEERS": "CT1@10.0.0.5=find+move>WS9"}, "WS9 not in [remotes]"),
    ({"BASTION_DIMSE_PEERS": "CT1@10.0.0.5=find>WS9"}, "move_destinations without the move service"),
    ({"BASTION_TLS_PORT": "2762"}, "tls_port needs tls_cert and tls_key"),
])
def test_mistakes_are_refused_at_start(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(None, env=env)
    assert message in err.value.message


def test_a_toml_peer_needs_host_and_services(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="needs host and services"):
        _from_toml(tmp_path, '[dimse.peers]\nCT1 = { services = ["echo"] }\n')
    with pytest.raises(SettingsError, match="unknown key"):
        _from_toml(tmp_path, '[dimse.peers]\nCT1 = { host = "10.0.0.5", services = ["echo"], port = 104 }\n')


def _decide(settings: Settings, calling: str, called: str, address: str, subject: str = "") -> Grant | Rejection:
    return asyncio.run(AccessPolicy(settings).admit(calling, called, address, subject))


def test_the_access_decision() -> None:
    s = load_settings(None, env={"BASTION_DIMSE_PEERS": "CT1@10.0.0.5=echo+store,LOCAL@localhost=find"})
    grant = _decide(s, "CT1", "BASTION", "10.0.0.5")
    assert isinstance(grant, Grant) and grant.allows("store") and not grant.allows("find")
    assert _decide(s, "CT1", "BASTION", "10.0.0.6") == Rejection(
        REASON_CALLING_AE_NOT_RECOGNIZED, "calling AE title 'CT1' is not allowed from 10.0.0.6")
    unknown = _decide(s, "WHO", "BASTION", "10.0.0.5")
    assert isinstance(unknown, Rejection) and unknown.reason == REASON_CALLING_AE_NOT_RECOGNIZED
    called = _decide(s, "CT1", "OTHER", "10.0.0.5")
    assert isinstance(called, Rejection) and called.reason == REASON_CALLED_AE_NOT_RECOGNIZED
    assert isinstance(_decide(s, "LOCAL", "BASTION", "127.0.0.1"), Grant)  # the host name, resolved
    # without peers: anyone, any called AE title
    assert _decide(load_settings(None, env={}), "WHO", "ANYTHING", "192.0.2.1") is ALL


def test_a_peer_bound_to_a_certificate_subject(tmp_path: Path) -> None:
    s = _from_toml(tmp_path, '[dimse.peers]\nCT1 = { host = "10.0.0.5", services = ["echo"], '
                             'tls_subject = "ct1.example.org" }\n')
    assert isinstance(_decide(s, "CT1", "BASTION", "10.0.0.5", "ct1.example.org"), Grant)
    assert isinstance(_decide(s, "CT1", "BASTION", "10.0.0.5", "other.example.org"), Rejection)
    assert isinstance(_decide(s, "CT1", "BASTION", "10.0.0.5"), Rejection)


def test_the_service_of_each_request() -> None:
    assert service_of(m.C_STORE_RQ, "1.2.840.10008.5.1.4.1.1.2") == "store"
    assert service_of(m.C_ECHO_RQ, "1.2.840.10008.1.1") == "echo"
    assert service_of(m.N_ACTION_RQ, STORAGE_COMMITMENT_PUSH) == "commit"
    assert service_of(m.C_CANCEL_RQ, "1.2.840.10008.5.1.4.1.2.2.1") is None
    assert service_of(m.C_STORE_RSP, "1.2.840.10008.5.1.4.1.1.2") is None
