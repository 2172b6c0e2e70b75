"""Making one object's copies good again, and one pass over every copy now (``bastion verify``): the parts the
background repair and scrub (:mod:`bastion.blobs.repair`) and ``bastion verify --repair`` share.

:class:`StoreWatch` knows which stores can be reached (a store that cannot is revived, or left out and tried again
every :data:`STORE_RETRY_S`); :class:`Healer` repairs one object's copies at a time (:meth:`Copies.heal`) and
tells what came of it; :func:`check_copies` re-hashes every copy in every store, now.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from bastion.blobs.copies import Copies
from bastion.blobs.findings import CORRUPT, MISSING
from bastion.errors import BastionError, CorruptObject
from bastion.model.records import parse_object_key

log = logging.getLogger("bastion.repair")

#: A store that could not be reached is tried again after this many seconds.
STORE_RETRY_S = 30.0
#: A key stamped less than this long ago may still be being written (its copies are not all there yet).
YOUNG_S = 30.0


def key_hash(key: str) -> int:
    """A 64-bit number for ``key``: the reconciliation keeps these, not the keys, for a store's listing."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def young(key: str, now: float) -> bool:
    """Whether ``key`` was stamped within :data:`YOUNG_S` of ``now`` (its copies may still be being written)."""
    parts = parse_object_key(key)
    if parts is None:
        return False
    try:
        stamped = int(parts["stamp"]) / 1e9
    except ValueError:
        return False
    return abs(now - stamped) < YOUNG_S


# -- the state of the stores -------------------------------------------------------------------------------------


class StoreWatch:
    """Which of the stores can be reached now, as the repair sees it: a store whose ``usage()`` raises or that
    failed a listing or a repair write is *down*, left out, and tried again (revived) every :data:`STORE_RETRY_S`.
    Logs one line when a store goes down and one when it is back."""

    def __init__(self, copies: Copies, clock: Callable[[], float] = time.monotonic) -> None:
        self.copies = copies
        self._clock = clock
        self._down: dict[int, tuple[float, str]] = {}  # index -> (retry at, reason)
        self._lock = threading.Lock()
        #: Set when a store that was down is back (the repair then reconciles at once).
        self.came_back = threading.Event()

    def failed(self, index: int, reason: str) -> None:
        """Take store ``index`` out until :data:`STORE_RETRY_S` from now."""
        with self._lock:
            first = index not in self._down
            self._down[index] = (self._clock() + STORE_RETRY_S, reason)
        if first:
            log.error("blob store %s cannot be reached (%s): its copies are repaired once it is back",
                      self.copies.stores[index].location, reason)

    def down(self) -> set[int]:
        """The stores left out now."""
        with self._lock:
            return set(self._down)

    def reason(self, index: int) -> str:
        with self._lock:
            return self._down.get(index, (0.0, ""))[1]

    def check(self) -> set[int]:
        """Look at every store (``usage()``; a store that is down is revived first once its wait is over) and return
        the indexes of those that are down."""
        for i, store in enumerate(self.copies.stores):
            with self._lock:
                entry = self._down.get(i)
            if entry is not None and self._clock() < entry[0]:
                continue
            revived = entry is not None
            try:
                if revived and not store.revive():
                    raise BastionError("its directory cannot be made again")
                try:
                    store.usage()
                except Exception:  # noqa: BLE001 - a lost directory is made again at once (revive), then looked at
                    if revived or not store.revive():
                        raise
                    revived = True
                    store.usage()
            except Exception as exc:  # noqa: BLE001 - any failure leaves the store out
                self.failed(i, exc.message if isinstance(exc, BastionError) else str(exc) or repr(exc))
                continue
            if revived:
                with self._lock:
                    self._down.pop(i, None)
                log.warning("blob store %s can be reached again: repairing its copies", store.location)
                self.came_back.set()
        return self.down()


# -- reports -----------------------------------------------------------------------------------------------------


@dataclass
class StoreTally:
    """What one pass found and did in one store."""

    location: str
    checked: int = 0
    missing: int = 0
    corrupt: int = 0
    unreadable: int = 0
    repaired: int = 0
    #: Why the store could not be reached ("" if it could).
    unreachable: str = ""


@dataclass
class PassReport:
    """One pass over every copy (:func:`check_copies`) or one reconciliation (:meth:`Repairer.reconcile`)."""

    stores: list[StoreTally]
    #: Objects seen (each once, whatever its copies).
    objects: int = 0
    #: Objects with no good copy left in any store (missing from all, or corrupt in all that hold them).
    lost: list[str] = field(default_factory=list)
    #: (key, store location) of copies found wanting and not repaired.
    not_repaired: list[tuple[str, str]] = field(default_factory=list)

    @property
    def whole(self) -> bool:
        """Every object has a good copy in every store (after the repairs, when they were made)."""
        return not self.lost and not self.not_repaired and not any(s.unreachable for s in self.stores)

    def wanting(self) -> int:
        """Copies found missing, corrupt or unreadable."""
        return sum(s.missing + s.corrupt + s.unreadable for s in self.stores)


# -- healing -----------------------------------------------------------------------------------------------------


class Healer:
    """Repairs one object's copies at a time (:meth:`Copies.heal`), serialised, leaving out the stores that are
    down, and tells what came of it."""

    def __init__(self, copies: Copies, watch: StoreWatch, is_indexed: Callable[[str], bool] | None = None) -> None:
        self.copies = copies
        self.watch = watch
        self.is_indexed = is_indexed
        self.lock = threading.Lock()
        #: Objects found with no good copy left (logged once each; their copies are not findings again).
        self.lost: set[str] = set()

    def heal(self, key: str, tally: PassReport | None = None) -> tuple[str, list[str]]:
        """Make every reachable store's copy of ``key`` good. Returns the outcome, ``"whole"`` (every reachable copy
        good now), ``"partly"`` (a copy could not be written: its store is taken out), ``"lost"`` (no good copy
        anywhere) or ``"gone"`` (no store holds it and the index does not know it: deleted, nothing to repair), and
        the locations of the stores repaired."""
        skip = self.watch.down()
        with self.lock:
            try:
                repaired = self.copies.heal(key, skip=skip)
            except CorruptObject:
                return self._no_good_copy(key, skip, tally), []
            except (BastionError, OSError) as exc:  # a reading store failed while looking at its copy
                log.error("cannot repair %s: %s", key, exc)
                return "partly", []
            outcome = "whole"
            self.lost.discard(key)
            for i, store in enumerate(self.copies.stores):
                if tally is not None and store.location in repaired:
                    tally.stores[i].repaired += 1
                if i in skip or store.location in repaired:
                    continue
                if not store.exists(key):  # a rewrite failed (Copies.heal recorded it), and took the bad copy away
                    self.watch.failed(i, f"a repair write failed (copy of {key})")
                    outcome = "partly"
                    if tally is not None:
                        tally.not_repaired.append((key, store.location))
        return outcome, repaired

    def _no_good_copy(self, key: str, skip: set[int], tally: PassReport | None) -> str:
        held = [i for i, store in enumerate(self.copies.stores) if i not in skip and store.exists(key)]
        if not held and not skip and self.is_indexed is not None and not self.is_indexed(key):
            return "gone"
        if skip and not held:
            return "partly"  # it may be in a store that cannot be reached now
        if key not in self.lost:
            self.lost.add(key)
            log.error("object %s has no good copy left in any blob store (%s): it is lost unless the original is "
                      "sent again", key, "corrupt where it is held" if held else "missing from every store")
        if tally is not None:
            tally.lost.append(key)
        return "lost"

    def close_findings(self, key: str, findings: Iterable[tuple[int, str]], why: str) -> None:
        """Record (:meth:`Copies.repaired`) that the copies ``findings`` ((store index, problem)) of ``key`` want
        nothing any more (``why``)."""
        for i, problem in findings:
            self.copies.repaired(i, key, f"{problem}: {why}")


# -- one pass now: bastion verify ---------------------------------------------------------------------------------


def check_copies(copies: Copies, *, repair: bool, indexed_keys: Iterable[str] = (),
                 is_indexed: Callable[[str], bool] | None = None,
                 progress: Callable[[int], None] | None = None,
                 total: Callable[[int], None] | None = None) -> PassReport:
    """Re-hash every copy of every object in every store, now (``bastion verify``): each missing, corrupt or
    unreadable copy is a finding (:meth:`Copies.found`) and, with ``repair``, is made again from a good copy.
    Objects in ``indexed_keys`` that no store holds are lost. ``total`` is told how many copies there are to
    check once the stores are listed, ``progress`` is told of each one checked."""
    watch = StoreWatch(copies)
    healer = Healer(copies, watch, is_indexed)
    report = PassReport([StoreTally(s.location) for s in copies.stores])
    down = watch.check()
    holders: dict[str, int] = {}
    listed: list[int] = []
    for i, store in enumerate(copies.stores):
        if i in down:
            report.stores[i].unreachable = watch.reason(i) or "unreachable"
            continue
        try:
            keys = list(store.keys())
        except (BastionError, OSError) as exc:
            report.stores[i].unreachable = str(exc)
            watch.failed(i, str(exc))
            continue
        listed.append(i)
        for key in keys:
            holders[key] = holders.get(key, 0) | (1 << i)
    if total is not None:
        total(sum(bin(mask).count("1") for mask in holders.values()))
    for key in sorted(holders):
        mask = holders[key]
        wanting: list[tuple[int, str]] = []
        for i in listed:
            if not mask & (1 << i):
                problem: str | None = MISSING
            else:
                problem = copies.stores[i].problem_with(key)
                report.stores[i].checked += 1
                if progress is not None:
                    progress(1)
            if problem is None:
                continue
            tally = report.stores[i]
            if problem == MISSING:
                tally.missing += 1
            elif problem == CORRUPT:
                tally.corrupt += 1
            else:
                tally.unreadable += 1
            wanting.append((i, problem))
            copies.found(i, key, problem, "bastion verify")
        if not wanting:
            continue
        if len(wanting) == len(copies.stores):  # no good copy in any store
            report.lost.append(key)
        elif not repair:
            report.not_repaired.extend((key, copies.stores[i].location) for i, _ in wanting)
        else:
            healer.heal(key, report)
    report.objects = len(holders)
    if len(listed) == len(copies.stores):
        for key in indexed_keys:
            if key not in holders and not copies.exists(key):
                report.lost.append(key)
                for i in listed:
                    report.stores[i].missing += 1
                    copies.found(i, key, MISSING, "bastion verify: the index holds it, no blob store does")
    return report
