"""Waiting for the jobs that ``_cwrite``'s threads run (``bastion.blobs._cwrite``: files written and flushed,
the journal's ``fdatasync``).

A job is a ``_cwrite.Pending`` (``wait()``, ``done()``), or a :class:`CreatedHere`. :class:`Once` waits for a
commit's jobs and settles it once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

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
