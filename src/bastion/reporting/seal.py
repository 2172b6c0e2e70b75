"""The report key: only SRs sealed by an archive that holds it bring their report into the reading list.

A signed report's SR carries the version it signs (:func:`bastion.reporting.sr.carried_report`), and the report
intake (:mod:`bastion.reporting.intake`) keeps what SRs carry. Anyone allowed to store objects (a modality, a
STOW-RS client with the ``uploader`` role) could otherwise store an SR that carries a "final" report signed in a
radiologist's name. So the SR also carries an HMAC-SHA256 of the report's bytes under the report key, and the
intake keeps only a report whose seal it verifies.

The key: the file ``report_key_file`` names (``[report] key_file``: 64 hexadecimal digits, e.g. from
``openssl rand -hex 32``), which an edge node and its centre are both given so that the reports signed on the edge
are taken at the centre; else the archive's own, generated once and kept in the blob store(s) beside the reports
(``keys/report-seal.key``, written once: the nodes sharing a blob store share it, and a rebuild finds it
again; not under ``reports/``, so that reports lost with their directory come back from their SRs).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from pathlib import Path

from bastion.blobs.base import BlobStore
from bastion.errors import BastionError
from bastion.settings import SettingsError

#: The blob of the archive's own key (64 hexadecimal digits).
KEY_BLOB = "keys/report-seal.key"
_KEY_BYTES = 32


def _parsed(text: str, where: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) < _KEY_BYTES:
        raise SettingsError(f"the report key in {where} must be at least {2 * _KEY_BYTES} hexadecimal digits "
                            "(e.g. from `openssl rand -hex 32`)")
    return key


def report_key(blobs: BlobStore, key_file: str = "") -> bytes:
    """The report key: ``key_file``'s, else the archive's own in ``blobs`` (made now if it has none)."""
    if key_file:
        try:
            return _parsed(Path(key_file).read_text(encoding="ascii"), key_file)
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"cannot read the report key file {key_file}: {exc}") from exc
    blobs.put_once(KEY_BLOB, secrets.token_hex(_KEY_BYTES).encode())  # the first writer's stays
    try:
        return _parsed(blobs.get(KEY_BLOB).decode("ascii", "replace"), f"the blob {KEY_BLOB}")
    except SettingsError as exc:
        raise BastionError(f"{exc.message}: the archive's report key is damaged") from exc


class ReportKey:
    """The report key of :func:`report_key`, read when made from ``key_file`` (a bad file fails at start), else read
    or made in ``blobs`` on first use: an archive that never signs writes nothing, and one whose store is full or
    unreachable starts all the same (the sign or the intake that needs the key fails then, and is tried again)."""

    def __init__(self, blobs: BlobStore, key_file: str = "") -> None:
        self._blobs = blobs
        self._key = report_key(blobs, key_file) if key_file else None
        self._lock = threading.Lock()

    def __call__(self) -> bytes:
        with self._lock:
            if self._key is None:
                self._key = report_key(self._blobs)
            return self._key


def seal(key: bytes, data: bytes) -> bytes:
    """The seal of ``data`` (a report version's bytes) under ``key``."""
    return hmac.new(key, data, hashlib.sha256).digest()


def sealed(key: bytes, data: bytes, mac: bytes) -> bool:
    """Whether ``mac`` is ``data``'s seal under ``key`` (compared in constant time)."""
    return hmac.compare_digest(seal(key, data), mac)
