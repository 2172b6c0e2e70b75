"""Commits whose work ``_cwrite``'s threads do (``bastion.blobs._cwrite``: files written and flushed, the journal's
``fdatasync``), waited for on the calling thread or awaited on an event loop.

A job is a ``_cwrite.Pending`` (``wait()``, ``done()``), or a :class:`CreatedHere`. :class:`JobsCommit` is the
:class:`~bastion.blobs.base.Commit` of one object's jobs: it settles the commit once, whoever asks first. On an
event loop the jobs are submitted with ``notify=True`` and :class:`LoopWatch` learns that they finished from
``_cwrite``'s notify pipe: no Python thread is woken for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

from bastion.blobs.base import Commit


def on_event_loop() -> bool:
    """Whether the calling thread runs an event loop (its commits are then awaited, not waited for)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class JobsCommit(Commit):
    """The commit of an object whose jobs ``_cwrite``'s threads run: once they are done, ``settle`` runs once
    (whichever caller comes first) and every caller gets its outcome (None, or the error it raises)."""

    def __init__(self, jobs: list[Any], settle: Callable[[], None], cwrite: ModuleType | None = None) -> None:
        self.jobs = jobs
        self._cwrite = cwrite  # the module whose notify pipe tells when the jobs are done (None: not watched)
        self._settle: Callable[[], None] | None = settle
        self._outcome: BaseException | None = None
        self._lock = threading.Lock()

    def done(self) -> bool:
        """Whether every job has finished."""
        return all(job.done() for job in self.jobs)

    def settled(self) -> BaseException | None:
        """Settle (the jobs must be done) and return the outcome: None, or the error the commit met."""
        with self._lock:
            if self._settle is not None:
                try:
                    self._settle()
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                    self._outcome = exc
                self._settle = None
            return self._outcome

    def __call__(self) -> None:
        for job in self.jobs:  # their errors are settle's to raise
            with contextlib.suppress(OSError):
                job.wait()
        outcome = self.settled()
        if outcome is not None:
            raise outcome

    async def wait_async(self) -> None:
        if not self.done():
            if self._cwrite is None:
                await asyncio.to_thread(self)
                return
            await LoopWatch.of_running_loop(self._cwrite).until_done(self)
        outcome = self.settled()
        if outcome is not None:
            raise outcome


class LoopWatch:
    """Wakes, on one event loop, the commits awaiting their ``_cwrite`` jobs: it watches the module's notify pipe
    and, whenever a job submitted with ``notify=True`` finishes, completes the futures of the commits whose jobs
    are all done. One per loop and process (a forked child makes its own; the pipe is per process)."""

    _watches: dict[tuple[int, int], LoopWatch] = {}
    _lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop, cwrite: ModuleType) -> None:
        self.loop = loop
        self.fd: int = cwrite.notify_fd()
        self._waiting: list[tuple[JobsCommit, asyncio.Future[None]]] = []
        loop.add_reader(self.fd, self._signalled)

    @classmethod
    def of_running_loop(cls, cwrite: ModuleType) -> LoopWatch:
        """This process's watch of the running loop (made on first use)."""
        loop = asyncio.get_running_loop()
        key = (os.getpid(), id(loop))
        watch = cls._watches.get(key)
        if watch is None or watch.loop is not loop:
            with cls._lock:
                for stale in [k for k, w in cls._watches.items() if w.loop.is_closed() or k[0] != os.getpid()]:
                    del cls._watches[stale]
                watch = cls._watches[key] = cls(loop, cwrite)
        return watch

    async def until_done(self, commit: JobsCommit) -> None:
        """Return once every job of ``commit`` is done (the notify pipe said so)."""
        future = self.loop.create_future()
        self._waiting.append((commit, future))
        if commit.done():  # finished before it was registered: its byte may have been read already
            self._signalled()
        await future

    def _signalled(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 4096)
        still = []
        for commit, future in self._waiting:
            if future.done():
                continue
            if commit.done():
                future.set_result(None)
            else:
                still.append((commit, future))
        self._waiting = still


class CreatedHere:
    """A file created on the calling thread, with a ``_cwrite.Pending``'s ``wait`` and ``done``: ``wait`` raises
    the OSError its creation met."""

    def __init__(self, cwrite: ModuleType, final: str, buf: bytearray) -> None:
        self.error: OSError | None = None
        try:
            cwrite.create_file(final, buf, False, False, False)
        except OSError as exc:
            self.error = exc

    def wait(self) -> None:
        if self.error is not None:
            raise self.error

    def done(self) -> bool:
        return True
