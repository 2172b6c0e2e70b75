"""S3 blob store: one S3 object per blob, written once, read by ranges.

Opened by :func:`bastion.blobs.base.open_blob_store` from ``s3://BUCKET/PREFIX?endpoint=URL&region=REGION``
(``endpoint`` for an S3-compatible server such as SeaweedFS or MinIO, addressed path-style; without it, AWS).
Credentials come from boto3's default chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` first). The
bucket is never created: :meth:`S3BlobStore.check` (which ``open_blob_store`` runs) fails with one line naming
the endpoint and bucket if it is missing, the credentials are refused or the endpoint cannot be reached.

Guarantees:

* :meth:`S3Writer.write` never touches the network (the ingest calls it on its event loop): an object is
  buffered in memory up to :data:`MEMORY_LIMIT`, then in an anonymous spool file in ``spool_dir`` (unlinked
  from the start, so a crash leaves no file behind). The upload happens at commit: one ``PutObject`` for an
  object of up to :data:`MEMORY_LIMIT`, a multipart upload of parts streamed from the spool file above it
  (never the whole object in memory; the upload is aborted if any step fails). :meth:`S3Writer.start_commit`
  hands the upload to the store's commit threads and returns at once. The ``PutObject`` and every GET go
  through obstore where the process can (:mod:`bastion.blobs.s3fast`: the same requests at a tenth of boto3's
  CPU), else boto3.
* Objects are written once: ``PutObject`` and ``CompleteMultipartUpload`` are sent with ``If-None-Match: *``,
  which SeaweedFS (4.48, as AWS S3) honours for both, refusing an existing key with 412. A commit refused so
  succeeds if the key holds an object of the same size and the same content digest (recorded in its metadata,
  ``x-amz-meta-bastion-digest``): a retried request, or the same object stored twice (keys carry the digest).
  Anything else fails with :class:`~bastion.errors.StorageError`, and the stored object is left as it was.
* A commit that returned is durable: S3 acknowledges a write once it is stored.
* :meth:`S3BlobStore.open` fetches the first :data:`READ_AHEAD` bytes (the whole of most objects) in one GET,
  which also tells the size and raises :class:`~bastion.errors.NotFound` for a missing key; the rest is
  fetched by ranged GETs as it is read (:class:`bastion.blobs.s3io.RangedObject`).
* Errors of the network, the credentials or the bucket are raised as :class:`~bastion.errors.StorageError`.

A store is not to be used across ``fork``: each process opens its own.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, TYPE_CHECKING, BinaryIO, cast

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from bastion.blobs import s3fast
from bastion.blobs.base import BlobStore, Commit, CommitInThread
from bastion.blobs.fileio import BufferReader, os_error
from bastion.blobs.s3io import FileRange, RangedObject
from bastion.blobs.spooling import SpoolingWriter
from bastion.errors import BastionError, NotFound, StorageError

log = logging.getLogger("bastion.blobs")

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

#: The size of a multipart upload's parts (larger for an object that would otherwise need more than
#: :data:`MAX_PARTS`).
PART_SIZE = 16 * 1024 * 1024
#: S3's limit on the parts of one upload.
MAX_PARTS = 10_000
#: What :meth:`S3BlobStore.open` fetches first, and the read buffer of the file it returns.
READ_AHEAD = 1024 * 1024
#: Threads per store that upload committed objects (:meth:`S3Writer.start_commit`).
COMMIT_THREADS = 8
#: HTTP connections per store: the commit threads' and those of threads reading.
CONNECTIONS = 32
#: The user metadata that records an object's content digest (``x-amz-meta-bastion-digest``).
DIGEST_META = "bastion-digest"
#: Where :meth:`S3BlobStore.set_aside` moves objects (never listed by :meth:`S3BlobStore.keys`).
QUARANTINE = ".quarantine"

_ACCESS_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                           "ExpiredToken", "InvalidClientTokenId", "Forbidden"})


def check_key(key: str) -> str:
    """``key`` if it is a valid blob key (the filesystem store's rule: no empty part, none starting with ``.``)."""
    if not key or key[0] in "/." or key[-1] == "/" or "//" in key or "/." in key:
        raise StorageError(f"invalid blob key {key!r}")
    return key


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Writer(SpoolingWriter):
    """Buffers in memory up to :data:`MEMORY_LIMIT`, then in an anonymous spool file
    (:class:`~bastion.blobs.spooling.SpoolingWriter`); uploads at commit."""

    def __init__(self, store: S3BlobStore) -> None:
        super().__init__(bytearray())
        self._store = store

    def _open_spool(self) -> IO[bytes]:
        return tempfile.TemporaryFile(dir=self._store.spool_dir, prefix="bastion-s3-")  # noqa: SIM115

    def _flushed_spool(self) -> IO[bytes]:
        if self._spool is None:
            raise StorageError("use after commit/abort")
        try:
            self._spool.flush()
        except OSError as exc:
            self.abort()
            raise os_error(exc, "cannot write object") from exc
        return self._spool

    def reader(self) -> BinaryIO:
        if self._buf is not None:
            return cast(BinaryIO, BufferReader(self._buf))
        fd = os.dup(self._flushed_spool().fileno())  # its own: it stays readable after the commit closes the spool
        return cast(BinaryIO, io.BufferedReader(FileRange(fd, owns=True)))

    def _upload(self, key: str) -> Callable[[], None]:
        """The upload of this object under ``key``, which the writer hands over (nothing is left to abort)."""
        full = self._store.full_key(key)
        if self._buf is not None:
            data: bytearray | IO[bytes] = self._buf
        else:
            data = self._flushed_spool()
        self._buf = self._spool = None
        size, digest = self.size, self.digest
        return lambda: self._store.upload(key, full, data, size, digest)

    def commit(self, key: str) -> None:
        """Upload the object now, on this thread."""
        self._upload(key)()

    def start_commit(self, key: str) -> Commit:
        """Hand the upload to the store's commit threads; returns at once (no network on this thread)."""
        return CommitInThread(self._store.committer().submit(self._upload(key)))

    def abort(self) -> None:
        self._buf = None
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()


class S3BlobStore(BlobStore):
    """Objects in ``bucket`` under ``prefix`` (keys as the filesystem store's, ``<prefix>/`` prepended).

    ``endpoint``: an S3-compatible server's URL (path-style addressing); None for AWS. ``credentials``:
    ``(access key id, secret)``, else boto3's default chain. ``spool_dir``: where writers spool objects larger
    than :data:`MEMORY_LIMIT` (default: the system's temporary directory). ``fast``: send the objects held in
    memory through obstore where this process can (:mod:`bastion.blobs.s3fast`); False keeps boto3 for all. The
    constructor does no I/O; :meth:`check` verifies the bucket and credentials.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint: str | None = None, region: str | None = None,
                 credentials: tuple[str, str] | None = None, spool_dir: str | None = None, node_id: str = "",
                 commit_threads: int = COMMIT_THREADS, connections: int = CONNECTIONS, fast: bool = True) -> None:
        if not bucket:
            raise ValueError("an S3 blob store needs a bucket")
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.node_id = node_id
        self.spool_dir = spool_dir or tempfile.gettempdir()
        query = urllib.parse.urlencode({k: v for k, v in (("endpoint", endpoint), ("region", region)) if v}, safe=":/")
        self.location = f"s3://{bucket}/{prefix}" + (f"?{query}" if query else "")
        key_id, secret = credentials or (None, None)
        session = boto3.session.Session(aws_access_key_id=key_id, aws_secret_access_key=secret,
                                        region_name=region or ("us-east-1" if endpoint else None))
        config = Config(max_pool_connections=connections, retries={"mode": "standard"},
                        s3={"addressing_style": "path"} if endpoint else None)
        #: The boto3 client (thread-safe); tests hook its events to count what is fetched.
        self.client: S3Client = session.client("s3", endpoint_url=endpoint, config=config)
        self.endpoint = self.client.meta.endpoint_url
        self._fast = (s3fast.FastS3(bucket, endpoint, region or session.region_name or "us-east-1", session,
                                    self.endpoint) if fast else None)
        #: GET requests sent and the bytes they fetched (whichever client sent them).
        self.fetches = {"requests": 0, "bytes": 0}
        self._root = f"{prefix}/" if prefix else ""
        self._threads = commit_threads
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_location(cls, location: str, *, node_id: str = "") -> S3BlobStore:
        """The store that ``s3://BUCKET/PREFIX?endpoint=URL&region=REGION`` names; ValueError if malformed."""
        url = urllib.parse.urlsplit(location)
        if url.scheme != "s3" or not url.netloc:
            raise ValueError(f"invalid S3 blob store location {location!r}: expected s3://BUCKET/PREFIX")
        params = urllib.parse.parse_qs(url.query, keep_blank_values=True, strict_parsing=bool(url.query))
        unknown = set(params) - {"endpoint", "region"}
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(sorted(unknown))} in blob store location {location!r}")
        return cls(url.netloc, url.path, endpoint=params.get("endpoint", [None])[-1] or None,
                   region=params.get("region", [None])[-1] or None, node_id=node_id)

    # -- errors --------------------------------------------------------------------------------------------
    def error(self, exc: Exception, what: str, key: str | None = None) -> BastionError:
        """The error that ``exc`` (of boto3, on a request about ``key``, or about the bucket) is raised as."""
        where = f"bucket {self.bucket} at {self.endpoint}"
        if isinstance(exc, ClientError):
            code, status = _code(exc), _status(exc)
            if code == "NoSuchBucket" or (status == 404 and key is None):
                return StorageError(f"{what}: bucket {self.bucket} does not exist at {self.endpoint}")
            if code == "NoSuchKey" or status == 404:
                return NotFound(f"object {key} is missing from the blob store")
            if status == 403 or code in _ACCESS_CODES:
                return StorageError(f"{what}: access denied to {where} ({code or status}): check the "
                                    "credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
            message = exc.response.get("Error", {}).get("Message", "")
            return StorageError(f"{what}: {where} answered {status} {code}: {message}".rstrip(": "))
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StorageError(f"{what}: no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY")
        if isinstance(exc, ConnectionError | ConnectionClosedError | ReadTimeoutError):
            return StorageError(f"{what}: cannot reach S3 at {self.endpoint}: {exc}")
        return StorageError(f"{what}: {where}: {exc}")

    @contextlib.contextmanager
    def _translated(self, what: str, key: str | None = None) -> Iterator[None]:
        """Raise boto3's errors inside as :meth:`error` makes them."""
        try:
            yield
        except (ClientError, BotoCoreError) as exc:
            raise self.error(exc, what, key) from exc

    def check(self) -> None:
        """Verify that the bucket exists and the credentials may use it (``HeadBucket``); raise StorageError with
        one line naming the endpoint and bucket otherwise."""
        with self._translated(f"S3 blob store {self.location}"):
            self.client.head_bucket(Bucket=self.bucket)

    # -- keys ----------------------------------------------------------------------------------------------
    def full_key(self, key: str) -> str:
        """The S3 key of blob ``key``; StorageError for an invalid one."""
        return self._root + check_key(key)

    def _list(self, start: str) -> Iterator[tuple[str, int]]:
        """``(key relative to the prefix, size)`` of every S3 object whose key starts with ``start``."""
        pages = iter(self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start))
        while True:
            with self._translated(f"cannot list {start or '/'}"):
                page = next(pages, None)
            if page is None:
                return
            for obj in page.get("Contents", []):
                yield obj["Key"][len(self._root):], obj["Size"]

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every committed key under the directory ``prefix`` (names with a part starting with ``.`` hidden)."""
        prefix = prefix.strip("/")
        for key, _size in self._list(self._root + (f"{prefix}/" if prefix else "")):
            if key and not key.endswith("/") and not any(part.startswith(".") for part in key.split("/")):
                yield key

    # -- writing -------------------------------------------------------------------------------------------
    def writer(self) -> S3Writer:
        return S3Writer(self)

    def committer(self) -> ThreadPoolExecutor:
        """The store's commit threads (:meth:`S3Writer.start_commit`), started on first use."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="bastion-s3-commit")
            return self._executor

    def upload(self, key: str, full: str, data: bytearray | IO[bytes], size: int, digest: str) -> None:
        """Store ``data`` (a buffer, or a spool file that this closes) as ``full``, written once (module doc)."""
        what = f"cannot commit {key}"
        try:
            with self._translated(what, key):
                try:
                    if isinstance(data, bytearray) and (fast := self._fast_here()) is not None:
                        try:
                            fast.put(key, full, data, {DIGEST_META: digest})
                        except s3fast.Exists:
                            self._settle_existing(key, full, size, digest)
                    elif isinstance(data, bytearray):
                        with BufferReader(data) as body:
                            self.client.put_object(Bucket=self.bucket, Key=full, Body=cast(IO[bytes], body),
                                                   ContentLength=size, IfNoneMatch="*",
                                                   Metadata={DIGEST_META: digest})
                    else:
                        self._upload_parts(full, data.fileno(), size, digest)
                except ClientError as exc:
                    if _status(exc) != 412 and _code(exc) != "PreconditionFailed":
                        raise
                    self._settle_existing(key, full, size, digest)
        except NotFound as exc:  # refused as existing, then gone (deleted meanwhile): not stored
            raise StorageError(f"{what}: {exc.message}") from exc
        finally:
            if not isinstance(data, bytearray):
                data.close()

    def put_once(self, key: str, data: bytes) -> bool:
        """One ``PutObject`` with ``If-None-Match: *`` (module doc): S3 answers 412 for a key that exists, and
        the bytes there are compared."""
        full = self.full_key(key)
        with self._translated(f"cannot commit {key}", key):
            try:
                self.client.put_object(Bucket=self.bucket, Key=full, Body=data, ContentLength=len(data),
                                       IfNoneMatch="*")
                return True
            except ClientError as exc:
                if _status(exc) != 412 and _code(exc) != "PreconditionFailed":
                    raise
        return self.get(key) == data

    def _upload_parts(self, full: str, fd: int, size: int, digest: str) -> None:
        """A multipart upload of the file ``fd``'s ``size`` bytes, each part streamed from it (aborted on failure).

        The parts carry CRC32 checksums, as boto3's own transfers send them.
        """
        part_size = max(PART_SIZE, -(-size // MAX_PARTS))
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=full, ChecksumAlgorithm="CRC32",
                                                        Metadata={DIGEST_META: digest})["UploadId"]
        try:
            parts: list[CompletedPartTypeDef] = []
            for number, start in enumerate(range(0, size, part_size), start=1):
                length = min(part_size, size - start)
                with FileRange(fd, start, length) as body:
                    answer = self.client.upload_part(Bucket=self.bucket, Key=full, UploadId=upload_id,
                                                     PartNumber=number, Body=cast(IO[bytes], body),
                                                     ContentLength=length, ChecksumAlgorithm="CRC32")
                part: CompletedPartTypeDef = {"PartNumber": number, "ETag": answer["ETag"]}
                if "ChecksumCRC32" in answer:
                    part["ChecksumCRC32"] = answer["ChecksumCRC32"]
                parts.append(part)
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts}, IfNoneMatch="*")
        except BaseException:
            with contextlib.suppress(ClientError, BotoCoreError):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            raise

    def _settle_existing(self, key: str, full: str, size: int, digest: str) -> None:
        """A write of ``full`` was refused as the key exists: fine if it holds this object (size and digest)."""
        head = self.client.head_object(Bucket=self.bucket, Key=full)
        if head["ContentLength"] != size or head.get("Metadata", {}).get(DIGEST_META, digest) != digest:
            raise StorageError(f"cannot commit {key}: the key already holds another object (objects are written "
                               "once)")

    def abort_stale_uploads(self, older_than: datetime.timedelta) -> int:
        """Abort the multipart uploads under the prefix started more than ``older_than`` ago (what a process that
        died mid-upload left: their parts are stored, and billed, until aborted); return how many."""
        cutoff = datetime.datetime.now(datetime.UTC) - older_than
        aborted = 0
        with self._translated("cannot list incomplete uploads"):
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._root):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] <= cutoff:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                           UploadId=upload["UploadId"])
                        aborted += 1
        return aborted

    # -- reading -------------------------------------------------------------------------------------------
    def _fast_here(self) -> s3fast.FastS3 | None:
        """obstore's client if this process may use it (:func:`bastion.blobs.s3fast.usable`), else None: boto3."""
        return self._fast if self._fast is not None and s3fast.usable() else None

    def _fetched(self, count: int) -> None:
        self.fetches["requests"] += 1
        self.fetches["bytes"] += count

    def open(self, key: str) -> BinaryIO:
        """A buffered, seekable file over the object: its first :data:`READ_AHEAD` bytes are fetched now, the rest
        by ranged GETs as it is read."""
        full = self.full_key(key)
        if (fast := self._fast_here()) is not None:
            size, head = fast.head(key, full, READ_AHEAD)
        else:
            size, head = self._head(key, full)
        self._fetched(len(head))
        raw = RangedObject(size, head, lambda start, view: self._fetch_into(key, full, start, view, size),
                           lambda start, end: self._fetch(key, full, start, end), f"s3://{self.bucket}/{full}")
        return cast(BinaryIO, io.BufferedReader(raw, buffer_size=READ_AHEAD))

    def _head(self, key: str, full: str) -> tuple[int, bytes]:
        """The object's size and first :data:`READ_AHEAD` bytes, through boto3."""
        with self._translated(f"cannot read {key}", key):
            try:
                answer = self.client.get_object(Bucket=self.bucket, Key=full, Range=f"bytes=0-{READ_AHEAD - 1}")
            except ClientError as exc:
                if _status(exc) != 416:
                    raise
                return self.size(key), b""  # an empty object (no byte to range over)
            content_range = answer.get("ContentRange", "")
            with contextlib.closing(answer["Body"]) as body:
                if content_range:  # "bytes 0-1048575/123456789"
                    return int(content_range.rsplit("/", 1)[1]), body.read()
                size = answer["ContentLength"]  # the whole object came: keep what a range would have held
                return size, body.read(min(size, READ_AHEAD))

    def _fetch_into(self, key: str, full: str, start: int, view: memoryview, size: int) -> int:
        """Fill ``view`` with the object's bytes from ``start`` (one ranged GET); return how many came."""
        end = min(start + len(view), size)
        if end <= start:
            return 0
        if (fast := self._fast_here()) is not None:
            got = fast.fetch(key, full, start, end)
            view[: len(got)] = got
            self._fetched(len(got))
            return len(got)
        filled = 0
        with self._translated(f"cannot read {key}", key):
            answer = self.client.get_object(Bucket=self.bucket, Key=full, Range=f"bytes={start}-{end - 1}")
            with contextlib.closing(answer["Body"]) as body:
                for chunk in body.iter_chunks(256 * 1024):
                    take = min(len(chunk), len(view) - filled)
                    view[filled: filled + take] = chunk[:take]
                    filled += take
                    if filled == len(view):
                        break
        self._fetched(filled)
        return filled

    def _fetch(self, key: str, full: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object (one ranged GET)."""
        if (fast := self._fast_here()) is not None:
            data = bytes(fast.fetch(key, full, start, end))
        else:
            with self._translated(f"cannot read {key}", key):
                answer = self.client.get_object(Bucket=self.bucket, Key=full, Range=f"bytes={start}-{end - 1}")
                with contextlib.closing(answer["Body"]) as body:
                    data = body.read()
        self._fetched(len(data))
        return data

    def get(self, key: str) -> bytes:
        """The whole object (one GET)."""
        full = self.full_key(key)
        if (fast := self._fast_here()) is not None:
            data = fast.get(key, full)
        else:
            with self._translated(f"cannot read {key}", key):
                answer = self.client.get_object(Bucket=self.bucket, Key=full)
                with contextlib.closing(answer["Body"]) as body:
                    data = body.read()
        self._fetched(len(data))
        return data

    def size(self, key: str) -> int:
        full = self.full_key(key)
        with self._translated(f"cannot read {key}", key):
            return self.client.head_object(Bucket=self.bucket, Key=full)["ContentLength"]

    # -- removing ------------------------------------------------------------------------------------------
    def delete(self, key: str) -> None:
        full = self.full_key(key)
        with self._translated(f"cannot delete {key}", key):
            self.client.delete_object(Bucket=self.bucket, Key=full)

    def destroy(self, key: str) -> None:
        """Delete every version of the object (a versioned bucket keeps them behind a delete marker), and the
        delete markers; a version under Object Lock retention is refused by S3 (StorageError), as it must be."""
        full = self.full_key(key)
        self.delete(key)
        try:
            pages = self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=full)
            versions = [item["VersionId"] for page in pages
                        for item in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]
                        if item.get("Key") == full and item.get("VersionId") not in (None, "null")]
        except Exception as exc:  # noqa: BLE001 - an endpoint without versioning support: the delete was all
            log.debug("S3 %s: versions of %s not listed: %s", self.location, key, exc)
            return
        with self._translated(f"cannot destroy {key}", key):
            for version in versions:
                self.client.delete_object(Bucket=self.bucket, Key=full, VersionId=version)

    def set_aside(self, key: str) -> str | None:
        """Copy the object to ``.quarantine/<key>`` (never served, listed or indexed from there), then delete it;
        return the new key. A server-side copy: objects up to 5 GiB (S3's limit on one copy)."""
        full = self.full_key(key)
        target = f"{QUARANTINE}/{key}"
        with self._translated(f"cannot set {key} aside", key):
            self.client.copy_object(Bucket=self.bucket, Key=self._root + target,
                                    CopySource={"Bucket": self.bucket, "Key": full})
            self.client.delete_object(Bucket=self.bucket, Key=full)
        return target

    def set_aside_count(self) -> int:
        return sum(1 for _ in self._list(f"{self._root}{QUARANTINE}/"))

    def close(self) -> None:
        """Wait for the commits under way, then close the connections."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        self.client.close()
