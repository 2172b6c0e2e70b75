"""The S3 store's small-object writes through obstore: the ingest's hot path, at a tenth of boto3's CPU.

boto3 spends about 1.4 ms of CPU on one ``PutObject`` of a few kilobytes (request model, signing, parsing, in
Python); obstore (the Rust ``object_store`` crate behind a small Python API) about 0.15 ms, and answers sooner
(BENCHMARKS.md section 4). :class:`S3BlobStore` (:mod:`bastion.blobs.s3`) sends the objects it holds in memory
through :class:`FastPut` (up to :data:`~bastion.blobs.spooling.MEMORY_LIMIT`, most DICOM objects) and keeps
boto3 for everything else: multipart uploads, reads, listing, deletion, the start-up check.

Invariants:

* The same request as boto3's: ``PutObject`` with ``If-None-Match: *`` and the content digest as user metadata
  (``x-amz-meta-bastion-digest``), the same endpoint, region and path-style addressing, and credentials from
  boto3's session (its default chain: environment, files, instance roles), asked again every
  :data:`CREDENTIAL_TTL`, so both clients always sign as the same identity.
* obstore runs its requests on a runtime of threads made on first use; a process forked after that cannot use
  it (its requests never complete). :func:`usable` is false in such a child and the store falls back to boto3:
  a put is never left waiting. Bastion's supervisor forks before any store is used, so its processes use obstore.
* An error is raised as the store's others are: a key that exists as :class:`Exists` (the caller settles it as
  for boto3's 412), anything else as :class:`~bastion.errors.StorageError` naming the endpoint and bucket.
"""

from __future__ import annotations

import datetime
import os
import threading
from typing import TYPE_CHECKING

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import S3Store

from bastion.errors import StorageError

if TYPE_CHECKING:
    from boto3.session import Session
    from obstore.store import ClientConfig, S3Credential

#: How long obstore may use credentials before it asks boto3's session again (which refreshes temporary ones).
CREDENTIAL_TTL = datetime.timedelta(minutes=5)
#: Retries of a request that failed on the network or with a 5xx, and the time they may take in all.
RETRIES, RETRY_TIMEOUT = 3, datetime.timedelta(seconds=60)

_state = {"started_in": 0}  # the pid of the process that started obstore's runtime, 0 before


def _after_fork_in_child() -> None:
    if _state["started_in"]:
        _state["started_in"] = -1  # the runtime's threads are not in this process


os.register_at_fork(after_in_child=_after_fork_in_child)


def usable() -> bool:
    """Whether this process can send requests through obstore (not forked from a process that had started its
    runtime)."""
    return _state["started_in"] != -1


class Exists(Exception):
    """The key holds an object already (``If-None-Match: *`` refused it)."""


class FastPut:
    """``PutObject`` of in-memory objects into ``bucket`` through obstore (module doc)."""

    def __init__(self, bucket: str, endpoint: str | None, region: str, session: Session, resolved: str) -> None:
        self.bucket, self.endpoint = bucket, resolved
        self.where = f"bucket {bucket} at {resolved}"
        self._session = session
        self._lock = threading.Lock()
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

    def put(self, full: str, data: bytearray, digest_meta: dict[str, str], what: str) -> None:
        """Store ``data`` as ``full`` unless the key exists (:class:`Exists`); StorageError for anything else."""
        if not _state["started_in"]:
            with self._lock:
                _state["started_in"] = _state["started_in"] or os.getpid()
        try:
            obstore.put(self._store, full, memoryview(data), mode="create", attributes=digest_meta)
        except (AlreadyExistsError, PreconditionError):
            raise Exists(full) from None
        except (PermissionDeniedError, UnauthenticatedError) as exc:
            raise StorageError(f"{what}: access denied to {self.where}: check the credentials "
                               f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY): {_first_line(exc)}") from exc
        except FileNotFoundError as exc:
            if "NoSuchBucket" in str(exc):
                raise StorageError(f"{what}: bucket {self.bucket} does not exist at {self.endpoint}") from exc
            raise StorageError(f"{what}: {self.where}: {_first_line(exc)}") from exc
        except Exception as exc:  # noqa: BLE001 - obstore's errors of the network and the server
            if "error sending request" in str(exc) or "connect" in str(exc).lower():
                raise StorageError(f"{what}: cannot reach S3 at {self.endpoint}: {_first_line(exc)}") from exc
            raise StorageError(f"{what}: {self.where}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    return str(exc).split("\n", 1)[0][:300]
