"""Landing: small objects made durable in PostgreSQL first, moved to the S3 bucket afterwards (issue 21).

A C-STORE over one association waits for each object to be durable before it is answered, and a ``PutObject``
is the slowest step of that on S3: 1.2-2.3 ms to a SeaweedFS on the same machine, tens of milliseconds to a
cloud's. Where the index is on PostgreSQL (itself replicated synchronously, ``docs/deployment.md``), an object
of up to ``max_bytes`` can be made as durable, and as reachable from every node, by one ``INSERT`` of its bytes
into the index's database (the table ``blob_landing``, migration ``0009_blob_landing``). The landing mover
(:func:`run_mover`, a background process on every node) then puts each landed object into the bucket under the
same key and deletes its row; nodes share the work (``FOR UPDATE SKIP LOCKED``), and a node that dies mid-move
leaves its rows to the others (its transaction is rolled back).

Guarantees of :class:`LandingStore`, the bucket's :class:`~bastion.blobs.s3.S3BlobStore` with a landing in front:

* A commit that returned is durable: the object is in the bucket, or its row is committed in PostgreSQL.
* Every read finds a committed object wherever it is: the landing is read first, then the bucket. The mover
  puts an object into the bucket before it deletes its row, so an object whose row is gone is in the bucket.
* Deleting removes the row first, then the bucket's object: the row's delete waits for a mover holding it, which
  has put the object by then, so a deleted object is never put back.
* Keys are written once, as in the bucket: a key landed twice holds the same bytes (keys carry the digest).
* Objects larger than ``max_bytes`` (or not held in memory), and all objects while the landing holds more than
  ``total_bytes``, go straight to the bucket as before: the landing never grows without bound when the bucket is
  unreachable for long. ``bastion index rebuild`` reads the landing too (:meth:`LandingStore.keys`), and leaves
  it as it is.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, cast

import psycopg
from psycopg_pool import ConnectionPool

from bastion.blobs.base import BlobStore
from bastion.blobs.s3 import S3BlobStore, S3Writer
from bastion.errors import StorageError
from bastion.model import digest as content_digest
from bastion.model.records import parse_object_key

log = logging.getLogger("bastion.blobs")

#: Objects one pass of the mover takes (and holds locked while it puts them).
MOVE_BATCH = 64
#: How often the landing's size is looked up again (for ``total_bytes``).
SIZE_EVERY_S = 1.0
#: How long the mover waits after a pass that moved nothing, or failed.
IDLE_S = 1.0
FAILED_S = 5.0
#: How long the mover passes over an object that it could not move (the bucket refused it, or its bytes are wrong).
PASS_OVER_S = 60.0

Pool = ConnectionPool[psycopg.Connection[Any]]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class LandingWriter(S3Writer):
    """:class:`~bastion.blobs.s3.S3Writer` whose commit lands an object of up to the store's ``max_bytes``, held
    in memory, in PostgreSQL instead of putting it into the bucket."""

    def __init__(self, store: LandingStore) -> None:
        super().__init__(store.store)
        self._landing = store

    def _upload(self, key: str) -> Callable[[], None]:
        buf, landing = self._buf, self._landing
        upload = super()._upload(key)  # checks the key, and takes the object from the writer
        if buf is None or len(buf) > landing.max_bytes:
            return upload
        return lambda: landing.land(key, buf) if landing.has_room() else upload()  # on the commit's thread


class LandingStore(BlobStore):
    """The bucket of ``store`` with the landing of ``pool`` (connections to the index's schema) in front; see the
    module docstring. Closing it closes both."""

    def __init__(self, store: S3BlobStore, pool: Pool, *, max_bytes: int, total_bytes: int) -> None:
        self.store = store
        self.location = store.location
        self.max_bytes = max_bytes
        self.total_bytes = total_bytes
        self._pool = pool
        self._size_at = -SIZE_EVERY_S
        self._room = True
        self._lock = threading.Lock()
        #: Keys the mover passes over until a time (:meth:`move`).
        self._passed_over: dict[str, float] = {}

    # -- the landing ------------------------------------------------------------------------------------------
    def _sql(self, what: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """``statement``'s rows, on its own (autocommit); StorageError naming ``what`` if PostgreSQL fails."""
        try:
            with self._pool.connection() as conn:
                cur = conn.execute(statement, params)
                return cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            raise StorageError(f"{what}: the landing in PostgreSQL failed: {_one_line(exc)}") from exc

    def has_room(self) -> bool:
        """Whether the landing holds less than ``total_bytes`` (looked up at most every :data:`SIZE_EVERY_S`)."""
        now = time.monotonic()
        if now - self._size_at >= SIZE_EVERY_S:
            with self._lock:
                if now - self._size_at >= SIZE_EVERY_S:
                    self._size_at = now
                    try:
                        size = self._sql("landing size",  # the bytes held, not the table's (it keeps freed space)
                                         "SELECT coalesce(sum(length(data)), 0) FROM blob_landing")[0][0]
                    except StorageError as exc:
                        log.warning("%s", exc)
                        size = self.total_bytes  # unknown: the bucket takes the objects meanwhile
                    room = int(size) < self.total_bytes
                    if room != self._room:
                        log.warning("the landing in PostgreSQL holds %d bytes: objects %s", size,
                                    "land in it again" if room else "go straight to the bucket until it is emptied")
                    self._room = room
        return self._room

    def land(self, key: str, data: bytearray) -> None:
        """Make ``data`` durable as ``key`` in the landing (one statement). A key landed already must hold the
        same bytes (StorageError otherwise, and the row is left as it was)."""
        what = f"cannot commit {key}"
        if self._sql(what, "INSERT INTO blob_landing (key, data) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING "
                           "RETURNING 1", (key, data)):
            return
        same = self._sql(what, "SELECT data = %s FROM blob_landing WHERE key = %s", (data, key))
        if same and not same[0][0]:
            raise StorageError(f"{what}: the landing holds other bytes under that key")
        if not same:  # moved meanwhile: the bucket has it, or refuses other bytes
            self.store.put(key, bytes(data))

    def _landed(self, key: str) -> bytes | None:
        rows = self._sql(f"cannot read {key}", "SELECT data FROM blob_landing WHERE key = %s", (key,))
        return bytes(rows[0][0]) if rows else None

    def backlog(self) -> tuple[int, int]:
        """``(objects, bytes)`` in the landing, waiting for the mover."""
        report = self.landing_report()
        return report["objects"], report["bytes"]

    def landing_report(self) -> dict[str, Any]:
        """What the landing holds, for ``/api/statistics``: ``objects``, ``bytes``, ``oldest_s`` (seconds since the
        oldest landed; None when empty), and the settings ``max_bytes`` and ``total_bytes``."""
        (count, size, oldest), = self._sql("landing backlog", "SELECT count(*), coalesce(sum(length(data)), 0), "
                                           "extract(epoch FROM now() - min(landed_at)) FROM blob_landing")
        return {"objects": int(count), "bytes": int(size), "oldest_s": None if oldest is None else float(oldest),
                "max_bytes": self.max_bytes, "total_bytes": self.total_bytes}

    def move(self, older_than_s: float = 0.0, limit: int = MOVE_BATCH) -> int:
        """One pass of the mover: put up to ``limit`` objects landed ``older_than_s`` ago or more into the bucket
        (oldest first, rows another node holds skipped), then delete their rows, in one transaction. Returns how
        many were moved. A row whose bytes do not match the digest its key names is left, logged and passed over
        for :data:`PASS_OVER_S`; so is one the bucket refuses while it takes others (the rest are not held up
        behind it). StorageError if the bucket refused every object of the pass, or PostgreSQL failed."""
        moved: list[str] = []
        refused: StorageError | None = None
        refused_keys: list[str] = []
        now = time.monotonic()
        try:
            with self._pool.connection() as conn, conn.transaction():
                rows = conn.execute("SELECT key, data FROM blob_landing "
                                    "WHERE landed_at <= now() - make_interval(secs => %s) "
                                    "ORDER BY landed_at LIMIT %s FOR UPDATE SKIP LOCKED",
                                    (older_than_s, limit)).fetchall()
                rows = [(key, data) for key, data in rows if self._passed_over.get(key, 0.0) <= now]
                for key, data in rows:
                    parts = parse_object_key(key)
                    if parts is not None and content_digest.of_bytes_like(data, parts["digest"]) != parts["digest"]:
                        log.error("landed object %s: its bytes do not match its digest; left in the landing", key)
                        self._passed_over[key] = now + PASS_OVER_S
                        continue
                    try:
                        if parts is None:
                            self.store.put(key, bytes(data))
                        else:  # its digest checked just now: not hashed again
                            self.store.upload(key, self.store.full_key(key), bytearray(data), len(data),
                                              parts["digest"])
                    except StorageError as exc:
                        refused, refused_keys = exc, [*refused_keys, key]
                        continue
                    moved.append(key)
                if moved:
                    conn.execute("DELETE FROM blob_landing WHERE key = ANY(%s)", (moved,))
        except psycopg.Error as exc:
            raise StorageError(f"moving landed objects: PostgreSQL failed: {_one_line(exc)}") from exc
        if refused is not None:
            if not moved:  # the bucket refused them all: it, not an object, is wanting
                raise refused
            log.warning("landing mover: %s (left in the landing, tried again in %.0f s)", refused, PASS_OVER_S)
            self._passed_over.update(dict.fromkeys(refused_keys, now + PASS_OVER_S))
        self._passed_over = {k: t for k, t in self._passed_over.items() if t > now}
        return len(moved)

    # -- BlobStore ----------------------------------------------------------------------------------------------
    def writer(self) -> LandingWriter:
        return LandingWriter(self)

    def put_once(self, key: str, data: bytes) -> bool:
        return self.store.put_once(key, data)  # objects keyed by name, not content (reports): the bucket's rule

    def open(self, key: str) -> BinaryIO:
        data = self._landed(key)
        if data is not None:
            return cast(BinaryIO, io.BytesIO(data))
        return self.store.open(key)

    def get(self, key: str) -> bytes:
        data = self._landed(key)
        return data if data is not None else self.store.get(key)

    def size(self, key: str) -> int:
        rows = self._sql(f"cannot read {key}", "SELECT length(data) FROM blob_landing WHERE key = %s", (key,))
        return int(rows[0][0]) if rows else self.store.size(key)

    def delete(self, key: str) -> None:
        self._sql(f"cannot delete {key}", "DELETE FROM blob_landing WHERE key = %s", (key,))
        self.store.delete(key)

    def destroy(self, key: str) -> None:
        self._sql(f"cannot delete {key}", "DELETE FROM blob_landing WHERE key = %s", (key,))
        self.store.destroy(key)

    def set_aside(self, key: str) -> str | None:
        data = self._landed(key)
        if data is not None:  # into the bucket first, where objects are set aside
            self.store.put(key, data)
            self._sql(f"cannot set {key} aside", "DELETE FROM blob_landing WHERE key = %s", (key,))
        return self.store.set_aside(key)

    def keys(self, prefix: str = "") -> Iterator[str]:
        prefix = prefix.strip("/")
        pattern = (prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "/%") if prefix else "%"
        landed = {r[0] for r in self._sql("cannot list the landing",
                                          "SELECT key FROM blob_landing WHERE key LIKE %s", (pattern,))}
        yield from landed
        for key in self.store.keys(prefix):
            if key not in landed:
                yield key

    def set_aside_count(self) -> int:
        return self.store.set_aside_count()

    def usage(self) -> tuple[int | None, int | None]:
        return self.store.usage()

    def revive(self) -> bool:
        return self.store.revive()

    def prepare(self) -> None:
        self.store.prepare()

    def close(self) -> None:
        try:
            self.store.close()
        finally:
            self._pool.close()


def run_mover(landing: LandingStore, stop: threading.Event, delay_s: float) -> None:
    """Move landed objects into the bucket until ``stop`` is set: those landed ``delay_s`` ago or more, so that a
    burst from a scanner is answered first and moved just after it (objects in the landing are as durable, and
    served as well, as those in the bucket). A failing pass (the bucket or PostgreSQL unreachable) is logged once,
    when it starts failing, and tried again every :data:`FAILED_S`."""
    failing = False
    while not stop.is_set():
        try:
            moved = landing.move(delay_s)
        except Exception as exc:  # noqa: BLE001 - the mover keeps trying: the objects stay landed meanwhile
            if not failing:
                log.warning("landing mover: %s (objects stay in the landing; trying again every %.0f s)",
                            exc, FAILED_S)
            failing = True
            stop.wait(FAILED_S)
            continue
        if failing:
            log.info("landing mover: moving objects into the bucket again")
            failing = False
        if moved < MOVE_BATCH:
            stop.wait(IDLE_S)
