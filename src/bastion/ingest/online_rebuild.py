"""The index rebuilt while the server runs: ``bastion index rebuild`` against a running server (SQLite index).

1. **Build** (:class:`OnlineRebuild`, a thread of the server's primary process): a new index is built beside the
   live one from the stored objects (:func:`bastion.index.sqlite_files.build_beside`, replaying them as
   :func:`~bastion.ingest.rebuild.rebuild` does) while the live index goes on recording stores and answering
   queries. Objects stored meanwhile that the live index holds (acknowledged) are recorded into the new one too,
   in a few catch-up rounds, so that little is left for the switch.
2. **Switch** (:func:`switch_in`, in a one-shot process that the supervisor forks once it has stopped every
   server process, at the primary's request): what was stored since the last catch-up round is recorded into the
   new index as crash recovery does (:func:`~bastion.ingest.rebuild.recover`: every object from an hour before the
   newest stamp on that the index does not hold, its digest checked; it does not ask the live index, which may be
   the damaged one being replaced), then the new index is swapped in
   (:func:`~bastion.index.sqlite_files.swap_in`). If anything fails before the swap, the live index stays as it
   was, whole (it recorded every store), and the new one is dropped.
3. The supervisor starts the server's processes again, on the new index.

The state (:class:`RebuildState`) is kept in ``<data>/`` :data:`STATE_FILE`, written durably at each step, so it
survives the switch's restart. A build that a stop cut short is ``failed`` at the next start; a switch that a
crash cut short is finished at the next start (``bastion serve`` calls :func:`switch_in` before it forks).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bastion.blobs.base import BlobStore
from bastion.index.base import Index, log_floor
from bastion.index.sqlite_files import build_beside, built_beside, discard_beside, swap_in
from bastion.ingest.deletion import apply_state_log
from bastion.ingest.rebuild import (
    RebuildReport,
    rebuild,
    record_stored,
    stored_keys,
    unindexed_recent,
    write_durably,
)
from bastion.ingest.report_log import apply_report_log

log = logging.getLogger("bastion.rebuild")

#: The file in the data directory that holds the online rebuild's :class:`RebuildState` (JSON).
STATE_FILE = "index-rebuild-online.json"
#: What a catch-up round may leave for the next (or for the switch) without another round.
_FEW = 200
#: At most this many catch-up rounds before the switch.
_ROUNDS = 5
#: How many skipped objects the state names (the rest are counted).
_NAMED = 20

Phase = Literal["idle", "building", "switching", "done", "failed"]


@dataclass
class RebuildState:
    """Where the online rebuild is (``GET /api/index/rebuild``)."""

    state: Phase = "idle"
    #: Stored objects replayed so far, of ``total`` (None while they are listed).
    done: int = 0
    total: int | None = None
    #: When it was asked for and when it ended (switched in, or failed): ISO 8601, UTC.
    started: str | None = None
    finished: str | None = None
    error: str | None = None
    #: What the build found (:class:`~bastion.ingest.rebuild.RebuildReport`'s counts), and ``caught_up``: objects
    #: stored during the build, recorded into the new index before the switch.
    report: dict[str, int] = field(default_factory=dict)
    #: The first skipped objects: (key, why).
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: When the supervisor began stopping the server for the switch (Unix time), and how long it was before the
    #: server served again (seconds; set by the server that started on the new index).
    switch_began: float | None = None
    pause_s: float | None = None

    @property
    def running(self) -> bool:
        return self.state in ("building", "switching")

    @property
    def ended(self) -> bool:
        """Failed, or switched in and serving again (the pause known, where a switch made one)."""
        return self.state == "failed" or (self.state == "done" and (self.pause_s is not None
                                                                    or self.switch_began is None))

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "skipped": [list(s) for s in self.skipped]}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RebuildState:
        """The state :meth:`to_json` wrote (members it does not know are left out)."""
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in raw.items() if k in known})
        state.skipped = [(str(key), str(why)) for key, why in state.skipped]
        return state


def now_iso() -> str:
    """Now, in UTC, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def read_state(data: Path) -> RebuildState:
    """The state kept in ``data`` (``idle`` if there is none, or it cannot be read)."""
    try:
        return RebuildState.from_json(json.loads((data / STATE_FILE).read_text(encoding="utf-8")))
    except FileNotFoundError:
        return RebuildState()
    except (ValueError, TypeError, AttributeError) as exc:
        log.warning("the online rebuild's state %s cannot be read (%s): taken as idle", data / STATE_FILE, exc)
        return RebuildState()


def write_state(data: Path, state: RebuildState) -> None:
    """Keep ``state`` in ``data``, durably."""
    write_durably(data / STATE_FILE, json.dumps(state.to_json()))


class RebuildBusy(Exception):
    """An online rebuild runs already (the API answers 409)."""


class _Stopped(Exception):
    """The server stops before the new index is complete."""


def _counts(report: RebuildReport) -> dict[str, int]:
    return {"indexed": report.indexed, "superseded": report.superseded, "duplicates": report.duplicates,
            "skipped": len(report.skipped), "warned": len(report.warned), "set_aside": len(report.set_aside)}


class OnlineRebuild:
    """The online rebuild's build step, in the server's primary process (one per process; see the module docstring).

    ``live`` is the live index (SQLite; it serves throughout), ``ask_switch`` asks the supervisor to switch the
    new index in (it stops this process meanwhile). At construction a build or switch that did not finish (the
    server stopped or crashed) is marked ``failed`` and what it left beside the index is removed.
    """

    def __init__(self, blobs: BlobStore, live: Index, data: Path, ask_switch: Callable[[], None]) -> None:
        self.blobs = blobs
        self.live = live
        self.location = live.location
        self.data = data
        self.ask_switch = ask_switch
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = read_state(data)
        if self._state.running:
            self._fail(f"the server stopped while the index was {self._state.state}: nothing was switched; "
                       "ask for the rebuild again")

    def state(self) -> RebuildState:
        """Where the rebuild is now (a copy)."""
        with self._lock:
            return dataclasses.replace(self._state)

    def begin(self) -> RebuildState:
        """Start building a new index in a thread; its state. Raises :class:`RebuildBusy` if one runs."""
        with self._lock:
            if self._state.running:
                raise RebuildBusy(f"an online rebuild of the index is {self._state.state} already "
                                  f"(started {self._state.started})")
            self._state = RebuildState(state="building", started=now_iso())
            write_state(self.data, self._state)
            self._thread = threading.Thread(target=self._run, name="bastion-online-rebuild", daemon=True)
            self._thread.start()
            return dataclasses.replace(self._state)

    def serving(self) -> None:
        """The server serves again: if it started on an index just switched in, the pause is recorded."""
        with self._lock:
            state = self._state
            if state.state == "done" and state.switch_began is not None and state.pause_s is None:
                state.pause_s = round(max(0.0, time.time() - state.switch_began), 3)
                write_state(self.data, state)
                log.info("the rebuilt index is switched in: the server paused %.2f s", state.pause_s)

    def stop(self) -> None:
        """Stop a build under way (the server stops) and wait for its thread: the build is dropped."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join()

    def _advance(self, count: int) -> None:
        self._state.done += count

    def _run(self) -> None:
        started = time.monotonic()
        try:
            after = log_floor(self.location)  # the new log goes on after the live one's (moved up at the swap)
            keys = stored_keys(self.blobs)
            self._state.total = len(keys)
            log.info("online index rebuild: replaying %d stored object(s) into a new index beside the live one",
                     len(keys))

            def build(new: Index) -> tuple[RebuildReport, int]:
                report = rebuild(self.blobs, new, self._advance, after=after, keys=keys, stop=self._stop)
                if self._stop.is_set():
                    raise _Stopped
                return report, self._catch_up(new)

            report, caught_up = build_beside(self.location, build)
        except _Stopped:
            self._fail("the server stopped before the new index was complete: nothing was switched; ask for the "
                       "rebuild again")
            return
        except Exception as exc:
            log.exception("the online index rebuild failed: the live index stays")
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        with self._lock:
            self._state.state = "switching"
            self._state.report = {**_counts(report), "caught_up": caught_up}
            self._state.skipped = report.skipped[:_NAMED]
            write_state(self.data, self._state)
        log.info("online index rebuild: %d stored object(s) replayed in %.1f s, %d stored meanwhile caught up; "
                 "asking the supervisor to switch it in", len(keys), time.monotonic() - started, caught_up)
        self.ask_switch()

    def _catch_up(self, new: Index) -> int:
        """Record into ``new`` what was stored while it was built and the live index holds (acknowledged: an object
        the live index does not hold may be a store still under way, or one about to fail), in rounds until few are
        left: how many."""
        caught_up = 0
        for _ in range(_ROUNDS):
            if self._stop.is_set():
                raise _Stopped
            try:
                recent = unindexed_recent(self.blobs, new)
                live = self.live.held_blobs([key for _, key in recent])
                keys = [(stamp, key) for stamp, key in recent if key in live]
            except Exception as exc:  # the live index may be the damaged one: the switch catches up without it
                log.warning("online rebuild: the live index cannot say what it holds (%s): the switch catches up", exc)
                break
            if keys:
                caught_up += record_stored(self.blobs, new, keys, "online rebuild catch-up").indexed
            if len(keys) < _FEW:
                break
        return caught_up

    def _fail(self, error: str) -> None:
        discard_beside(self.location)
        with self._lock:
            self._state.state = "failed"
            self._state.error = error
            self._state.finished = now_iso()
            write_state(self.data, self._state)


def switch_in(blobs: BlobStore, location: str, data: Path, *, began: float | None = None) -> RebuildState:
    """The switch (see the module docstring), while no process has the index at ``location`` open: if the state
    in ``data`` says ``switching``, record what was stored since the build's last catch-up round into the new
    index and swap it in. ``began``: when the server began stopping for it (Unix time). The state after it."""
    state = read_state(data)
    if state.state != "switching":
        return state
    state.switch_began = began
    try:
        if built_beside(location):  # else a crash came after the swap: it is done
            def catch_up(new: Index) -> RebuildReport:
                caught = record_stored(blobs, new, unindexed_recent(blobs, new), "online rebuild switch", verify=True)
                apply_state_log(blobs, new)  # studies deleted or undeleted while it was built
                apply_report_log(blobs, new)  # and the radiology reports
                return caught

            report = swap_in(location, catch_up)
            if report is not None:
                state.report["caught_up"] = state.report.get("caught_up", 0) + report.indexed
                state.report["set_aside"] = state.report.get("set_aside", 0) + len(report.set_aside)
        state.state = "done"
    except Exception as exc:
        log.exception("switching the rebuilt index in failed: the live index stays")
        discard_beside(location)
        state.state, state.error = "failed", f"the switch failed: {type(exc).__name__}: {exc}"
    state.finished = now_iso()
    write_state(data, state)
    return state


def describe(state: RebuildState) -> str:
    """The summary line of a rebuild that is ``done`` (what ``bastion index rebuild`` prints)."""
    r = state.report
    return summary(state.total or 0, r.get("indexed", 0), r.get("superseded", 0), r.get("skipped", 0),
                   r.get("warned", 0))


def summary(total: int, indexed: int, superseded: int, skipped: int, warned: int) -> str:
    """``bastion index rebuild``'s summary line, offline and online alike."""
    return (f"index rebuilt from {total} stored object(s): {indexed} indexed ({superseded} superseding an older "
            f"version), {skipped} skipped, {warned} with warnings")


__all__ = ["STATE_FILE", "OnlineRebuild", "RebuildBusy", "RebuildState", "describe", "read_state", "summary",
           "switch_in", "write_state"]
