"""Known DICOM peers: which calling AE titles may associate, from where, and which DIMSE services each may use.

A peer (``[dimse.peers]``, :class:`DicomPeer`) names an AE title, the hosts it may call from (IP addresses,
CIDR networks or host names), the services granted to it among :data:`DIMSE_SERVICES` and, optionally, the
C-MOVE destinations it may name and the subject of the TLS client certificate it must present. Pure data and
parsing; the check against an association's calling AE title and address is :mod:`bastion.dimse.access`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bastion.model.remotes import AE_TITLE

#: The DIMSE services a peer may be granted: C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET and Storage Commitment's
#: N-ACTION (PS3.7 9, 10; PS3.4 J).
DIMSE_SERVICES = ("echo", "store", "find", "move", "get", "commit")
_PEER_KEYS = frozenset({"host", "services", "move_destinations", "tls_subject"})
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                          r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class DicomPeer:
    """A known calling AE: ``aet`` may associate from ``networks`` or ``hostnames`` (resolved when it calls) and
    use ``services``; C-MOVE only to ``move_destinations`` when given (None: any configured remote AE); over TLS
    with a client certificate whose subject common name is ``tls_subject`` when given."""

    aet: str
    networks: tuple[Network, ...]
    hostnames: tuple[str, ...]
    services: frozenset[str]
    move_destinations: frozenset[str] | None = None
    tls_subject: str = ""

    @classmethod
    def from_table(cls, aet: str, table: Any) -> DicomPeer:
        """A peer from its TOML inline table, e.g. ``{ host = "10.0.0.5", services = ["echo", "store"] }``;
        ValueError says what is wrong."""
        aet = _check_aet(aet)
        if not isinstance(table, Mapping):
            raise ValueError(f"[dimse.peers] {aet} must be a table such as "
                             "{ host = \"10.0.0.5\", services = [\"echo\", \"store\"] }")
        unknown = set(table) - _PEER_KEYS
        if unknown:
            raise ValueError(f"[dimse.peers] {aet}: unknown key(s) {', '.join(sorted(unknown))} "
                             f"({', '.join(sorted(_PEER_KEYS))})")
        if "host" not in table or "services" not in table:
            raise ValueError(f"[dimse.peers] {aet} needs host and services")
        destinations = table.get("move_destinations")
        return cls.build(aet, _strings(table["host"]), _strings(table["services"]),
                         None if destinations is None else _strings(destinations),
                         str(table.get("tls_subject", "")).strip())

    @classmethod
    def build(cls, aet: str, hosts: Iterable[str], services: Iterable[str],
              move_destinations: Iterable[str] | None = None, tls_subject: str = "") -> DicomPeer:
        """A peer from its parts; ValueError for a host, service or destination that is not one."""
        networks: list[Network] = []
        hostnames: list[str] = []
        for host in hosts:
            try:
                networks.append(ipaddress.ip_network(host, strict=False))
            except ValueError:
                if not _HOSTNAME_RE.match(host):
                    raise ValueError(f"[dimse.peers] {aet}: host {host!r} is neither an IP address, a CIDR network "
                                     "nor a host name") from None
                hostnames.append(host.rstrip(".").lower())
        if not networks and not hostnames:
            raise ValueError(f"[dimse.peers] {aet}: no host (use \"0.0.0.0/0\" and \"::/0\" for any)")
        granted = {s.lower() for s in services}
        if "*" in granted:
            granted = set(DIMSE_SERVICES)
        wrong = granted - set(DIMSE_SERVICES)
        if wrong:
            raise ValueError(f"[dimse.peers] {aet}: unknown service(s) {', '.join(sorted(wrong))} "
                             f"(any of {', '.join(DIMSE_SERVICES)}, or \"*\")")
        destinations = None
        if move_destinations is not None:
            if "move" not in granted:
                raise ValueError(f"[dimse.peers] {aet}: move_destinations without the move service")
            destinations = frozenset(_check_aet(d) for d in move_destinations)
        return cls(aet, tuple(networks), tuple(hostnames), frozenset(granted), destinations, tls_subject)

    def covers(self, address: str) -> bool:
        """Whether the IP ``address`` is in one of the peer's networks (an IPv4-mapped IPv6 address counts as
        its IPv4 address). Host names are not looked at here."""
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)


def parse_peers(value: Any) -> tuple[DicomPeer, ...]:
    """``[dimse.peers]`` (a mapping of AE title to table) or its environment form (:func:`parse_peers_text`)."""
    if isinstance(value, str):
        return parse_peers_text(value)
    if isinstance(value, Mapping):
        peers = tuple(DicomPeer.from_table(str(aet), table) for aet, table in value.items())
    else:
        peers = tuple(value)
        if not all(isinstance(p, DicomPeer) for p in peers):
            raise ValueError("[dimse.peers] must be a table of AE title = { host = ..., services = [...] }")
    titles = [p.aet for p in peers]
    twice = sorted({t for t in titles if titles.count(t) > 1})
    if twice:
        raise ValueError(f"[dimse.peers] lists {', '.join(twice)} twice")
    return peers


def parse_peers_text(text: str) -> tuple[DicomPeer, ...]:
    """The compact form of ``BASTION_DIMSE_PEERS``: peers separated by ``,``, each
    ``AET@HOST[|HOST...]=SERVICE[+SERVICE...][>DEST[+DEST...]]``, e.g.
    ``CT1@10.0.0.5=echo+store,WS1@10.0.1.0/24|ws1.example.org=echo+find+move>WS1``."""
    peers = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"([^@=]{1,16})@([^=]+)=([^>]+)(?:>(.+))?", part)
        if not m:
            raise ValueError(f"dimse peer {part!r} is not AET@HOST[|HOST]=SERVICE[+SERVICE][>DEST[+DEST]]")
        aet, hosts, services, dests = m.groups()
        peers.append(DicomPeer.build(_check_aet(aet), [h.strip() for h in hosts.split("|") if h.strip()],
                                     [s.strip() for s in services.split("+") if s.strip()],
                                     None if dests is None else [d.strip() for d in dests.split("+") if d.strip()]))
    return parse_peers(peers)


def _strings(value: Any) -> list[str]:
    """A string or a list of strings as a list of non-empty stripped strings."""
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if items is None or not all(isinstance(v, str) for v in items):
        raise ValueError(f"{value!r} is not a string or a list of strings")
    return [v.strip() for v in items if v.strip()]


def _check_aet(aet: str) -> str:
    if not AE_TITLE.match(aet) or not aet.strip():
        raise ValueError(f"{aet!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return aet.strip()
