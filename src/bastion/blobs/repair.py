"""The repair and the scrub of the blob stores' copies (:class:`bastion.blobs.copies.Copies`).

**The repair** (:class:`Repairer`, a thread of the server's primary process) re-creates every missing or corrupt
copy from a good one until each object is back in every store. Its work comes from

- the findings log (:class:`bastion.blobs.findings.FindingLog`), read again only when it has grown (checked every
  ``poll_s``, 2 s): each copy found wanting and not repaired since is made again (:meth:`Copies.heal`);
- a full reconciliation, at start, every ``reconcile_s`` (``repair_interval``, 10 min) and as soon as a store
  that was unreachable is back: every store's keys are listed, and every key some store holds and another lacks is
  a finding and is repaired. Objects the index holds that no store holds any more are *lost*: a finding each
  (``/health`` says degraded), an error in the log once, and ``bastion verify`` lists them.

A store that cannot be reached (its ``usage()`` raises, its listing or a repair write fails) is first revived
(:meth:`BlobStore.revive` makes a lost store directory again, empty); if that does not help it is left out, its
findings waiting, and tried again every :data:`STORE_RETRY_S`: one log line when it goes, one when it is back, and
a reconciliation at once then. ``repair_interval = 0`` turns the repair thread off.

**The scrub** (a second thread) re-hashes every copy in every store, store after store in key order, at
``scrub_rate`` bytes/s (:class:`TokenBucket`: the bytes read are paid for with sleeps, so it takes a bounded
share of one core and of the disks). Without a rate it goes as fast as re-hashing everything within
``scrub_days`` needs (at least :data:`MIN_AUTO_RATE`), and a new cycle starts ``scrub_days`` after the last one
started; with a rate, cycles follow each other. Its progress is kept in ``<data>/scrub.json`` (:class:`ScrubState`)
so that a restart goes on with the cycle. A corrupt or unreadable copy is a finding and is repaired at once.

:func:`bastion.blobs.healing.check_copies` is one pass of both, now and unthrottled, for ``bastion verify``.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from bastion.blobs.copies import Copies
from bastion.blobs.findings import CORRUPT, MISSING, UNREADABLE
from bastion.blobs.healing import STORE_RETRY_S, Healer, PassReport, StoreTally, StoreWatch, key_hash, young
from bastion.errors import BastionError, NotFound
from bastion.model import digest as content_digest
from bastion.model.records import parse_object_key

log = logging.getLogger("bastion.repair")

MB = 1_000_000
#: How often the findings log is looked at (its size only, unless it grew).
POLL_S = 2.0
#: The scrub's pace without ``scrub_rate``, at the least (bytes/s): a small archive is re-hashed sooner than
#: ``scrub_days`` asks, at a cost nobody notices.
MIN_AUTO_RATE = 1 * MB
#: Keys the scrub takes from a store's listing at a time (it lists the store again for the next ones).
SCRUB_BATCH = 2000
#: With ``scrub_rate`` set, the pause between one scrub cycle's end and the next one's start.
CYCLE_PAUSE_S = 5.0
#: Bytes read at a time when re-hashing a copy.
CHUNK = 1 << 20


class TokenBucket:
    """A rate limit of ``rate`` units (bytes) per second with bursts of up to ``burst`` units.

    :meth:`delay` takes units and says how long to wait before using them; units taken beyond what the bucket
    holds are a debt that the wait pays back, so that over any long stretch no more than ``rate`` units per second
    plus one ``burst`` go through, however the takes are sized. ``clock`` (seconds, monotonic) is injectable, so
    the arithmetic can be tested without waiting.
    """

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(rate / 10, CHUNK)  # a tenth of a second, one read at least
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()

    def delay(self, units: float) -> float:
        """Take ``units``; return the seconds to wait before using them (0.0 when the bucket held enough)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= units
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def take(self, units: float, sleep: Callable[[float], Any] = time.sleep) -> float:
        """Take ``units`` and wait (``sleep``) as long as :meth:`delay` says; returns the seconds waited."""
        wait = self.delay(units)
        if wait > 0:
            sleep(wait)
        return wait


# -- the scrub's progress ----------------------------------------------------------------------------------------


@dataclass
class ScrubState:
    """The scrub's progress, kept in ``<data>/scrub.json`` so that a restart goes on with the cycle."""

    #: When the cycle under way started (seconds since the epoch; 0: none started).
    cycle_started: float = 0.0
    #: The store the cycle is in (its location) and the last key done there ("" before the first).
    store: str = ""
    after: str = ""
    checked: int = 0
    bytes: int = 0
    corrupt: int = 0
    unreadable: int = 0
    repaired: int = 0
    #: Cycles completed, and when the last one ended.
    cycles: int = 0
    last_cycle_finished: float = 0.0
    last_cycle_started: float = 0.0

    @classmethod
    def load(cls, path: str | None) -> ScrubState:
        if path is None:
            return cls()
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except (OSError, ValueError, TypeError):
            return cls()

    def save(self, path: str | None) -> None:
        """Write the state (atomically: a crash leaves the old one or the new one)."""
        if path is None:
            return
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(asdict(self), fh)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot keep the scrub's progress in %s: %s", path, exc)


# -- the background repair ----------------------------------------------------------------------------------------


class Repairer:
    """The background repair and scrub of ``copies`` (see the module docstring): :meth:`start`, :meth:`stop`.

    ``indexed_keys`` lists the blob keys the index holds and ``is_indexed`` tells whether it holds one (an object
    that no store holds is *lost* only if the index knows it); ``stored_bytes`` is the size of the archive (for the
    scrub's pace without ``scrub_rate``). ``scrub_rate`` is in bytes/s (None: within ``scrub_days``; 0: no scrub).
    """

    def __init__(self, copies: Copies, *, scrub_state: str | None = None, scrub_rate: float | None = None,
                 scrub_days: float = 7.0, reconcile_s: float = 600.0, poll_s: float = POLL_S,
                 indexed_keys: Callable[[], Iterable[str]] | None = None,
                 is_indexed: Callable[[str], bool] | None = None,
                 stored_bytes: Callable[[], int] | None = None) -> None:
        self.copies = copies
        self.scrub_state = scrub_state
        self.scrub_rate = scrub_rate
        self.scrub_days = scrub_days
        self.reconcile_s = reconcile_s
        self.poll_s = poll_s
        self.indexed_keys = indexed_keys
        self.stored_bytes = stored_bytes
        self.watch = StoreWatch(copies)
        self.healer = Healer(copies, self.watch, is_indexed)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._log_size = -1
        self._wanting_before: set[int] = set()  # key hashes the last reconciliation found wanting and left (young)
        #: The last reconciliation's report (None before the first).
        self.last_reconciliation: PassReport | None = None
        self.state = ScrubState.load(scrub_state)
        self.bucket: TokenBucket | None = None

    # -- threads -----------------------------------------------------------------------------------------------

    def start(self) -> Repairer:
        """Start the repair thread (unless ``reconcile_s`` is 0) and the scrub thread (unless ``scrub_rate`` is 0),
        daemons both."""
        if len(self.copies.stores) < 2:
            return self  # one store: nothing to repair from
        if self.reconcile_s:
            self._threads.append(threading.Thread(target=self._guard, args=(self._repair_loop,), name="bastion-repair",
                                                  daemon=True))
        if self.scrub_rate != 0:
            self._threads.append(threading.Thread(target=self._guard, args=(self._scrub_loop,), name="bastion-scrub",
                                                  daemon=True))
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the threads (a copy being written is finished first) and keep the scrub's progress."""
        self._stop.set()
        self.watch.came_back.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads = []

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _guard(self, loop: Callable[[], None]) -> None:
        """Run ``loop``; an unexpected error is logged and the loop started again a little later."""
        while not self._stop.is_set():
            try:
                loop()
                return
            except Exception:  # noqa: BLE001 - the repair must outlive a bug or a store's odd error
                log.exception("the blob repair failed; starting it again in %.0f s", STORE_RETRY_S)
                self._stop.wait(STORE_RETRY_S)

    def _repair_loop(self) -> None:
        next_reconcile = 0.0  # at start
        while not self._stop.is_set():
            self.watch.check()
            if self.watch.came_back.is_set():
                self.watch.came_back.clear()
                next_reconcile = 0.0
                self._log_size = -1
            if time.monotonic() >= next_reconcile:
                self.reconcile()
                next_reconcile = time.monotonic() + self.reconcile_s
                self._log_size = -1  # take up what waited while it ran
            self.repair_findings()
            self.watch.came_back.wait(self.poll_s)

    # -- the findings ------------------------------------------------------------------------------------------

    def repair_findings(self, force: bool = False) -> int:
        """Repair the copies the findings log says are wanting (only when it grew since the last look, unless
        ``force``), leaving out the stores that are down. Returns how many objects were looked at."""
        size = self.copies.findings.size()
        if size == self._log_size and not force:
            return 0
        self._log_size = size
        by_key: dict[str, list[tuple[int, str]]] = {}
        index_of = {store.location: i for i, store in enumerate(self.copies.stores)}
        for finding in self.copies.findings.outstanding():
            i = index_of.get(finding.store)
            if i is None:
                continue  # a store no longer configured
            by_key.setdefault(finding.key, []).append((i, finding.problem))
        down = self.watch.down()
        done = 0
        for key, wanting in by_key.items():
            if self._stop.is_set():
                break
            if all(i in down for i, _ in wanting):
                continue
            outcome, repaired = self.healer.heal(key)
            if outcome == "gone":
                self.healer.close_findings(key, wanting, "the object is no longer stored (deleted)")
            elif outcome in ("whole", "partly"):
                # Copies healed just now are recorded by Copies.heal; a finding whose copy was good when looked at
                # again (a read that met it while it was being repaired, a store back with its copies) is closed.
                down = self.watch.down()
                healthy = [(i, p) for i, p in wanting if i not in down and self.copies.stores[i].location not in
                           repaired and self.copies.stores[i].problem_with(key) is None]
                self.healer.close_findings(key, healthy, "good when looked at again")
            done += 1
        return done  # its own entries grew the log: the next look reads it again, and finds others' meanwhile

    # -- the reconciliation ------------------------------------------------------------------------------------

    def reconcile(self) -> PassReport:
        """List every reachable store; repair every copy some store lacks; report objects the index knows and no
        store holds (a finding each, once). Keys stamped within :data:`bastion.blobs.healing.YOUNG_S` are left for the next one."""
        report = PassReport([StoreTally(s.location) for s in self.copies.stores])
        members: dict[int, int] = {}
        listed = self._list_into(members, report)
        full = sum(1 << i for i in listed)
        wanting = {h for h, mask in members.items() if mask & full != full}
        report.objects = len(members)
        if wanting and len(listed) > 1 and not self._stop.is_set():
            self._repair_wanting(wanting, listed, report)
        if self.indexed_keys is not None and len(listed) == len(self.copies.stores) and not self._stop.is_set():
            self._find_lost(members, report)
        self.last_reconciliation = report
        if report.wanting():
            log.warning("reconciliation of %d object(s): %d cop(ies) missing, %d repaired, %d object(s) lost",
                        report.objects, sum(s.missing for s in report.stores),
                        sum(s.repaired for s in report.stores), len(report.lost))
        return report

    def _list_into(self, members: dict[int, int], report: PassReport) -> list[int]:
        """Add every reachable store's keys to ``members`` (key hash -> bit mask of the stores holding it); return
        the indexes of the stores listed whole."""
        down = self.watch.check()
        listed: list[int] = []
        for i, store in enumerate(self.copies.stores):
            if i in down:
                report.stores[i].unreachable = self.watch.reason(i) or "unreachable"
                continue
            bit = 1 << i
            try:
                for key in store.keys():
                    h = key_hash(key)
                    members[h] = members.get(h, 0) | bit
                    if self._stop.is_set():
                        return listed
            except (BastionError, OSError) as exc:
                self.watch.failed(i, f"its listing failed: {exc}")
                report.stores[i].unreachable = str(exc)
                for h in members:
                    members[h] &= ~bit
                continue
            listed.append(i)
        return listed

    def _repair_wanting(self, wanting: set[int], listed: list[int], report: PassReport) -> None:
        holders: dict[str, int] = {}
        for i in listed:
            with contextlib.suppress(BastionError, OSError):
                for key in self.copies.stores[i].keys():
                    if key_hash(key) in wanting:
                        holders[key] = holders.get(key, 0) | (1 << i)
        now = time.time()
        left: set[int] = set()
        for key in sorted(holders):
            if self._stop.is_set():
                return
            if young(key, now) and key_hash(key) not in self._wanting_before:
                left.add(key_hash(key))
                continue
            down = self.watch.down()
            present = [i for i in listed if i not in down and self.copies.stores[i].exists(key)]
            absent = [i for i in listed if i not in down and i not in present]
            if not present or not absent:
                continue  # deleted since the listing, or written meanwhile
            if key not in self.healer.lost:  # a lost one's findings were recorded when it was found lost
                for i in absent:
                    report.stores[i].missing += 1
                    self.copies.found(i, key, MISSING, "not in the store's listing (reconciliation)")
            self.healer.heal(key, report)
        self._wanting_before = left

    def _find_lost(self, members: dict[int, int], report: PassReport) -> None:
        assert self.indexed_keys is not None
        outstanding = {(f.key, f.store) for f in self.copies.findings.outstanding()}
        for key in self.indexed_keys():
            if self._stop.is_set():
                return
            if key_hash(key) in members or self.copies.exists(key):
                continue
            report.lost.append(key)
            for i, store in enumerate(self.copies.stores):
                if (key, store.location) not in outstanding and key not in self.healer.lost:
                    report.stores[i].missing += 1
                    self.copies.found(i, key, MISSING, "the index holds it, no blob store does: lost")
            if key not in self.healer.lost:
                self.healer.lost.add(key)
                log.error("object %s is in the index but in no blob store: it is lost unless the original is sent "
                          "again", key)

    # -- the scrub ---------------------------------------------------------------------------------------------

    def _rate(self) -> float:
        """The scrub's pace now, in bytes/s (see the module docstring)."""
        if self.scrub_rate:
            return self.scrub_rate
        period = self.scrub_days * 86400
        left = max(3600.0, self.state.cycle_started + period - time.time())
        total = (self.stored_bytes() if self.stored_bytes is not None else 0) * len(self.copies.stores)
        return max(float(MIN_AUTO_RATE), (total - self.state.bytes) / left)

    def _scrub_loop(self) -> None:
        self.bucket = TokenBucket(self._rate())
        while not self._stop.is_set():
            state = self.state
            if not state.cycle_started:
                wait = self._until_next_cycle()
                if wait > 0:
                    self._stop.wait(min(wait, 60.0))
                    continue
                state.cycle_started, state.store, state.after = time.time(), self.copies.stores[0].location, ""
                state.checked = state.bytes = state.corrupt = state.unreadable = state.repaired = 0
                state.save(self.scrub_state)
            self.scrub_batch()

    def _until_next_cycle(self) -> float:
        """Seconds until the next scrub cycle may start."""
        last = self.state.last_cycle_started
        if not last:
            return 0.0
        if self.scrub_rate:
            return self.state.last_cycle_finished + CYCLE_PAUSE_S - time.time()
        return last + self.scrub_days * 86400 - time.time()

    def scrub_batch(self) -> int:
        """Re-hash the next :data:`SCRUB_BATCH` copies of the cycle (the store it is in; the next store once that
        one is done; the cycle's end after the last). Returns how many were re-hashed."""
        state = self.state
        locations = [s.location for s in self.copies.stores]
        if state.store not in locations:
            state.store, state.after = locations[0], ""
        i = locations.index(state.store)
        if i in self.watch.down():
            if not self.reconcile_s:
                self.watch.check()  # no repair thread to look at the stores
            self._stop.wait(self.poll_s)
            return 0
        store = self.copies.stores[i]
        try:
            batch = heapq.nsmallest(SCRUB_BATCH, (k for k in store.keys() if k > state.after))
        except (BastionError, OSError) as exc:
            self.watch.failed(i, f"its listing failed: {exc}")
            return 0
        if not batch:
            self._next_store(i)
            return 0
        if self.bucket is not None:
            self.bucket.rate = self._rate()
        saved = time.monotonic()
        done = 0
        for key in batch:
            if self._stop.is_set() or i in self.watch.down():
                break
            result = self.scrub_copy(i, key)
            if result is None:
                break  # stopped halfway: the copy is done again next time
            state.after = key
            state.checked += 1
            done += 1
            if time.monotonic() - saved > 5.0:
                state.save(self.scrub_state)
                saved = time.monotonic()
        state.save(self.scrub_state)
        return done

    def _next_store(self, i: int) -> None:
        state = self.state
        if i + 1 < len(self.copies.stores):
            state.store, state.after = self.copies.stores[i + 1].location, ""
        else:
            state.cycles += 1
            state.last_cycle_started, state.last_cycle_finished = state.cycle_started, time.time()
            took = state.last_cycle_finished - state.cycle_started
            log.log(logging.INFO if took > 60 or state.corrupt or state.unreadable else logging.DEBUG,
                    "scrub cycle done: %d cop(ies), %.1f MB re-hashed in %.0f s; %d corrupt, %d unreadable, "
                    "%d repaired", state.checked, state.bytes / MB, took, state.corrupt, state.unreadable,
                    state.repaired)
            state.cycle_started, state.store, state.after = 0.0, "", ""
        state.save(self.scrub_state)

    def scrub_copy(self, index: int, key: str) -> str | None:
        """Re-hash store ``index``'s copy of ``key`` at the scrub's pace; a corrupt or unreadable one is a finding
        and is repaired. Returns the problem found ("" for none; a copy gone since the listing is none: the
        reconciliation sees to it), or None if the scrub was stopped halfway."""
        store = self.copies.stores[index]
        parts = parse_object_key(key)
        if parts is None:
            return ""
        like = parts["digest"]
        problem, detail = "", ""
        try:
            with store.open(key) as fh:
                h = content_digest.hasher() if like.startswith(content_digest.BLAKE3_PREFIX) else hashlib.sha256()
                while chunk := fh.read(CHUNK):
                    h.update(chunk)
                    self.state.bytes += len(chunk)
                    wait = self.bucket.delay(len(chunk)) if self.bucket is not None else 0.0
                    if wait > 0 and self._stop.wait(wait):
                        return None
                found = (content_digest.text(h.digest()) if like.startswith(content_digest.BLAKE3_PREFIX)
                         else h.hexdigest())
            if found != like:
                problem, detail = CORRUPT, f"scrub: its bytes hash to {found}"
        except NotFound:
            return ""
        except (BastionError, OSError) as exc:
            problem, detail = UNREADABLE, f"scrub: {exc}"
        if not problem:
            return ""
        # A file store writes an object of 128 KB - 8 MB in place: a copy being written (a new object's, or one this
        # repair is making) shows a part of itself. Looked at again, with no repair of ours under way, a copy whose
        # writing is over is what it is; a new object's is left for the next cycle.
        with self.healer.lock:
            problem = store.problem_with(key) or ""
        if problem not in (CORRUPT, UNREADABLE) or young(key, time.time()):
            return ""
        if problem == CORRUPT:
            self.state.corrupt += 1
        else:
            self.state.unreadable += 1
        if key not in self.healer.lost:  # a lost object's copies are findings once
            self.copies.found(index, key, problem, detail)
        outcome, repaired = self.healer.heal(key)
        if outcome == "whole":
            self.state.repaired += 1
            if store.location not in repaired:  # good when the repair looked (written meanwhile, by another)
                self.healer.close_findings(key, [(index, problem)], "good when looked at again")
        return problem


