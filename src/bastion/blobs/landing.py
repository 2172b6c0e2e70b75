"""Landing: small objects made durable in PostgreSQL first, moved to the S3 bucket afterwards (issue 21).

A C-STORE over one association waits for each object to be durable before it is answered, and a ``PutObject``
is the slowest step of that on S3: 1.2-2.3 ms to a SeaweedFS on the same machine, tens of milliseconds to a
cloud's. Where the index is on PostgreSQL (itself replicated synchronously, ``docs/deployment.md``), an object
of up to ``max_bytes`` (``[landing] max_kb``) can be made as durable, and as reachable from every node, by one
``INSERT`` of its bytes into the index's database (the table ``blob_landing``, migration ``0009_blob_landing``).
The landing mover (:func:`run_mover`, a thread of every node's background process) then puts each landed object
into the bucket under the same key and deletes its row; nodes share the work (``FOR UPDATE SKIP LOCKED``), and a
node that dies mid-move leaves its rows to the others (its transaction is rolled back).

:class:`LandingStore` is the bucket's :class:`~bastion.blobs.s3.S3BlobStore` with the landing in front, on every
node whose index is on PostgreSQL and whose one blob store is S3, whatever ``max_bytes`` (0: nothing new lands,
but what another node or an earlier run landed is still served, deleted and moved). Its guarantees:

* A commit that returned is durable: the object is in the bucket, or its row is committed in PostgreSQL.
* Every read finds a committed object wherever it is (:meth:`LandingStore._either`): the landing first where
  objects land, else the bucket first. The mover puts an object into the bucket before it deletes its row, so an
  object whose row is gone is in the bucket.
* Deleting removes the row first, then the bucket's object: the row's delete waits for a mover holding it, which
  has put the object by then, so a deleted object is not put back (unless a put that the mover gave up on, its
  process killed or its request timed out, still completes in the bucket afterwards: an unindexed object then).
* Keys are written once, as in the bucket: a key landed twice holds the same bytes (keys carry the digest).
* Objects larger than ``max_bytes`` (or not held in memory) go straight to the bucket as before, and so do all
  objects while the landing holds ``total_bytes`` or more (the bucket unreachable for long), or while PostgreSQL
  refuses them. ``bastion index rebuild`` reads the landing too (:meth:`LandingStore.keys`), and leaves it as it
  is.
* Landing objects has threads of its own: a bucket that hangs holds up no landing.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, TypeVar, cast

import psycopg
from psycopg_pool import ConnectionPool

from bastion.blobs.base import BlobStore, Commit, CommitInThread
from bastion.blobs.s3 import S3BlobStore, S3Writer
from bastion.errors import CorruptObject, NotFound, StorageError
from bastion.model import digest as content_digest
from bastion.model.records import parse_object_key

log = logging.getLogger("bastion.blobs")

#: Objects one pass of the mover takes (and holds locked, in one transaction, while it puts them).
MOVE_BATCH = 64
#: Objects one mover puts into the bucket at a time.
MOVE_THREADS = 4
#: Threads per process that land objects (as :data:`bastion.blobs.s3.COMMIT_THREADS` upload them).
COMMIT_THREADS = 8
#: How often the landing's size is looked up again (for ``total_bytes``), and its report (``/health``).
SIZE_EVERY_S = 1.0
REPORT_EVERY_S = 5.0
#: How long the mover waits after a pass that moved nothing, or failed.
IDLE_S = 1.0
FAILED_S = 5.0
#: How long the mover passes over an object that it could not move (the bucket refused it, or its bytes are wrong).
PASS_OVER_S = 60.0

Pool = ConnectionPool[psycopg.Connection[Any]]
T = TypeVar("T")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class LandingWriter(S3Writer):
    """:class:`~bastion.blobs.s3.S3Writer` whose commit lands an object of up to the store's ``max_bytes``, held
    in memory, in PostgreSQL (on the landing's own commit threads) instead of putting it into the bucket."""

    def __init__(self, store: LandingStore) -> None:
        super().__init__(store.store)
        self._landing = store

    def _landing_commit(self, key: str) -> Callable[[], None] | None:
        """The commit that lands this object under ``key``; None if it goes to the bucket."""
        buf, landing = self._buf, self._landing
        if buf is None or not landing.max_bytes or len(buf) > landing.max_bytes:
            return None
        upload = self._upload(key)  # checks the key, and takes the object from the writer
        return lambda: landing.land_or_upload(key, buf, upload)

    def commit(self, key: str) -> None:
        run = self._landing_commit(key)
        if run is None:
            super().commit(key)
        else:
            run()

    def start_commit(self, key: str) -> Commit:
        run = self._landing_commit(key)
        if run is None:
            return super().start_commit(key)
        return CommitInThread(self._landing.committer().submit(run))


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
        self._land_failing = False
        self._lock = threading.Lock()
        self._committer: ThreadPoolExecutor | None = None
        self._report: tuple[float, dict[str, Any]] | None = None
        #: Keys the mover passes over until a time (:meth:`move`), and its threads.
        self._passed_over: dict[str, float] = {}
        self._mover_threads: ThreadPoolExecutor | None = None

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
                        room, why = int(size) < self.total_bytes, f"the landing in PostgreSQL holds {size} bytes"
                    except StorageError as exc:  # unknown: the bucket takes the objects meanwhile
                        room, why = False, str(exc)
                    if room != self._room:  # logged when it changes, not every second
                        log.warning("%s: objects %s", why,
                                    "land in it again" if room else "go straight to the bucket meanwhile")
                    self._room = room
        return self._room

    def committer(self) -> ThreadPoolExecutor:
        """The threads that land objects (not the bucket's: a bucket that hangs holds up no landing)."""
        with self._lock:
            if self._committer is None:
                self._committer = ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="bastion-landing")
            return self._committer

    def land_or_upload(self, key: str, data: bytearray, upload: Callable[[], None]) -> None:
        """:meth:`land` ``data`` as ``key``, or ``upload`` it into the bucket while the landing is full, or if
        PostgreSQL fails (the same key and bytes either way; that failure logged when it starts)."""
        if not self.has_room():
            upload()
            return
        try:
            self.land(key, data)
        except CorruptObject:
            raise  # the landing holds other bytes under this key: not the bucket's to settle
        except StorageError as exc:
            if not self._land_failing:
                log.warning("%s: objects go straight to the bucket until it answers again", exc)
            self._land_failing = True
            upload()
            return
        if self._land_failing:
            log.info("the landing in PostgreSQL answers again: small objects land in it")
        self._land_failing = False

    def land(self, key: str, data: bytearray) -> None:
        """Make ``data`` durable as ``key`` in the landing (one statement). A key landed already must hold the
        same bytes (CorruptObject otherwise, and the row is left as it was); StorageError if PostgreSQL fails."""
        what = f"cannot commit {key}"
        if self._sql(what, "INSERT INTO blob_landing (key, data) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING "
                           "RETURNING 1", (key, data)):
            return
        same = self._sql(what, "SELECT data = %s FROM blob_landing WHERE key = %s", (data, key))
        if same and not same[0][0]:
            raise CorruptObject(f"{what}: the landing holds other bytes under that key")
        if not same:  # moved meanwhile: the bucket has it, or refuses other bytes
            self.store.put(key, bytes(data))

    def _landed(self, key: str, column: str = "data") -> Any:
        """``column`` of ``key``'s row in the landing; None if it has none. StorageError if PostgreSQL fails."""
        rows = self._sql(f"cannot read {key}", f"SELECT {column} FROM blob_landing WHERE key = %s", (key,))
        return rows[0][0] if rows else None

    def _either(self, key: str, bucket: Callable[[], T], landed: Callable[[Any], T], column: str = "data") -> T:
        """``key`` read where it is: the landing first where objects land (else the bucket first; the landing
        then holds only what another node or an earlier run landed), then the other. The mover puts an object into
        the bucket before it deletes its row, so a read in that order never misses a committed object; one found
        in neither place is looked for in the first again (it moved meanwhile). If PostgreSQL fails, the bucket's
        answer stands, unless it has no such object (the failure is raised then)."""
        if self.max_bytes:
            try:
                found = self._landed(key, column)
            except StorageError as exc:
                try:
                    return bucket()
                except NotFound:
                    raise exc from None
            return bucket() if found is None else landed(found)
        try:
            return bucket()
        except NotFound:
            found = self._landed(key, column)
            return bucket() if found is None else landed(found)

    def backlog(self) -> tuple[int, int]:
        """``(objects, bytes)`` in the landing now, waiting for the mover."""
        (count, size), = self._sql("landing backlog", "SELECT count(*), coalesce(sum(length(data)), 0) "
                                   "FROM blob_landing")
        return int(count), int(size)

    def landing_report(self) -> dict[str, Any]:
        """What the landing holds, for ``/api/statistics`` and ``/health`` (looked up at most every
        :data:`REPORT_EVERY_S`): ``objects``, ``bytes``, ``oldest_s`` (seconds since the oldest landed; None when
        empty), and the settings ``max_bytes`` and ``total_bytes``."""
        now = time.monotonic()
        if self._report is None or now - self._report[0] >= REPORT_EVERY_S:
            (count, size, oldest), = self._sql("landing backlog", "SELECT count(*), coalesce(sum(length(data)), 0), "
                                               "extract(epoch FROM now() - min(landed_at)) FROM blob_landing")
            self._report = now, {"objects": int(count), "bytes": int(size),
                                 "oldest_s": None if oldest is None else float(oldest),
                                 "max_bytes": self.max_bytes, "total_bytes": self.total_bytes}
        return dict(self._report[1])

    def move(self, older_than_s: float = 0.0, limit: int = MOVE_BATCH) -> int:
        """One pass of the mover: put up to ``limit`` objects landed ``older_than_s`` ago or more into the bucket
        (oldest first, :data:`MOVE_THREADS` at a time; rows another node holds skipped), then delete their rows,
        in one transaction. Returns how many were moved. A row whose bytes do not match the digest its key names
        is left, logged and passed over for :data:`PASS_OVER_S`; so is one the bucket refuses while it takes
        others (the rest are not held up behind it). StorageError if the bucket refused every object of the pass,
        or PostgreSQL failed."""
        now = time.monotonic()
        self._passed_over = {k: t for k, t in self._passed_over.items() if t > now}
        try:
            with self._pool.connection() as conn, conn.transaction():
                rows = conn.execute("SELECT key, data FROM blob_landing "
                                    "WHERE landed_at <= now() - make_interval(secs => %s) AND NOT key = ANY(%s) "
                                    "ORDER BY landed_at LIMIT %s FOR UPDATE SKIP LOCKED",
                                    (older_than_s, list(self._passed_over), limit)).fetchall()
                outcomes = list(self._movers().map(lambda row: self._put(*row), rows)) if rows else []
                moved = [key for (key, _), failure in zip(rows, outcomes, strict=True) if failure is None]
                if moved:
                    conn.execute("DELETE FROM blob_landing WHERE key = ANY(%s)", (moved,))
        except psycopg.Error as exc:
            raise StorageError(f"moving landed objects: PostgreSQL failed: {_one_line(exc)}") from exc
        refused = [(key, failure) for (key, _), failure in zip(rows, outcomes, strict=True)
                   if isinstance(failure, StorageError) and not isinstance(failure, CorruptObject)]
        for key, failure in zip((key for key, _ in rows), outcomes, strict=True):
            if isinstance(failure, CorruptObject) or (failure is not None and moved):
                self._passed_over[key] = now + PASS_OVER_S
        if refused and not moved:  # the bucket refused them all: it, not an object, is wanting
            raise refused[0][1]
        if refused:
            log.warning("landing mover: %s (and %d more): left in the landing, tried again in %.0f s",
                        refused[0][1], len(refused) - 1, PASS_OVER_S)
        return len(moved)

    def _movers(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._mover_threads is None:
                self._mover_threads = ThreadPoolExecutor(MOVE_THREADS, thread_name_prefix="bastion-landing-move")
            return self._mover_threads

    def _put(self, key: str, data: bytes) -> Exception | None:
        """Put landed ``key`` into the bucket; None if done, else why not (logged if its bytes are wrong)."""
        parts = parse_object_key(key)
        try:
            if parts is None:
                self.store.put(key, bytes(data))
                return None
            if content_digest.of_bytes_like(data, parts["digest"]) != parts["digest"]:
                log.error("landed object %s: its bytes do not match its digest; left in the landing", key)
                return CorruptObject(f"object {key}: its bytes do not match its digest")
            # its digest checked just now: not hashed again
            self.store.upload(key, self.store.full_key(key), bytearray(data), len(data), parts["digest"])
        except StorageError as exc:
            return exc
        return None

    # -- BlobStore ----------------------------------------------------------------------------------------------
    def writer(self) -> LandingWriter:
        return LandingWriter(self)

    def put_once(self, key: str, data: bytes) -> bool:
        return self.store.put_once(key, data)  # objects keyed by name, not content (reports): the bucket's rule

    def open(self, key: str) -> BinaryIO:
        return self._either(key, lambda: self.store.open(key), lambda data: cast(BinaryIO, io.BytesIO(data)))

    def get(self, key: str) -> bytes:
        return self._either(key, lambda: self.store.get(key), bytes)

    def size(self, key: str) -> int:
        return self._either(key, lambda: self.store.size(key), int, "length(data)")

    def delete(self, key: str) -> None:
        self._sql(f"cannot delete {key}", "DELETE FROM blob_landing WHERE key = %s", (key,))
        self.store.delete(key)

    def destroy(self, key: str) -> None:
        self._sql(f"cannot delete {key}", "DELETE FROM blob_landing WHERE key = %s", (key,))
        self.store.destroy(key)

    def set_aside(self, key: str) -> str | None:
        data = self._landed(key)
        if data is not None:  # into the bucket first, where objects are set aside
            self.store.put(key, bytes(data))
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
            for threads in (self._committer, self._mover_threads):
                if threads is not None:
                    threads.shutdown(wait=True)
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
