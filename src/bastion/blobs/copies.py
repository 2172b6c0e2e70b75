"""Several blob stores holding a copy of every object: writes to all, success once ``required`` are durable, reads
that fail over to a good copy.

Configured as ``blobs = ["/disk1/bastion", "/disk2/bastion"]`` (or ``file://`` / ``s3://`` locations) with
``copies_required = K`` (default: every store). Every object is written to every store that is up; a store that
fails a write (down, full, its directory gone) is skipped for :data:`RETRY_AFTER_S` while at least K others take
the object, and the object is then under-replicated: the finding is logged (:class:`FindingLog`) and the repair
(:mod:`bastion.blobs.repair`) makes the missing copy once the store is back. Fewer than K durable copies and the
store fails as a whole: nothing of the object is left.

A reader (:meth:`Copies.open_verified`) gets the first copy whose bytes match the digest its key names
(:meth:`BlobStore.open_verified`); a copy that is missing, unreadable or corrupt is a finding for the log, the
admin page and ``/health``, never an error for the reader while another copy is good.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, BinaryIO

from bastion.blobs.base import BlobStore, BlobWriter, Commit, open_blob_store, rewrite
from bastion.blobs.findings import CORRUPT, MISSING, NOT_WRITTEN, UNREADABLE, Finding, FindingLog
from bastion.blobs.late import RETRY_AFTER_S, LateStore
from bastion.errors import BastionError, CorruptObject, NotFound, StorageError, StorageFull

log = logging.getLogger("bastion.blobs")

class _StoreState:
    """Whether a store takes writes: up, or left out until ``retry_at`` after a failure."""

    def __init__(self) -> None:
        self.retry_at = 0.0
        self.reason = ""

    def failed(self, reason: str) -> None:
        self.retry_at = time.monotonic() + RETRY_AFTER_S
        self.reason = reason

    def up(self) -> bool:
        return time.monotonic() >= self.retry_at

    def succeeded(self) -> None:
        self.retry_at = 0.0
        self.reason = ""


class Copies(BlobStore):
    """A blob store made of ``stores``, each holding a copy of every object; ``required`` of them (default: all)
    must hold it durably before a write succeeds."""

    def __init__(self, stores: Sequence[BlobStore], required: int | None = None,
                 findings: FindingLog | None = None) -> None:
        if not stores:
            raise ValueError("no blob store")
        required = len(stores) if required is None else required
        if not 1 <= required <= len(stores):
            raise ValueError(f"copies_required = {required}, but {len(stores)} blob store(s) are configured")
        self.stores = list(stores)
        self.required = required
        self.findings = findings if findings is not None else FindingLog(None)
        self.location = ", ".join(s.location for s in self.stores)
        self._states = [_StoreState() for _ in self.stores]
        for store, state in zip(self.stores, self._states, strict=True):
            if isinstance(store, LateStore):
                state.failed(str(store))
        self._lock = threading.Lock()
        #: Called with every finding once it is logged (the archive appends it to the index's change log).
        self.on_finding: Callable[[Finding], None] | None = None

    # -- findings and store health ----------------------------------------------------------------------------

    def found(self, index: int, key: str, problem: str, detail: str = "") -> None:
        """Record that store ``index``'s copy of ``key`` is wanting (log line and :class:`FindingLog`)."""
        store = self.stores[index].location
        log.warning("copy of %s in %s is %s%s", key, store, problem, f": {detail}" if detail else "")
        self._tell(Finding(key, store, problem, detail))

    def repaired(self, index: int, key: str, detail: str = "") -> None:
        """Record that store ``index``'s copy of ``key`` is good again."""
        store = self.stores[index].location
        log.info("copy of %s in %s repaired%s", key, store, f" ({detail})" if detail else "")
        self._tell(Finding(key, store, "", detail, repaired=True))

    def _tell(self, finding: Finding) -> None:
        self.findings.record(finding)
        if self.on_finding is not None:
            try:
                self.on_finding(finding)
            except Exception as exc:  # noqa: BLE001 - the finding is logged; its change-log entry is not essential
                log.error("finding of %s not added to the change log: %s", finding.key, exc)

    def _write_failed(self, index: int, key: str | None, exc: BaseException) -> None:
        reason = exc.message if isinstance(exc, BastionError) else repr(exc)
        with self._lock:
            state = self._states[index]
            first = state.up()
            state.failed(reason)
        if first:
            log.error("blob store %s failed a write, left out of writes for %.0f s: %s", self.stores[index].location,
                      RETRY_AFTER_S, reason)
        if key is not None:
            self.found(index, key, NOT_WRITTEN, reason)

    def _write_succeeded(self, index: int) -> None:
        state = self._states[index]
        if state.reason:
            with self._lock:
                if state.reason:
                    log.warning("blob store %s takes writes again", self.stores[index].location)
                state.succeeded()

    def _revived(self, index: int) -> bool:
        """For a store that failed a write and whose wait is over: whether it may be tried again (:meth:`revive`)."""
        state = self._states[index]
        if not state.reason:
            return True
        try:
            if self.stores[index].revive():
                return True
        except Exception as exc:  # noqa: BLE001 - it stays out
            log.error("blob store %s: %s", self.stores[index].location, exc)
        with self._lock:
            state.failed(state.reason)
        return False

    # -- writes -----------------------------------------------------------------------------------------------

    def writer(self) -> BlobWriter:
        if len(self.stores) == 1:
            return self.stores[0].writer()  # one store: its own writer, nothing between
        targets = [i for i, state in enumerate(self._states) if state.up() and self._revived(i)]
        if len(targets) < self.required:
            targets = list(range(len(self.stores)))  # too few up: try them all rather than fail unasked
        writers: list[tuple[int, BlobWriter]] = []
        for i in targets:
            try:
                writers.append((i, self.stores[i].writer()))
            except Exception as exc:  # noqa: BLE001 - the store is left out; too few left fails the write
                self._write_failed(i, None, exc)
        return CopiesWriter(self, writers, [i for i in range(len(self.stores)) if i not in targets])

    def put_once(self, key: str, data: bytes) -> bool:
        """Into each store that takes writes, in the configured order: the first that answers decides (False: it
        holds other bytes, and nothing more is written); ``required`` of them must hold ``data`` after. Nodes
        that share the stores list them in one order, so the same store decides a race between them (while it
        is up for both)."""
        if len(self.stores) == 1:
            return self.stores[0].put_once(key, data)
        targets = [i for i, state in enumerate(self._states) if state.up() and self._revived(i)]
        if len(targets) < self.required:
            targets = list(range(len(self.stores)))
        held, decided = 0, False
        for i in range(len(self.stores)):
            if i not in targets:
                self.found(i, key, NOT_WRITTEN, "the store was left out of the write")
                continue
            try:
                same = self.stores[i].put_once(key, data)
            except (BastionError, OSError) as exc:
                self._write_failed(i, key, exc)
                continue
            self._write_succeeded(i)
            if not decided and not same:
                return False
            decided = True
            if same:
                held += 1
            else:
                self.found(i, key, CORRUPT, "it holds other bytes than the first store's")
        if held < self.required:
            raise StorageError(f"cannot commit {key}: only {held} of the {self.required} blob stores required "
                               "hold it")
        return True

    # -- reads ------------------------------------------------------------------------------------------------

    def _reading_order(self) -> list[int]:
        """Stores that take writes first (a failing one is likelier to fail a read too)."""
        return sorted(range(len(self.stores)), key=lambda i: not self._states[i].up())

    def open_verified(self, key: str) -> BinaryIO:
        """The first copy of ``key`` whose bytes match its digest; each wanting copy met on the way is a finding.
        Raises NotFound when no store holds it, CorruptObject when none that does holds it intact."""
        problems: list[str] = []
        for i in self._reading_order():
            store = self.stores[i]
            try:
                return store.open_verified(key)
            except NotFound:
                self.found(i, key, MISSING)
                problems.append(MISSING)
            except CorruptObject as exc:
                self.found(i, key, CORRUPT, exc.message)
                problems.append(CORRUPT)
            except (BastionError, OSError) as exc:
                self.found(i, key, UNREADABLE, exc.message if isinstance(exc, BastionError) else str(exc))
                problems.append(UNREADABLE)
        if all(p == MISSING for p in problems):
            raise NotFound(f"object {key} is missing from every blob store")
        if CORRUPT in problems:
            raise CorruptObject(f"object {key}: no copy matches its digest ({', '.join(problems)})")
        raise StorageError(f"object {key}: no copy can be read ({', '.join(problems)})")

    def _first(self, key: str, what: Callable[[BlobStore], Any]) -> Any:
        error: BaseException | None = None
        for i in self._reading_order():
            try:
                return what(self.stores[i])
            except NotFound as exc:
                error = error or exc
            except (BastionError, OSError) as exc:
                error = exc
        assert error is not None
        raise error

    def open(self, key: str) -> BinaryIO:
        """The first copy that can be opened (unchecked: for ingest's own reads and the index rebuild)."""
        result: BinaryIO = self._first(key, lambda s: s.open(key))
        return result

    def size(self, key: str) -> int:
        result: int = self._first(key, lambda s: s.size(key))
        return result

    def exists(self, key: str) -> bool:
        return any(self._holds(store, key) for store in self.stores)

    @staticmethod
    def _holds(store: BlobStore, key: str) -> bool:
        """Whether ``store`` holds ``key``; False for a store that cannot tell now (logged)."""
        try:
            return store.exists(key)
        except (BastionError, OSError) as exc:
            log.error("cannot look for %s in %s: %s", key, store.location, exc)
            return False

    def delete(self, key: str) -> None:
        for store in self.stores:
            try:
                store.delete(key)
            except (BastionError, OSError) as exc:
                log.error("cannot delete %s from %s: %s", key, store.location, exc)

    def destroy(self, key: str) -> None:
        """:meth:`BlobStore.destroy` in every store; StorageError naming those that failed (the others are done)."""
        failed = []
        for store in self.stores:
            try:
                store.destroy(key)
            except (BastionError, OSError) as exc:
                failed.append(f"{store.location}: {exc}")
        if failed:
            raise StorageError(f"cannot destroy {key} in {'; '.join(failed)}")

    def set_aside(self, key: str) -> str | None:
        where = None
        for store in self.stores:
            if self._holds(store, key):
                where = store.set_aside(key) or where
        return where

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every key any store holds, each once."""
        if len(self.stores) == 1:
            yield from self.stores[0].keys(prefix)
            return
        seen: set[str] = set()
        for store in self.stores:
            try:
                for key in store.keys(prefix):
                    if key not in seen:
                        seen.add(key)
                        yield key
            except (BastionError, OSError) as exc:
                log.error("cannot list %s: %s", store.location, exc)

    def set_aside_count(self) -> int:
        return sum(s.set_aside_count() for s in self.stores)

    def usage(self) -> tuple[int | None, int | None]:
        """Bytes used in all stores together, and the free bytes of the fullest (what the next copy may take)."""
        used: int | None = 0
        free: int | None = None
        for store in self.stores:
            try:
                u, f = store.usage()
            except Exception:  # noqa: BLE001
                u = f = None
            used = None if used is None or u is None else used + u
            if f is not None:
                free = f if free is None else min(free, f)
        return used, free

    def prepare(self) -> None:
        for store in self.stores:
            store.prepare()

    def close(self) -> None:
        for store in self.stores:
            store.close()

    # -- repair -----------------------------------------------------------------------------------------------

    def problem_with(self, key: str) -> str | None:
        """What is wrong with the object's copies: the first problem met, None if every copy is good."""
        return next((p for store in self.stores if (p := store.problem_with(key)) is not None), None)

    def heal(self, key: str, source: Callable[[], BinaryIO] | None = None, skip: Collection[int] = ()) -> list[str]:
        """Make every store's copy of ``key`` good: each missing, unreadable or corrupt one is written again from
        ``source`` (bytes that hash to the key's digest, e.g. a re-sent original) or, without one, from a good
        copy. Returns the locations of the stores repaired; a copy that cannot be made is a finding. The stores
        whose indexes are in ``skip`` (unreachable now: the repair) are neither checked nor written.
        Raises CorruptObject when there is no good copy to make them from."""
        wanting = [(i, problem) for i, store in enumerate(self.stores)
                   if i not in skip and (problem := store.problem_with(key)) is not None]
        if not wanting:
            return []
        good = [i for i in range(len(self.stores)) if i not in {w for w, _ in wanting} and i not in skip]
        if source is None:
            if not good:
                raise CorruptObject(f"object {key}: no good copy to repair the others from")
            store = self.stores[good[0]]
            source = lambda: store.open(key)  # noqa: E731
        repaired = []
        for i, problem in wanting:
            try:
                rewrite(self.stores[i], key, source)
            except (BastionError, OSError) as exc:
                self.found(i, key, NOT_WRITTEN, f"repair of a {problem} copy failed: {exc}")
                continue
            self.repaired(i, key, f"was {problem}")
            repaired.append(self.stores[i].location)
        return repaired


def _wrapped(store: BlobStore, wrap: Callable[[BlobStore], BlobStore]) -> BlobStore:
    try:
        return wrap(store)
    except BaseException:
        store.close()
        raise


def open_copies(locations: Sequence[str], required: int | None = None, *, node_id: str = "",
                findings: FindingLog | None = None, wrap: Callable[[BlobStore], BlobStore] | None = None) -> Copies:
    """:class:`Copies` over the blob stores at ``locations`` (:func:`bastion.blobs.base.open_blob_store` each).

    With several stores, one that cannot be opened (its disk failed, its bucket is unreachable) does not stop the
    archive: it is logged and stands as a :class:`LateStore`, tried again every :data:`RETRY_AFTER_S`, while the
    others serve. Raises as ``open_blob_store`` does when no store can be opened, or the only one cannot (the
    others are closed again). ``wrap``, if given, is applied to each store opened (the landing of one S3 store,
    :mod:`bastion.blobs.landing`)."""
    stores: list[BlobStore] = []
    try:
        for location in locations:
            try:
                opened = open_blob_store(location, node_id=node_id)
                stores.append(opened if wrap is None else _wrapped(opened, wrap))
            except (BastionError, OSError) as exc:
                if len(locations) == 1:
                    raise
                log.error("blob store %s cannot be opened, the others serve meanwhile (tried again every %.0f s): "
                          "%s", location, RETRY_AFTER_S, exc)
                stores.append(LateStore(location, functools.partial(open_blob_store, location, node_id=node_id), exc))
        if all(isinstance(store, LateStore) for store in stores):
            raise StorageError(f"no blob store can be opened ({'; '.join(map(str, stores))})")
        return Copies(stores, required, findings)
    except BaseException:
        for store in stores:
            store.close()
        raise


class CopiesWriter(BlobWriter):
    """Writes one object to several stores at once (:class:`Copies`)."""

    def __init__(self, copies: Copies, writers: list[tuple[int, BlobWriter]], skipped: list[int]) -> None:
        super().__init__()
        self._copies = copies
        self._writers = writers
        self._skipped = skipped  # stores left out of this write (failing): each gets a finding at commit
        self._too_few(None)

    def _too_few(self, error: BaseException | None) -> None:
        taking = len(self._writers)
        if taking < self._copies.required:
            self.abort()
            self._writers = []
            if isinstance(error, BastionError):
                raise error
            raise StorageError(f"only {taking} of the {self._copies.required} blob stores required can take the "
                               "object")

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        failed: BaseException | None = None
        for pair in list(self._writers):
            try:
                pair[1].write(data)
            except (BastionError, OSError) as exc:
                self._writers.remove(pair)
                self._copies._write_failed(pair[0], None, exc)
                self._skipped.append(pair[0])
                failed = exc
        if failed is not None:
            self._too_few(failed)

    def _write(self, data: bytes | memoryview) -> None:  # pragma: no cover - write() is overridden
        raise NotImplementedError

    @property
    def digest(self) -> str:
        return self._writers[0][1].digest

    def reader(self) -> BinaryIO:
        return self._writers[0][1].reader()

    def commit(self, key: str) -> None:
        self.start_commit(key)()

    def start_commit(self, key: str) -> Commit:
        started: list[tuple[int, Commit]] = []
        errors: list[tuple[int, BaseException]] = []
        for i, w in self._writers:
            try:
                started.append((i, w.start_commit(key)))
            except (BastionError, OSError) as exc:
                errors.append((i, exc))
        return CopiesCommit(self._copies, key, started, errors, self._skipped)

    def abort(self) -> None:
        for _, w in self._writers:  # each is safe to abort twice or after its commit
            w.abort()


class CopiesCommit(Commit):
    """The commits of one object's copies: succeeds once ``required`` are durable; below that the copies made are
    removed and the write fails."""

    def __init__(self, copies: Copies, key: str, started: list[tuple[int, Commit]],
                 errors: list[tuple[int, BaseException]], skipped: list[int]) -> None:
        self._copies = copies
        self._key = key
        self._started = started
        self._errors = errors
        self._skipped = skipped
        self._outcome: BaseException | None | bool = False  # False: not settled yet
        self._lock = threading.Lock()

    def _settle(self, results: list[BaseException | None]) -> None:
        with self._lock:
            if self._outcome is not False:
                return
            errors = list(self._errors)
            made = []
            for (i, _), result in zip(self._started, results, strict=True):
                if result is None:
                    made.append(i)
                    self._copies._write_succeeded(i)
                else:
                    errors.append((i, result))
            if len(made) < self._copies.required:
                for i, exc in errors:
                    self._copies._write_failed(i, None, exc)
                for i in made:
                    self._copies.stores[i].delete(self._key)
                full = errors and all(isinstance(e, StorageFull) for _, e in errors)
                detail = "; ".join(f"{self._copies.stores[i].location}: {e}" for i, e in errors) or "no store up"
                message = (f"only {len(made)} of the {self._copies.required} copies required could be made "
                           f"({detail})")
                self._outcome = StorageFull(message) if full else StorageError(message)
                return
            for i, exc in errors:
                self._copies._write_failed(i, self._key, exc)
            for i in self._skipped:
                self._copies.found(i, self._key, NOT_WRITTEN, self._copies._states[i].reason or "store left out")
            self._outcome = None

    def _raise(self) -> None:
        if isinstance(self._outcome, BaseException):
            raise self._outcome

    def __call__(self) -> None:
        if self._outcome is False:
            results: list[BaseException | None] = []
            for _, c in self._started:
                try:
                    c()
                    results.append(None)
                except Exception as exc:  # noqa: BLE001 - counted: too few copies fails the write
                    results.append(exc)
            self._settle(results)
        self._raise()

    def done(self) -> bool:
        return self._outcome is not False or all(c.done() for _, c in self._started)

    async def wait_async(self) -> None:
        if self._outcome is False:
            gathered = await asyncio.gather(*(c.wait_async() for _, c in self._started), return_exceptions=True)
            self._settle([r if isinstance(r, BaseException) else None for r in gathered])
        self._raise()

    def then(self, callback: Callable[[], None]) -> None:
        remaining = [len(self._started)]
        lock = threading.Lock()
        if not self._started:
            callback()
            return

        def one_done() -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                callback()

        for _, c in self._started:
            c.then(one_done)
