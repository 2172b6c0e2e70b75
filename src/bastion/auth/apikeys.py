"""API keys for services (a modality's uploader, a script): made by ``bastion apikey create``, sent as
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

A key is :data:`PREFIX` and 43 characters of ``secrets.token_urlsafe`` (256 random bits), printed once. Only its
SHA-256 is kept, in ``<data>/auth/apikeys.json`` with its name, role and times (a key of this entropy needs no
slow hash: there is nothing to guess). A running server reads the file again when it changes, so a creation or a
revocation takes effect within :data:`RELOAD_EVERY` seconds, without a restart.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bastion.auth.principal import ROLES, Principal

#: Every API key starts with this, so that a leaked one is recognisable (secret scanners, logs).
PREFIX = "bst_"
#: Seconds between two looks at the key file by a running server.
RELOAD_EVERY = 1.0
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.@")


class ApiKeyError(ValueError):
    """A key cannot be made or revoked as asked."""


@dataclass(frozen=True)
class ApiKey:
    """One key's record: never the key itself."""

    name: str
    role: str
    sha256: str
    created: float
    revoked: float | None = None


def key_path(data: Path) -> Path:
    """Where the keys of the archive at ``data`` are kept."""
    return data / "auth" / "apikeys.json"


def digest(key: str) -> str:
    """The SHA-256 (hex) a key is stored and looked up by."""
    return hashlib.sha256(key.encode()).hexdigest()


def _read(path: Path) -> list[ApiKey]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    return [ApiKey(**entry) for entry in doc.get("keys", [])]


def _write(path: Path, keys: list[ApiKey]) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"keys": [asdict(k) for k in keys]}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise the commands that change the file (two ``apikey create`` at once)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def create(data: Path, name: str, role: str) -> str:
    """Make a key called ``name`` with ``role``; returns the key (the only time it exists in clear)."""
    if not name or len(name) > 64 or not set(name) <= _NAME_CHARS:
        raise ApiKeyError(f"key name {name!r}: 1-64 characters of letters, digits and -_.@")
    if role not in ROLES:
        raise ApiKeyError(f"role {role!r} is not one of {', '.join(ROLES)}")
    path = key_path(data)
    with _locked(path):
        keys = _read(path)
        if any(k.name == name and k.revoked is None for k in keys):
            raise ApiKeyError(f"a key named {name!r} exists: revoke it first")
        key = PREFIX + secrets.token_urlsafe(32)
        keys.append(ApiKey(name=name, role=role, sha256=digest(key), created=time.time()))
        _write(path, keys)
    return key


def revoke(data: Path, name: str) -> int:
    """Revoke the live key(s) called ``name``; returns how many (0: none of that name)."""
    path = key_path(data)
    with _locked(path):
        keys = _read(path)
        now = time.time()
        changed = [k if k.name != name or k.revoked is not None else ApiKey(**{**asdict(k), "revoked": now})
                   for k in keys]
        count = sum(1 for old, new in zip(keys, changed, strict=True) if old is not new)
        if count:
            _write(path, changed)
    return count


def listing(data: Path) -> list[ApiKey]:
    """Every key made, revoked ones too."""
    return _read(key_path(data))


class ApiKeyStore:
    """The live keys, as a running server sees them: looked up by SHA-256, read again when the file changes."""

    def __init__(self, data: Path) -> None:
        self.path = key_path(data)
        self._lock = threading.Lock()
        self._by_digest: dict[str, ApiKey] = {}
        self._stamp: Any = None
        self._checked = 0.0

    def _reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_EVERY:
            return
        with self._lock:
            self._checked = now
            try:
                st = os.stat(self.path)
                stamp: Any = (st.st_mtime_ns, st.st_size, st.st_ino)
            except FileNotFoundError:
                stamp = None
            if stamp == self._stamp:
                return
            keys = _read(self.path) if stamp else []
            self._by_digest = {k.sha256: k for k in keys if k.revoked is None}
            self._stamp = stamp

    def principal(self, key: str) -> Principal | None:
        """The party a presented key stands for, or None if it is no live key."""
        self._reload()
        wanted = digest(key)
        found = self._by_digest.get(wanted)
        if found is None or not hmac.compare_digest(found.sha256, wanted):
            return None
        return Principal(user=found.name, role=found.role, via="apikey")
