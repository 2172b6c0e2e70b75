"""Waiting for the jobs that ``_cwrite``'s threads run (``bastion.blobs._cwrite``: files written and flushed,
the journal's ``fdatasync``), on the calling thread or on an event loop.

A job is a ``_cwrite.Pending`` (``wait()``, ``done()``), or a :class:`CreatedHere`. :class:`Once` waits for a
commit's jobs and settles it once; :class:`Completions` lets an event loop that serves other associations
meanwhile learn, through the module's ``eventfd``, that a commit's jobs are done, without a Python thread (and so
without GIL hand-offs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

from bastion.blobs.base import CommitInThread

log = logging.getLogger("bastion.blobs")


class Once:
    """The waiter of a commit whose jobs ``_cwrite``'s threads run: it waits for them, runs ``settle`` once
    (whichever caller comes first) and gives every caller its outcome."""

    def __init__(self, jobs: list[Any], settle: Callable[[], None]) -> None:
        self.jobs = jobs
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


class CommitOnLoop(CommitInThread):
    """The waiter :class:`Completions` hands out: ``future`` is an asyncio future of the loop it serves;
    calling it waits for the jobs on the calling thread instead."""

    def __init__(self, future: asyncio.Future[None], once: Once) -> None:
        self.future = future  # type: ignore[assignment]
        self.once = once

    def settle_now(self) -> None:
        """On the loop, with every job done: settle and complete the future."""
        outcome = self.once.settled()
        if self.future.done():
            return
        if outcome is None:
            self.future.set_result(None)
        else:
            self.future.set_exception(outcome)

    def __call__(self) -> None:
        self.once()


class Completions:
    """Completes, on an event loop, the commits whose jobs ``_cwrite``'s threads run: it watches the module's
    ``eventfd`` and, when a thread signals, settles each commit whose jobs are all done.

    One per process, bound to the first loop that asks (a DICOM worker's); another loop's commits take the blob
    store's Python threads instead, as two loops reading one ``eventfd`` could each miss the other's signal.
    """

    _current: Completions | None = None
    _lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop, cwrite: ModuleType) -> None:
        self.loop = loop
        self.pid = os.getpid()
        self.fd = cwrite.notify_fd()
        self._waiting: list[CommitOnLoop] = []
        loop.add_reader(self.fd, self._signalled)

    @classmethod
    def for_running_loop(cls, cwrite: ModuleType | None) -> Completions | None:
        """This process's instance if it serves the running loop (made for it if none serves a live loop);
        None without ``cwrite`` (the extension) or a running loop."""
        if cwrite is None:
            return None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        current = cls._current
        if current is not None and current.loop is loop and current.pid == os.getpid():
            return current
        with cls._lock:
            current = cls._current
            if current is None or current.pid != os.getpid() or current.loop.is_closed():
                current = cls._current = cls(loop, cwrite)
        return current if current.loop is loop else None

    def watch(self, jobs: list[Any], settle: Callable[[], None]) -> CommitOnLoop:
        """A commit whose ``future`` completes once ``jobs`` (submitted to notify) are done and ``settle`` ran."""
        commit = CommitOnLoop(self.loop.create_future(), Once(jobs, settle))
        self._waiting.append(commit)
        return commit

    def _signalled(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)
        still = []
        for commit in self._waiting:
            if commit.once.done():
                commit.settle_now()
            else:
                still.append(commit)
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
