"""The S3 store's object writes and reads through obstore: the hot paths, at a tenth of boto3's CPU.

boto3 spends about 1.4 ms of CPU on one ``PutObject`` of a few kilobytes (request model, signing, parsing, in
Python); obstore (the Rust ``object_store`` crate behind a small Python API) about 0.15 ms, and answers sooner
(BENCHMARKS.md section 4). :class:`S3BlobStore` (:mod:`bastion.blobs.s3`) sends through :class:`FastS3` the
objects it holds in memory (up to :data:`~bastion.blobs.spooling.MEMORY_LIMIT`, most DICOM objects) and every
GET (whole or ranged: retrieval, the metadata warmer, the rebuild); boto3 keeps multipart uploads, listing,
deletion, copies and the start-up check.

Invariants:

* The same requests as boto3's: ``PutObject`` with ``If-None-Match: *`` and the content digest as user metadata
  (``x-amz-meta-bastion-digest``), ranged ``GetObject``; the same endpoint, region and addressing, and credentials
  from boto3's session (its default chain: environment, files, instance roles), asked again every
  :data:`CREDENTIAL_TTL`, so both clients always sign as the same identity.
* obstore runs its requests on a runtime of threads made on first use; a process forked after that cannot use
  it (its requests never complete). :func:`usable` is false in such a child and the store falls back to boto3:
  a request is never left waiting. ``bastion serve``'s supervisor calls :func:`hold_off` before it opens the
  archive, so its own start-up work goes through boto3 and the processes it forks use obstore.
* Errors are raised as the store's others are: a key that exists as :class:`Exists` (the caller settles it as for
  boto3's 412), a missing key as :class:`~bastion.errors.NotFound`, anything else as
  :class:`~bastion.errors.StorageError` naming the endpoint and bucket.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import S3Store

from bastion.errors import NotFound, StorageError

if TYPE_CHECKING:
    from boto3.session import Session
    from obstore.store import ClientConfig, S3Credential

#: How long obstore may use credentials before it asks boto3's session again (which refreshes temporary ones).
CREDENTIAL_TTL = datetime.timedelta(minutes=5)
#: Retries of a request that failed on the network or with a 5xx, and the time they may take in all.
RETRIES, RETRY_TIMEOUT = 3, datetime.timedelta(seconds=60)

#: obstore's runtime in this process: 0 not started, a pid started there, HELD not to be started here,
#: INHERITED started in the process this one was forked from (unusable here).
HELD, INHERITED = -2, -1
_runtime = {"state": 0}
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    state = _runtime["state"]
    _runtime["state"] = INHERITED if state > 0 else 0  # a child of a held-off process may start its own


os.register_at_fork(after_in_child=_after_fork_in_child)


def usable() -> bool:
    """Whether this process may send requests through obstore."""
    return _runtime["state"] in (0, os.getpid())


def hold_off() -> None:
    """Keep this process's requests on boto3 (a process that forks workers later); its children may use obstore."""
    with _lock:
        if _runtime["state"] == 0:
            _runtime["state"] = HELD


def _starting() -> None:
    if _runtime["state"] == 0:
        with _lock:
            _runtime["state"] = _runtime["state"] or os.getpid()


class Exists(Exception):
    """The key holds an object already (``If-None-Match: *`` refused it)."""


class FastS3:
    """Puts and GETs on ``bucket`` through obstore (module doc); ``resolved`` is the endpoint's URL as boto3
    resolved it (for messages)."""

    def __init__(self, bucket: str, endpoint: str | None, region: str, session: Session, resolved: str) -> None:
        self.bucket, self.endpoint = bucket, resolved
        self.where = f"bucket {bucket} at {resolved}"
        self._session = session
        options: ClientConfig = {"timeout": datetime.timedelta(seconds=60),
                                 "connect_timeout": datetime.timedelta(seconds=10)}
        if endpoint and endpoint.startswith("http://"):
            options["allow_http"] = True
        self._store = S3Store(bucket, endpoint=endpoint, region=region, virtual_hosted_style_request=not endpoint,
                              client_options=options,
                              retry_config={"max_retries": RETRIES, "retry_timeout": RETRY_TIMEOUT},
                              credential_provider=self._credentials)

    def _credentials(self) -> S3Credential:
        """boto3's current credentials (refreshed by its session when temporary)."""
        found = self._session.get_credentials()
        frozen = None if found is None else found.get_frozen_credentials()
        if frozen is None or not frozen.access_key or not frozen.secret_key:
            raise StorageError(f"no S3 credentials for {self.where}: set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY")
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key, "token": frozen.token,
                "expires_at": datetime.datetime.now(datetime.UTC) + CREDENTIAL_TTL}

    @contextlib.contextmanager
    def _translated(self, what: str, key: str) -> Iterator[None]:
        _starting()
        try:
            yield
        except (AlreadyExistsError, PreconditionError):
            raise Exists(key) from None
        except (PermissionDeniedError, UnauthenticatedError) as exc:
            raise StorageError(f"{what}: access denied to {self.where}: check the credentials "
                               f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY): {_first_line(exc)}") from exc
        except FileNotFoundError as exc:
            if "NoSuchBucket" in str(exc):
                raise StorageError(f"{what}: bucket {self.bucket} does not exist at {self.endpoint}") from exc
            raise NotFound(f"object {key} is missing from the blob store") from exc
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - obstore's errors of the network and the server
            if "error sending request" in str(exc) or "connect" in str(exc).lower():
                raise StorageError(f"{what}: cannot reach S3 at {self.endpoint}: {_first_line(exc)}") from exc
            raise StorageError(f"{what}: {self.where}: {_first_line(exc)}") from exc

    def put(self, key: str, full: str, data: bytearray, metadata: dict[str, str]) -> None:
        """Store ``data`` as ``full`` unless the key exists (:class:`Exists`)."""
        with self._translated(f"cannot commit {key}", key):
            obstore.put(self._store, full, memoryview(data), mode="create", attributes=metadata)

    def head(self, key: str, full: str, length: int) -> tuple[int, bytes]:
        """The object's size and its first ``length`` bytes (all of it if shorter), in one GET."""
        with self._translated(f"cannot read {key}", key):
            try:
                answer = obstore.get(self._store, full, options={"range": (0, length)})
            except Exception as exc:  # noqa: BLE001 - S3 refuses any range of an empty object (416)
                if "416" not in str(exc):
                    raise
                return int(obstore.head(self._store, full)["size"]), b""
            return int(answer.meta["size"]), bytes(answer.bytes())

    def fetch(self, key: str, full: str, start: int, end: int) -> memoryview:
        """Bytes ``[start, end)`` of the object (one ranged GET; fewer past its end)."""
        with self._translated(f"cannot read {key}", key):
            return memoryview(obstore.get_range(self._store, full, start=start, end=end))

    def get(self, key: str, full: str) -> bytes:
        """The whole object (one GET)."""
        with self._translated(f"cannot read {key}", key):
            return bytes(obstore.get(self._store, full).bytes())


def _first_line(exc: BaseException) -> str:
    return str(exc).split("\n", 1)[0][:300]
