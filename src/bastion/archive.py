"""Composition root: builds the index, blob store, ingest, find and retrieve services once."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from bastion.audit import AUDIT_DIR, AuditLog
from bastion.blobs.copies import Copies, open_copies
from bastion.blobs.fileio import keep_first
from bastion.blobs.filesystem import FileBlobStore
from bastion.blobs.findings import Finding, FindingLog
from bastion.errors import BastionError
from bastion.index import Index, open_index
from bastion.index.base import COPY_REPAIRED, COPY_WANTING, is_postgresql, set_aside_if_corrupt
from bastion.index.sqlite_record import CRECORD
from bastion.ingest import Ingest
from bastion.ingest.deletion import Deletions
from bastion.ingest.rebuild import SelfRebuild, recover, self_rebuild
from bastion.ingest.rejections import RejectionLog
from bastion.ingest.scan import SPEEDUPS
from bastion.ingest.stamps import IngestStamps
from bastion.jobs import Jobs, open_jobs
from bastion.model.records import is_node_id
from bastion.query.find import Finder
from bastion.query.retrieve import Retriever
from bastion.settings import Settings, SettingsError

if TYPE_CHECKING:
    from bastion.blobs.base import BlobStore
    from bastion.blobs.landing import LandingStore

log = logging.getLogger("bastion")

#: Says "clean" after the last opener shut down cleanly; anything else found by a lone opener means a crash.
#: The node's own state is kept beside it, in ``.running-<node id>`` (:class:`RunMarker`).
RUNNING_MARKER = ".running"
#: Where a node id generated for this data directory is kept (when the ``node_id`` setting is empty).
NODE_ID_FILE = "node-id"
#: Where the node keeps the ceiling of the ingest stamps it has issued (:mod:`bastion.ingest.stamps`).
STAMP_CEILING_FILE = "stamp-ceiling"
#: What the blob stores' copies were found wanting in, and their repairs (:class:`bastion.blobs.findings.FindingLog`).
FINDINGS_FILE = "copies.jsonl"
#: Where the scrub of the copies keeps its progress (:class:`bastion.blobs.repair.ScrubState`).
SCRUB_FILE = "scrub.json"


def node_identity(settings: Settings) -> str:
    """This node's id: the ``node_id`` setting, else the one kept in ``<data>/node-id``, generated (12 hex
    digits of a random UUID) and kept there on the first start.

    Raises SettingsError for a configured or kept id that is not 1-32 characters ``A-Z a-z 0-9 -``.
    """
    rule = "1-32 characters A-Z a-z 0-9 -"
    if settings.node_id:
        if not is_node_id(settings.node_id):
            raise SettingsError(f"setting node_id: {settings.node_id!r} is not a node id ({rule})")
        return settings.node_id
    path = settings.data / NODE_ID_FILE
    try:
        kept = path.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        kept = _keep_new_node_id(path)
    if not is_node_id(kept):
        raise SettingsError(f"{path} holds {kept!r}, not a node id ({rule}): correct it, or set node_id")
    return kept


def _keep_new_node_id(path: Path) -> str:
    """Generate a node id and keep it in ``path``, durably; the id in ``path`` if another process was first
    (:func:`~bastion.blobs.fileio.keep_first`)."""
    return keep_first(path, f"{uuid.uuid4().hex[:12]}\n".encode(), 0o644).decode("ascii", "replace").strip()


class RunMarker:
    """Crash detection shared by every process that opens the archive (server, ``bastion import``, ...).

    Each opener holds a shared ``flock`` on ``path`` (``<data>/.running``) while it runs: the processes of one
    data directory, which all run on its node's host. An opener that can take the lock exclusively is alone:
    if the last run did not end ``clean``, it crashed and the opener recovers. The last one to close, again
    alone, writes ``clean``. Locks die with their process, so a ``kill -9`` leaves the marker saying
    ``running``.

    With ``node_id`` the node's state is its own: it is kept in ``<path>-<node id>`` as well, and ``path``'s
    text names the node (``running <node> <pid>``). The last run crashed if the node's file does not say
    ``clean``, or if ``path`` does not and speaks for this node: names it, or names no node (an archive of one
    node before node ids, or an opener without one). Another node's ``running`` in ``path`` is not this node's
    crash.
    """

    def __init__(self, path: str, node_id: str = "") -> None:
        self.path = path
        self.node_id = node_id
        self.node_path = f"{path}-{node_id}" if node_id else None
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    @staticmethod
    def _write(fd: int, text: str) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        os.fsync(fd)

    def _set(self, text: str) -> None:
        """Write ``text`` as this node's state: into ``path`` and the node's own file."""
        self._write(self.fd, text)
        if self.node_path is not None:
            fd = os.open(self.node_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._write(fd, text)
            finally:
                os.close(fd)

    def _crashed(self) -> bool:
        """Whether the last run of this node did not end cleanly (see the class docstring)."""
        shared = os.pread(self.fd, 128, 0).decode(errors="replace").split()
        words = shared if shared else ["clean"]
        speaks_for_us = not (len(words) == 3 and words[0] == "running" and words[1] != self.node_id)
        if words != ["clean"] and speaks_for_us:
            return True
        if self.node_path is None:
            return False
        try:
            with open(self.node_path, "rb") as fh:
                own = fh.read(128).decode(errors="replace").split()
        except FileNotFoundError:
            return False  # the first run with node ids: the shared marker said all there was
        return own not in ([], ["clean"])

    def acquire(self) -> bool:
        """Register this opener; True if it is alone and the last run did not end cleanly."""
        crashed = False
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another process has the archive open: it owns crash detection
        else:
            crashed = self._crashed()
            self._set(f"running {self.node_id} {os.getpid()}" if self.node_id else f"running {os.getpid()}")
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


def _check_index(settings: Settings) -> tuple[bool, str | None]:
    """Whether this primary opener is alone with the archive, and what is wrong with its index, if anything:
    its SQLite file is missing, or (checked by a lone opener only) cannot be opened or fails ``PRAGMA
    quick_check``, and was moved aside (:func:`bastion.index.base.set_aside_if_corrupt`). Before the index is
    opened."""
    location = settings.index_location
    try:
        with exclusive(settings.data):
            damaged = set_aside_if_corrupt(location)
    except BastionError:
        return False, None  # another process has the archive open: the index is in use, and not this one's to check
    if damaged:
        return True, f"the index {location} is corrupt ({damaged})"
    if not is_postgresql(location) and location != ":memory:" and not os.path.exists(location):
        return True, f"the index file {location} is missing"
    return True, None


#: Connections per process to the landing (:func:`with_landing`).
LANDING_CONNECTIONS = 6


def open_blobs(settings: Settings, node_id: str | None = None) -> Copies:
    """The archive's blob stores (:class:`bastion.blobs.copies.Copies`), their findings logged in the data
    directory; ``node_id`` defaults to :func:`node_identity`."""
    settings.data.mkdir(parents=True, exist_ok=True)
    return open_copies(settings.blob_locations, settings.copies,
                       node_id=node_identity(settings) if node_id is None else node_id,
                       findings=FindingLog(str(settings.data / FINDINGS_FILE)),
                       wrap=functools.partial(with_landing, settings) if settings.has_landing else None)


def with_landing(settings: Settings, store: BlobStore) -> LandingStore:
    """``store`` (the one S3 store, :attr:`Settings.has_landing`) with the landing in the PostgreSQL index's database
    in front of it (:mod:`bastion.blobs.landing`), its schema migrated first: new objects land there with
    ``[landing] max_kb`` set; without, it is read after the bucket (what another node or an earlier run landed)."""
    from bastion.blobs.landing import LandingStore
    from bastion.blobs.s3 import S3BlobStore
    from bastion.index.pg_schema import migrated_pool, parse_location

    if not isinstance(store, S3BlobStore):
        raise SettingsError(f"[landing] needs an S3 blob store, not {store.location}")
    where = parse_location(settings.index_location)
    pool = migrated_pool(where, "bastion-landing", LANDING_CONNECTIONS, application=f"bastion-landing:{where.schema}",
                         min_size=1 if settings.landing_max_kb else 0)
    return LandingStore(store, pool, max_bytes=settings.landing_max_kb * 1024,
                        total_bytes=settings.landing_total_mb * 1024 * 1024)


class FindingsToLog:
    """Appends each copies finding to the index's change log (issue 22: findings go to the change log as well), in
    a thread of its own, started at the first finding: a reader or a store that meets a wanting copy never waits
    for an index transaction (nor holds up one it would wait behind)."""

    def __init__(self, index: Index) -> None:
        self._index = index
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def __call__(self, finding: Finding) -> None:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="bastion-findings")
            self._executor.submit(self._append, finding)

    def _append(self, finding: Finding) -> None:
        try:
            self._index.record_finding(COPY_REPAIRED if finding.repaired else COPY_WANTING, finding.key)
        except Exception as exc:  # noqa: BLE001 - the finding is in the findings log; only its change-log entry is lost
            log.error("finding of %s not added to the change log: %s", finding.key, exc)

    def close(self) -> None:
        """Append the findings still waiting, then stop the thread."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)


#: How a part with a compiled twin runs: its C extension, or the Python version (slower, same results); ``none``:
#: the part is not used (the file write, with a blob store that writes no files: S3).
Implementation = Literal["compiled", "python", "none"]


@dataclass(frozen=True)
class Capabilities:
    """Which implementation runs each part of the store path that has a compiled twin (``setup.py``'s optional
    extensions, loaded by :mod:`bastion.model.compiled`): what the adapters report, without knowing the modules."""

    #: Reading a header (``ingest/scan.py``, ``_cscan.c``).
    header_scan: Implementation
    #: Writing and flushing a blob's file (``blobs/file_writer.py``, ``_cwrite.c``); ``none`` for a store that
    #: writes no files (S3).
    blob_write: Implementation
    #: Recording the common instance in the index (``index/sqlite_record.py``, ``_crecord.c``).
    index_record: Implementation


def _implementation(compiled: object | None) -> Implementation:
    return "compiled" if compiled is not None else "python"


@dataclass
class Archive:
    """Everything the adapters (DIMSE, DICOMweb, CLI) use; no adapter builds its own."""

    settings: Settings
    #: The blob stores, each holding a copy of every object (one, by default).
    blobs: Copies
    index: Index
    ingest: Ingest
    finder: Finder
    retriever: Retriever
    #: Work that outlives a request (C-MOVE sub-operations), leased in the index's database.
    jobs: Jobs
    marker: RunMarker | None = None
    #: This node's id among the nodes sharing the blob store (:func:`node_identity`).
    node_id: str = ""
    #: The index being rebuilt from the blob store in the background, while the archive serves (a primary
    #: opener that found it missing, empty or corrupt: :func:`bastion.ingest.rebuild.self_rebuild`); None if not.
    rebuild: SelfRebuild | None = None
    #: Appends the copies' findings to the change log (set by :meth:`open`).
    findings: FindingsToLog | None = None
    #: The audit trail every adapter records its accesses in (:mod:`bastion.audit`).
    audit: AuditLog = field(default_factory=lambda: AuditLog(None))

    @property
    def primary(self) -> bool:
        """True for an opener that takes part in crash detection (not an extra worker process)."""
        return self.marker is not None

    @classmethod
    def open(cls, settings: Settings, *, primary: bool = True, clock: Callable[[], int] = time.time_ns) -> Archive:
        """Open (creating if needed) the archive the settings describe.

        Primary openers (the server, CLI commands) take part in crash detection (:class:`RunMarker`)
        and recover from an unclean shutdown; extra worker processes open it with ``primary=False``. A primary
        opener that finds the index missing, empty or corrupt (:func:`_check_index`) while the blob store holds
        objects rebuilds it in a background thread (:attr:`rebuild`) and serves meanwhile.
        The node's id (:func:`node_identity`) names its spool files, journal segments, run marker and blob keys,
        so that nodes sharing one blob store never take up each other's. ``clock`` (nanoseconds since the
        epoch) times the ingest stamps, which never go below those of earlier runs (:mod:`bastion.ingest.stamps`).
        Raises SettingsError for an invalid node id.
        """
        settings.data.mkdir(parents=True, exist_ok=True)
        node_id = node_identity(settings)
        blobs = open_blobs(settings, node_id)
        alone, problem = _check_index(settings) if primary else (False, None)
        index = open_index(settings.index_location)
        blobs.on_finding = findings = FindingsToLog(index)
        marker = RunMarker(str(settings.data / RUNNING_MARKER), node_id) if primary else None
        crashed = marker is not None and marker.acquire()
        rebuild = (self_rebuild(blobs, index, settings.data, problem=problem, alone=alone, crashed=crashed,
                                node_id=node_id) if marker is not None else None)
        if crashed and rebuild is None:
            log.warning("the previous run did not shut down cleanly: checking for unindexed objects")
            recover(blobs, index, node_id)
        newest = index.last_stamp()
        stamps = IngestStamps(clock=clock, floor=int(newest) if newest else 0,
                              ceiling_file=str(settings.data / STAMP_CEILING_FILE))
        ingest = Ingest(blobs, index, RejectionLog(str(settings.data / "rejected.jsonl")), node_id=node_id,
                        stamps=stamps)
        return cls(settings, blobs, index, ingest, Finder(index), Retriever(index, blobs), open_jobs(settings), marker,
                   node_id, rebuild, findings, AuditLog(str(settings.data / AUDIT_DIR)))

    @cached_property
    def deletions(self) -> Deletions:
        """Delete, undelete and purge studies (:mod:`bastion.ingest.deletion`)."""
        return Deletions(self.blobs, self.index, self.node_id)

    def capabilities(self) -> Capabilities:
        """Which implementation, compiled or Python, runs each part that has both (:class:`Capabilities`)."""
        store = self.blobs.stores[0]
        return Capabilities(header_scan=_implementation(SPEEDUPS),
                            blob_write=_implementation(store.cwrite) if isinstance(store, FileBlobStore) else "none",
                            index_record=_implementation(CRECORD))

    def close(self) -> None:
        """Flush and close the jobs, index and blob store; the last primary out marks the shutdown clean. A rebuild
        under way is stopped (it goes on at the next start)."""
        if self.rebuild is not None:
            self.rebuild.stop()
        self.jobs.close()
        self.audit.close()
        if self.findings is not None:
            self.findings.close()
        self.index.close()
        self.blobs.close()
        if self.marker is not None:
            self.marker.release()
            self.marker = None
