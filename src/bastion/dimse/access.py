"""DICOM access control: who may associate, and which DIMSE services each association may use.

The check is made once per association, when its A-ASSOCIATE-RQ arrives (:meth:`AccessPolicy.admit`): a request
that fails it is answered A-ASSOCIATE-RJ rejected-permanent, source DICOM UL service-user, with the reason of
PS3.8 9.3.4 (Table 9-21): 3 "calling AE title not recognized" or 7 "called AE title not recognized". One that
passes gets a :class:`Grant`, the services of its peer; each request is then checked against it with a set lookup
(:meth:`Grant.allows`), and one not granted is refused with 0x0124 "Refused: Not Authorized" (PS3.7 Annex C).

With unknown peers allowed (``dimse_allow_unknown``, by default while ``[dimse.peers]`` is empty), an unlisted
calling AE gets every service and any called AE title is accepted, as before access control; a listed AE title
must still call from one of its hosts (and, when it names ``tls_subject``, over TLS with that certificate).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass

from bastion.dimse import messages as m
from bastion.dimse.pdu import REASON_CALLED_AE_NOT_RECOGNIZED, REASON_CALLING_AE_NOT_RECOGNIZED
from bastion.errors import BastionError
from bastion.model.peers import DIMSE_SERVICES, DicomPeer
from bastion.model.uids import STORAGE_COMMITMENT_PUSH
from bastion.settings import Settings

log = logging.getLogger("bastion.dimse")

#: The status of a request for a service the association was not granted (PS3.7 Annex C.5.x "Refused: Not
#: Authorized").
NOT_AUTHORIZED = 0x0124
#: How long a peer's host name stays resolved.
RESOLVE_TTL_S = 60.0


class ServiceRefused(BastionError):
    """A DIMSE request for a service the calling AE was not granted (PS3.7 Annex C 0x0124)."""

    dimse_status = NOT_AUTHORIZED
    http_status = 403


@dataclass(frozen=True)
class Grant:
    """What one association may do: ``services`` among :data:`DIMSE_SERVICES`, C-MOVE to ``move_destinations``
    only when given (None: any configured remote AE); ``peer`` is the listed AE title it matched ("" for an
    unknown AE allowed in)."""

    services: frozenset[str]
    move_destinations: frozenset[str] | None = None
    peer: str = ""

    def allows(self, service: str) -> bool:
        return service in self.services

    def may_move_to(self, destination: str) -> bool:
        return self.move_destinations is None or destination in self.move_destinations


#: Everything: an unknown AE while unknown peers are allowed.
ALL = Grant(frozenset(DIMSE_SERVICES))


@dataclass(frozen=True)
class Rejection:
    """An association refused: the A-ASSOCIATE-RJ reason (:data:`~bastion.dimse.pdu.REASON_CALLING_AE_NOT_RECOGNIZED`,
    :data:`~bastion.dimse.pdu.REASON_CALLED_AE_NOT_RECOGNIZED`)
    and why, in words (logged and audited)."""

    reason: int
    detail: str


def service_of(command_field: int, abstract_syntax: str) -> str | None:
    """The :data:`DIMSE_SERVICES` name of a request, None for a message that is not a request for a service
    (responses, C-CANCEL, an operation Bastion does not provide)."""
    if command_field == m.N_ACTION_RQ:
        return "commit" if abstract_syntax == STORAGE_COMMITMENT_PUSH else None
    return _SERVICE_OF.get(command_field)


_SERVICE_OF = {m.C_ECHO_RQ: "echo", m.C_STORE_RQ: "store", m.C_FIND_RQ: "find", m.C_MOVE_RQ: "move",
               m.C_GET_RQ: "get"}


def certificate_subject(peercert: object) -> str:
    """The subject common name of a verified TLS client certificate (``SSLSocket.getpeercert()``), "" for none."""
    if not isinstance(peercert, dict):
        return ""
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


class AccessPolicy:
    """The ``[dimse.peers]`` rules of one server (:class:`Settings`): :meth:`admit` decides an association."""

    def __init__(self, settings: Settings) -> None:
        self.aet = settings.aet
        self.allow_unknown = settings.allows_unknown_peers
        self.peers: dict[str, DicomPeer] = {p.aet: p for p in settings.dimse_peers}
        self._resolved: dict[str, tuple[float, frozenset[str]]] = {}

    async def admit(self, calling: str, called: str, address: str, subject: str = "") -> Grant | Rejection:
        """Decide the association ``calling`` requests of ``called`` from IP ``address``, over TLS with a client
        certificate whose subject common name is ``subject`` ("" without one)."""
        calling, called = calling.strip(), called.strip()
        if not self.allow_unknown and called != self.aet:
            return Rejection(REASON_CALLED_AE_NOT_RECOGNIZED, f"called AE title {called!r} is not this archive's ({self.aet!r})")
        peer = self.peers.get(calling)
        if peer is None:
            if self.allow_unknown:
                return ALL
            return Rejection(REASON_CALLING_AE_NOT_RECOGNIZED, f"calling AE title {calling!r} is not a known peer")
        if not await self._from_host(peer, address):
            return Rejection(REASON_CALLING_AE_NOT_RECOGNIZED, f"calling AE title {calling!r} is not allowed from {address}")
        if peer.tls_subject and subject != peer.tls_subject:
            shown = f"certificate subject {subject!r}" if subject else "no client certificate"
            return Rejection(REASON_CALLING_AE_NOT_RECOGNIZED, f"calling AE title {calling!r} needs TLS with certificate subject "
                                                f"{peer.tls_subject!r}, not {shown}")
        return Grant(peer.services, peer.move_destinations, peer.aet)

    async def _from_host(self, peer: DicomPeer, address: str) -> bool:
        if peer.covers(address):
            return True
        if not peer.hostnames:
            return False
        ip = _normal(address)
        for hostname in peer.hostnames:
            if ip in await self._addresses(hostname):
                return True
        return False

    async def _addresses(self, hostname: str) -> frozenset[str]:
        """The IP addresses ``hostname`` resolves to, cached for :data:`RESOLVE_TTL_S` (none if it does not)."""
        now = time.monotonic()
        cached = self._resolved.get(hostname)
        if cached is not None and now - cached[0] < RESOLVE_TTL_S:
            return cached[1]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(hostname, None, type=socket.SOCK_STREAM)
            found = frozenset(_normal(str(info[4][0])) for info in infos)
        except OSError as exc:
            log.warning("cannot resolve %s, a host of a DICOM peer: %s", hostname, exc)
            found = frozenset()
        self._resolved[hostname] = (now, found)
        return found


def _normal(address: str) -> str:
    """An IP address in one form (an IPv4-mapped IPv6 address as its IPv4 address)."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)
