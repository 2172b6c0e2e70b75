"""Composition root: builds the index, blob store, ingest, find and retrieve services once."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bastion.blobs import BlobStore, open_blob_store
from bastion.errors import BastionError
from bastion.index import Index, open_index
from bastion.ingest import Ingest
from bastion.ingest.rebuild import recover
from bastion.ingest.rejections import RejectionLog
from bastion.query.find import Finder
from bastion.query.retrieve import Retriever
from bastion.settings import Settings

log = logging.getLogger("bastion")

#: Says "clean" after the last opener shut down cleanly; anything else found by a lone opener means a crash.
RUNNING_MARKER = ".running"


class RunMarker:
    """Crash detection shared by every process that opens the archive (server, ``bastion import``, ...).

    Each opener holds a shared ``flock`` on the marker while it runs. An opener that can take the lock
    exclusively is alone: if the marker does not say ``clean``, the last run crashed and it recovers. The
    last one to close, again alone, writes ``clean``. Locks die with their process, so a ``kill -9``
    leaves the marker saying ``running``.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def _set(self, text: str) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode(), 0)
        os.fsync(self.fd)

    def acquire(self) -> bool:
        """Register this opener; True if it is alone and the last run did not end cleanly."""
        crashed = False
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another process has the archive open: it owns crash detection
        else:
            state = os.pread(self.fd, 64, 0).decode(errors="replace").strip()
            crashed = state not in ("", "clean")
            self._set(f"running {os.getpid()}")
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        return crashed

    def release(self) -> None:
        """Unregister; the last one out marks the shutdown clean."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._set("clean")
        except BlockingIOError:
            pass
        finally:
            os.close(self.fd)


@contextlib.contextmanager
def exclusive(data: Path) -> Iterator[None]:
    """Hold the archive in ``data`` for a maintenance job that must run alone (``index rebuild``).

    Raises BastionError if a server or another command has it open; a server started meanwhile
    waits until the job is done.
    """
    data.mkdir(parents=True, exist_ok=True)
    fd = os.open(data / RUNNING_MARKER, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BastionError(f"the archive in {data} is in use (a running `bastion serve`?): stop it first") from None
        yield
    finally:
        os.close(fd)


@dataclass
class Archive:
    """Everything the adapters (DIMSE, DICOMweb, CLI) use; no adapter builds its own."""

    settings: Settings
    blobs: BlobStore
    index: Index
    ingest: Ingest
    finder: Finder
    retriever: Retriever
    marker: RunMarker | None = None

    @property
    def primary(self) -> bool:
        """True for an opener that takes part in crash detection (not an extra worker process)."""
        return self.marker is not None

    @classmethod
    def open(cls, settings: Settings, *, primary: bool = True) -> Archive:
        """Open (creating if needed) the archive the settings describe.

        Primary openers (the server, CLI commands) take part in crash detection (:class:`RunMarker`)
        and recover from an unclean shutdown; extra worker processes open it with ``primary=False``.
        """
        settings.data.mkdir(parents=True, exist_ok=True)
        blobs = open_blob_store(settings.blob_location)
        index = open_index(settings.index_location)
        marker = RunMarker(str(settings.data / RUNNING_MARKER)) if primary else None
        if marker is not None and marker.acquire():
            log.warning("the previous run did not shut down cleanly: checking for unindexed objects")
            recover(blobs, index)
        ingest = Ingest(blobs, index, RejectionLog(str(settings.data / "rejected.jsonl")))
        return cls(settings, blobs, index, ingest, Finder(index), Retriever(index, blobs), marker)

    def close(self) -> None:
        """Flush and close the index and blob store; the last primary out marks the shutdown clean."""
        self.index.close()
        self.blobs.close()
        if self.marker is not None:
            self.marker.release()
            self.marker = None
