"""Exporting the audit log: JSON lines with the full PS3.15 A.5 message, or RFC 5424 syslog messages whose MSG is
the message's XML (what an IHE ATNA Audit Record Repository takes), written out or sent over TLS (RFC 5425)."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

from bastion.audit.chain import lines, parse_entry
from bastion.audit.messages import audit_message, to_xml
from bastion.errors import BastionError

#: RFC 5424 PRI: facility 10 (security/authorization, authpriv) and severity 5 (notice) for success, 4 (warning)
#: for a failure, as IHE ITI-20 asks.
FACILITY = 10
#: MSGID of an audit message in the DICOM (RFC 3881 derived) schema (IHE ITI TF-2a 3.20.4.2.2).
MSGID = "IHE+RFC-3881"
APP_NAME = "bastion"
#: RFC 5424 6.4: a UTF-8 MSG starts with the byte order mark.
BOM = "\ufeff"


def entries(directory: str, since: str = "") -> Iterator[dict[str, Any]]:
    """The sealed entries of the log, oldest first; ``since`` (ISO 8601, UTC, a prefix such as ``2026-12-07`` is
    enough): only those whose time is at or after it."""
    for line in lines(directory):
        entry = parse_entry(line.raw)
        if entry is not None and entry.get("time", "") >= since:
            yield entry


def jsonl_record(entry: dict[str, Any], source: str) -> str:
    """One export line: the chain fields (seq, time, hash, prev) and the compact event, plus ``message``: the full
    PS3.15 A.5 audit message."""
    return json.dumps({**entry, "message": audit_message(entry, source)}, separators=(",", ":"))


def syslog_record(entry: dict[str, Any], source: str, hostname: str) -> str:
    """One RFC 5424 syslog message (without framing): ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG``,
    MSG the audit message's XML (PS3.15 A.5.1), PROCID the entry's seq."""
    severity = 5 if int(entry.get("outcome", 0)) == 0 else 4
    xml = to_xml(audit_message(entry, source))
    return (f"<{FACILITY * 8 + severity}>1 {entry['time']} {hostname or '-'} {APP_NAME} {entry['seq']} {MSGID} - "
            f"{BOM}{xml}")


def octet_counted(message: str) -> bytes:
    """RFC 5425 4.3 framing: ``MSG-LEN SP SYSLOG-MSG``, the length in octets."""
    body = message.encode("utf-8")
    return str(len(body)).encode("ascii") + b" " + body


def send_tls(url: str, messages: Iterable[str], *, cafile: str | None = None, timeout: float = 30.0) -> int:
    """Send ``messages`` to ``tls://host:port`` (RFC 5425: syslog over TLS, octet-counted); the number sent.

    The server's certificate is checked against ``cafile`` (else the system's trust store) and its host name.
    Raises BastionError when the address is not ``tls://host:port`` or the connection fails.
    """
    parts = urlsplit(url)
    if parts.scheme != "tls" or not parts.hostname or not parts.port:
        raise BastionError(f"--send {url!r}: expected tls://HOST:PORT")
    context = ssl.create_default_context(cafile=cafile)
    sent = 0
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=parts.hostname) as tls:
            for message in messages:
                tls.sendall(octet_counted(message))
                sent += 1
            _close_gracefully(tls)
    except (OSError, ssl.SSLError) as exc:
        raise BastionError(f"sending the audit log to {url}: {exc} ({sent} messages sent)") from exc
    return sent


def _close_gracefully(tls: ssl.SSLSocket) -> None:
    """End a TLS connection so that the collector reads everything sent: send close_notify and read what the
    collector still sends (a TLS 1.3 session ticket) until it closes too. Closing with that unread would make the
    kernel reset the connection, and the collector could lose the last messages, already counted as sent."""
    try:
        tls.settimeout(min(tls.gettimeout() or 5.0, 5.0))  # a collector that never answers is not waited for long
        tls.unwrap()
    except (OSError, ssl.SSLError, ValueError):
        pass  # the collector closed without its close_notify: it has read what was sent by then
