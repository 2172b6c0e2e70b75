"""Forwarding the audit log as it grows to an Audit Record Repository: RFC 5424 syslog messages whose MSG is the
PS3.15 A.5 audit message, over TLS with RFC 5425 framing (:mod:`bastion.audit.export`).

A copy outside the node is what makes a rewritten chain detectable (docs/audit.md): the node's administrators can
rewrite ``<data>/audit/``, not the repository. The server's primary process runs one :class:`AuditForwarder`; it
keeps its place in ``<data>/audit/forwarded`` (the last seq sent, and the file and offset after it), so a restart
goes on where it stopped. Delivery is at least once: a crash between a send and the cursor's update sends those
entries again (the syslog PROCID is the entry's seq, to recognise them).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

from bastion.audit.chain import log_files, parse_entry
from bastion.audit.export import send_tls, syslog_record
from bastion.errors import BastionError

log = logging.getLogger("bastion.audit")

#: Where the forwarder keeps its place, in the audit directory.
CURSOR_FILE = "forwarded"
#: The most entries sent over one connection; the rest go at the next round.
MAX_BATCH = 5000


@dataclass
class Cursor:
    """The last entry sent (``seq``), and where the next one starts (``file``, ``offset``)."""

    seq: int = 0
    file: str = ""
    offset: int = 0


def read_cursor(directory: str) -> Cursor:
    """The forwarder's place (the beginning if it has none, or it does not parse)."""
    try:
        with open(os.path.join(directory, CURSOR_FILE), "rb") as fh:
            kept = json.loads(fh.read())
        return Cursor(int(kept["seq"]), str(kept["file"]), int(kept["offset"]))
    except (OSError, ValueError, KeyError, TypeError):
        return Cursor()


def _write_cursor(directory: str, cursor: Cursor) -> None:
    tmp = os.path.join(directory, f".{CURSOR_FILE}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="ascii") as fh:
        json.dump({"seq": cursor.seq, "file": cursor.file, "offset": cursor.offset}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(directory, CURSOR_FILE))


def pending(directory: str, cursor: Cursor, limit: int = MAX_BATCH) -> tuple[list[dict[str, Any]], Cursor]:
    """The whole entries written after ``cursor`` (at most ``limit``), and the cursor after them. A line not yet
    ended (being written, or torn by a crash) waits; entries at or below the cursor's seq are skipped."""
    out: list[dict[str, Any]] = []
    place = Cursor(cursor.seq, cursor.file, cursor.offset)
    for path in log_files(directory):
        name = os.path.basename(path)
        if name < cursor.file:
            continue
        start = cursor.offset if name == cursor.file else 0
        with open(path, "rb") as fh:
            fh.seek(start)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        position = start
        for raw in data[:end].split(b"\n")[:-1]:
            position += len(raw) + 1
            entry = parse_entry(raw)
            if entry is not None and entry["seq"] > place.seq:
                out.append(entry)
                place.seq = entry["seq"]
            place.file, place.offset = name, position
            if len(out) >= limit:
                return out, place
    return out, place


class AuditForwarder:
    """Sends the new entries of the audit log in ``directory`` to ``url`` (``tls://HOST:PORT``) every ``interval``
    seconds, in a thread of its own; ``source`` is the AuditSourceID (the AE title)."""

    def __init__(self, directory: str, url: str, source: str, *, cafile: str | None = None,
                 interval: float = 5.0) -> None:
        self.directory = directory
        self.url = url
        self.source = source
        self.cafile = cafile or None
        self.interval = interval
        self.hostname = socket.gethostname()
        self.sent = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """Send what was written since the last round; the number sent. Raises BastionError if the repository
        cannot be reached (nothing is marked sent then)."""
        cursor = read_cursor(self.directory)
        total = 0
        while True:
            entries, after = pending(self.directory, cursor)
            if entries:
                send_tls(self.url, [syslog_record(e, self.source, self.hostname) for e in entries],
                         cafile=self.cafile)
                total += len(entries)
            if (after.seq, after.file, after.offset) != (cursor.seq, cursor.file, cursor.offset):
                _write_cursor(self.directory, after)
            if len(entries) < MAX_BATCH:
                break
            cursor = after
        self.sent += total
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._round()

    def _round(self) -> None:
        try:
            self.run_once()
            if self.last_error:
                log.info("audit forwarding to %s works again", self.url)
            self.last_error = ""
        except (BastionError, OSError) as exc:
            message = exc.message if isinstance(exc, BastionError) else str(exc)
            if message != self.last_error:
                log.warning("audit forwarding to %s failed (tried again every %g s): %s", self.url, self.interval,
                            message)
            self.last_error = message

    def start(self) -> None:
        """Start forwarding in the background."""
        os.makedirs(self.directory, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="bastion-audit-forward", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop, after one last round (call it once the audit log has been flushed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        self._round()
