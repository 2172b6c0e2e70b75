"""The identity provider's signing keys (a JSON Web Key Set, RFC 7517 section 5), kept on disk.

The set comes from ``auth_jwks_url`` and/or ``auth_jwks_file``. What the URL last answered is written to
``<data>/auth/jwks.json``, so a server restarted while the identity provider is down still validates tokens. The
URL is fetched again every ``auth_jwks_refresh`` seconds, and sooner when a token names a key id the set lacks
(a key rotation), at most once every :data:`MIN_REFETCH` seconds so that forged key ids cannot hammer the issuer.
Only asymmetric keys (RSA, EC, OKP) are kept: a symmetric ``oct`` key would let anyone holding the public set
forge an HS* token.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from joserfc.jwk import KeySet

log = logging.getLogger(__name__)

#: The fewest seconds between two fetches of the JWKS URL caused by an unknown key id.
MIN_REFETCH = 10.0
#: Seconds a fetch of the JWKS URL may take.
FETCH_TIMEOUT = 5.0
_ASYMMETRIC = ("RSA", "EC", "OKP")


def fetch_url(url: str) -> dict[str, Any]:
    """GET a JWKS document (JSON) from ``url``; raises OSError or ValueError."""
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT) as rsp:  # noqa: S310 (an https:// or http:// URL)
        doc = json.loads(rsp.read(1 << 20))
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError(f"{url} did not answer a JWK set (no \"keys\" list)")
    return doc


def _keyset(doc: dict[str, Any]) -> KeySet:
    """The asymmetric keys of a JWKS document (others, and keys joserfc cannot read, are left out)."""
    keys = [k for k in doc.get("keys", []) if isinstance(k, dict) and k.get("kty") in _ASYMMETRIC
            and k.get("use", "sig") == "sig"]
    good = []
    for key in keys:
        try:
            KeySet.import_key_set({"keys": [key]})
            good.append(key)
        except Exception as exc:  # a key of an unsupported curve or size: skip it, keep the others
            log.warning("JWKS: key %s left out: %s", key.get("kid", "?"), exc)
    return KeySet.import_key_set({"keys": good}) if good else KeySet([])


class JwksSource:
    """The current key set of the issuer, from the URL (cached on disk) and/or a file."""

    def __init__(self, url: str, file: str, cache: Path, refresh: float,
                 fetch: Callable[[str], dict[str, Any]] = fetch_url) -> None:
        self.url, self.file, self.cache, self.refresh = url, file, cache, refresh
        self._fetch = fetch
        self._lock = threading.Lock()
        self._fetched_at = 0.0  # when the URL last answered (or the cache file was written)
        self._tried_at = 0.0  # when the URL was last tried
        self._url_doc: dict[str, Any] = {"keys": []}
        self._file_doc: dict[str, Any] = {"keys": []}
        self._file_mtime = -1.0
        self.keys = KeySet([])
        self.last_error = ""
        if url and cache.exists():
            try:
                self._url_doc = json.loads(cache.read_text())
                self._fetched_at = cache.stat().st_mtime
            except (OSError, ValueError) as exc:
                log.warning("JWKS cache %s unreadable (%s): fetching %s", cache, exc, url)
        self._read_file()
        self._combine()

    def _read_file(self) -> None:
        if not self.file:
            return
        try:
            mtime = os.stat(self.file).st_mtime
            if mtime != self._file_mtime:
                self._file_doc = json.loads(Path(self.file).read_text())
                self._file_mtime = mtime
        except (OSError, ValueError) as exc:
            self.last_error = f"cannot read auth_jwks_file {self.file}: {exc}"
            log.warning("%s", self.last_error)

    def _combine(self) -> None:
        self.keys = _keyset({"keys": [*self._url_doc.get("keys", []), *self._file_doc.get("keys", [])]})

    def has(self, kid: str | None) -> bool:
        """Whether the set holds a key with id ``kid`` (None: whether it holds any key)."""
        if kid is None:
            return bool(self.keys.keys)
        return any(k.kid == kid for k in self.keys.keys)

    def current(self, kid: str | None) -> KeySet:
        """The key set to verify a token whose header names ``kid``: fetched again first when it is due (periodic
        refresh, or ``kid`` unknown and the last try at least :data:`MIN_REFETCH` seconds ago). Blocks while it
        fetches: call it off the event loop."""
        with self._lock:
            self._read_file()
            now = time.time()
            due = self.url and (now - self._fetched_at >= self.refresh
                                or (not self.has(kid) and now - self._tried_at >= MIN_REFETCH))
            if due and now - self._tried_at >= min(MIN_REFETCH, self.refresh):
                self._refetch(now)
            self._combine()
            return self.keys

    def _refetch(self, now: float) -> None:
        self._tried_at = now
        try:
            doc = self._fetch(self.url)
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested past Python's limit
            self.last_error = f"cannot fetch the JWKS from {self.url}: {exc}"
            log.warning("%s (the cached keys stay in use)", self.last_error)
            return
        self._url_doc, self._fetched_at, self.last_error = doc, now, ""
        try:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.cache)
        except OSError as exc:
            log.warning("cannot write the JWKS cache %s: %s", self.cache, exc)
