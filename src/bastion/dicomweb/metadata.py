"""WADO-RS metadata (PS3.18 10.4.1.1.2): the DICOM JSON model of whole instances, cached.

Each instance's metadata is built once from the stored file (pydicom ``to_json_dict``,
PS3.18 F.2) and kept as JSON text in two layers of cache keyed by the blob key, which
names one immutable stored version:

* an in-process LRU of recently served instances;
* a file per blob key under ``<data>/cache/metadata/`` that survives restarts.

Person names are split into their component groups (PS3.18 F.2.2); an entry written before they
were is split when it is read from the file cache, and rewritten. Both are caches, never the truth: deleting ``<data>/cache`` only costs a rebuild. Values
longer than :data:`BULK_THRESHOLD` bytes, and Pixel Data always, become a ``BulkDataURI``.
URIs are stored with a placeholder for the server's base URL, substituted per request, so
a 1,000-instance series costs 1,000 cache reads and one string join.

A :class:`MetadataWarmer`, run by the primary process, follows the index's change log and
writes the file-cache entry of every newly stored instance whatever its origin (C-STORE in
any worker process, STOW-RS, import), so a viewer's first ``/metadata`` request for a large
series reads files instead of parsing every object. It keeps its position in the log (epoch and
``seq``) in a file: after a restart it goes on from there, and after ``bastion index rebuild`` (a new
log) it reads the new log from its start, skipping the entries it has already written.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from bastion.index.base import DELETED, STORED, Index, LogPosition
from bastion.model.attributes import tag_hex
from bastion.model.dicom_json import needs_person_name_split, split_person_names_in
from bastion.model.records import InstanceRecord, parse_object_key
from bastion.model.uids import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)
from bastion.query.retrieve import Retriever

log = logging.getLogger("bastion.dicomweb")


def cache_directory(data: Path) -> Path:
    """Where the metadata file cache lives in a data directory."""
    return data / "cache" / "metadata"


BULK_THRESHOLD = 1024
BASE = "{{bastion-base}}"
_VERSION = "1"  # bump to invalidate file caches after a format change


def instance_path(record: InstanceRecord) -> str:
    """``/studies/{s}/series/{se}/instances/{i}`` for ``record``."""
    return f"/studies/{record.study_uid}/series/{record.series_uid}/instances/{record.sop_uid}"


def to_json(ds: Dataset, uri_prefix: str, path: str = "") -> dict[str, Any]:
    """``ds`` in the DICOM JSON model with bulk data replaced by ``BulkDataURI`` (PS3.18 F.2.6)."""
    out: dict[str, Any] = {}
    for elem in ds:
        key = tag_hex(int(elem.tag))
        here = f"{path}/{key}" if path else key
        if elem.VR == "SQ":
            items = [to_json(item, uri_prefix, f"{here}/{i}") for i, item in enumerate(elem.value)]
            out[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
            continue
        threshold = 0 if int(elem.tag) == 0x7FE00010 else BULK_THRESHOLD

        def handler(_e: DataElement, _here: str = here) -> str:
            return f"{uri_prefix}/bulkdata/{_here}"

        try:
            out[key] = elem.to_json_dict(handler, threshold)
        except Exception as exc:  # an undecodable value is left out, not fatal
            log.debug("metadata: skipping %s: %s", key, exc)
    return out


def build(retriever: Retriever, record: InstanceRecord) -> str:
    """The metadata JSON text of one stored instance, with the base-URL placeholder."""
    prefix = BASE + instance_path(record)
    with retriever.open(record) as fh:
        if record.transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
            body = to_json(pydicom.dcmread(fh), prefix)
        else:
            # Pixel Data is never read: it is always bulk data, and may be gigabytes.
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            body = to_json(ds, prefix)
            pixel = _pixel_data_element(fh.read(8), record.transfer_syntax, ds)
            if pixel:
                tag, vr = pixel
                body[tag] = {"vr": vr, "BulkDataURI": f"{prefix}/bulkdata/{tag}"}
    body["00083002"] = {"vr": "UI", "Value": [record.transfer_syntax]}  # AvailableTransferSyntaxUID
    return _encode(split_person_names_in(body))


def _encode(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def split_person_names_text(text: str) -> str:
    """Cached metadata ``text`` with every person name split into component groups (PS3.18 F.2.2).

    Entries written before names were split hold a PN value whole in ``Alphabetic``, or empty groups: they are
    decoded and encoded again. Any other text is returned as it is, after one search of it.
    """
    if not needs_person_name_split(text):
        return text
    return _encode(split_person_names_in(json.loads(text)))


def _pixel_data_element(head: bytes, ts: str, ds: Dataset) -> tuple[str, str] | None:
    """Tag and VR of the pixel data element whose header is ``head``, or None."""
    if len(head) < 8:
        return None
    big = ts == EXPLICIT_VR_BIG_ENDIAN
    group, elem = struct.unpack(">HH" if big else "<HH", head[:4])
    if group != 0x7FE0 or elem not in (0x0008, 0x0009, 0x0010):
        return None
    vr = head[4:6].decode("latin-1")
    if ts == IMPLICIT_VR_LITTLE_ENDIAN or not vr.isalpha():
        vr = {0x0008: "OF", 0x0009: "OD"}.get(elem, "OW" if int(ds.get("BitsAllocated", 8) or 8) > 8 else "OB")
    return f"{group:04X}{elem:04X}", vr


class MetadataCache:
    """Metadata JSON per stored version: memory LRU over a file cache over the blob store."""

    def __init__(self, retriever: Retriever, directory: Path | None, max_entries: int = 8192) -> None:
        self.retriever = retriever
        self.directory = directory
        self.max_entries = max_entries
        self._lru: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def _file(self, blob_key: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"v{_VERSION}" / f"{blob_key}.json"

    def get(self, record: InstanceRecord) -> str:
        """The metadata text of ``record`` (with placeholder), building it if needed."""
        key = record.blob_key
        with self._lock:
            text = self._lru.get(key)
            if text is not None:
                self._lru.move_to_end(key)
                return text
        path = self._file(key)
        text = None
        if path is not None:
            try:
                text = path.read_text("utf-8")
            except (OSError, UnicodeError):
                text = None
            if text is not None:
                fixed = split_person_names_text(text)
                if fixed is not text:  # an entry from before PN values were split: fixed once
                    self._write(path, fixed)
                    text = fixed
        if text is None:
            text = build(self.retriever, record)
            if path is not None:
                self._write(path, text)
        with self._lock:
            self._lru[key] = text
            while len(self._lru) > self.max_entries:
                self._lru.popitem(last=False)
        return text

    def ensure(self, record: InstanceRecord) -> bool:
        """Write the file-cache entry of ``record`` unless it exists; True if it was built.

        Unlike :meth:`get` this leaves the memory LRU alone (the warmer must not evict what
        viewers are using).
        """
        path = self._file(record.blob_key)
        if path is None or path.exists():
            return False
        self._write(path, build(self.retriever, record))
        return True

    @staticmethod
    def _write(path: Path, text: str) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except OSError as exc:  # a cache that cannot be written is only slower
            log.warning("metadata cache write failed for %s: %s", path, exc)

    def response_text(self, records: Iterable[InstanceRecord], base: str) -> str:
        """A JSON array of the metadata of ``records`` with BulkDataURIs under ``base``."""
        texts = [self.get(r) for r in records]
        return ("[" + ",".join(texts) + "]").replace(BASE, base)


class MetadataWarmer:
    """Builds the metadata cache entries of newly stored instances in a background thread.

    It reads the index's change log (:meth:`Index.changes_after`) from a position (epoch and ``seq``) kept
    in a file beside the cache, so entries are built once whichever process stored the object, and
    restarts resume where they stopped: every change after the position is handled once. When the log it
    followed is gone (``bastion index rebuild``, :meth:`Index.clear`), it reads the new one from its start:
    building an entry is idempotent, and one that exists costs a ``stat``. A ``deleted`` change removes the
    version's file-cache entry. On a first start (no checkpoint) it begins ``backlog`` changes before the
    newest, so recent studies are warm without reading the whole archive. Best effort: an entry it cannot
    build is built on first request instead.

    Parameters
    ----------
    index
        The index whose change log is followed.
    cache
        The cache whose file entries are written (it must have a directory).
    checkpoint
        File holding the change-log position handled (``<epoch>:<seq>``; a bare ``seq`` written before the
        log had epochs is taken as a position in the current log).
    backlog
        Changes before the newest to start from when there is no checkpoint.
    interval_s
        Pause between polls of the change log when it has nothing new.
    quiet_s, max_lag_s
        Ingest comes first: while new changes keep arriving (some within the last ``quiet_s``), the
        warmer waits, for at most ``max_lag_s``. A burst from a scanner is thus warmed just after it
        ends; a viewer asking before that builds what it needs on request. ``quiet_s = 0`` warms at once.
    busy_batch, busy_share
        Ingest that goes on past ``max_lag_s`` (a migration, a long multi-frame series) still comes
        first: the warmer then handles at most ``busy_batch`` changes at a time and rests after each
        batch for as long as the batch took times ``(1 - busy_share) / busy_share``, so it takes at most
        ``busy_share`` of the time of one CPU, whatever the machine, until the changes stop arriving.
    only_node
        Warm only the instances this node stored (their blob keys name it): where several nodes share the
        index, each builds the entries of what it received, and the others build one on its first request,
        rather than every node reading every object back.
    """

    def __init__(self, index: Index, cache: MetadataCache, checkpoint: Path, *, backlog: int = 10_000,
                 interval_s: float = 0.5, batch: int = 500, quiet_s: float = 1.0,
                 max_lag_s: float = 30.0, busy_batch: int = 20, busy_share: float = 0.1,
                 only_node: str | None = None) -> None:
        if not 0 < busy_share <= 1:
            raise ValueError("busy_share must be in (0, 1]")
        self.only_node = only_node
        self.index = index
        self.cache = cache
        self.checkpoint = checkpoint
        self.backlog = backlog
        self.interval_s = interval_s
        self.batch = batch
        self.quiet_s = quiet_s
        self.max_lag_s = max_lag_s
        self.busy_batch = busy_batch
        self.busy_share = busy_share
        self.built = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the background thread (a daemon: it also ends when the index is closed)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="bastion-metadata-warmer", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def position(self) -> LogPosition:
        """Where the warmer goes on from: its stored position, else ``backlog`` before the log's end."""
        try:
            text = self.checkpoint.read_text().strip()
        except OSError:
            text = ""
        if text.isdigit():  # written before the change log had epochs: a seq of the log the index has
            return LogPosition(self.index.log_start().epoch, int(text))
        try:
            return LogPosition.parse(text)
        except ValueError:
            start, end = self.index.log_start(), self.index.log_end()
            return LogPosition(end.epoch, max(start.seq, end.seq - self.backlog))

    def run_once(self, since: LogPosition, limit: int | None = None) -> LogPosition:
        """Handle the changes after ``since`` (one batch, at most ``limit``); return the new position, which is
        stored in the checkpoint file. If the log ``since`` belongs to is gone, the new position is the start
        of the log the index has now, and nothing else is done."""
        read = self.index.changes_after(since, min(self.batch, limit or self.batch))
        if read.reset:
            log.info("metadata warmer: the index has a new change log (rebuilt or cleared): reading it from "
                     "its start")
            MetadataCache._write(self.checkpoint, str(read.position))
            return read.position
        for change in read.changes:
            if self._stop.is_set():
                return since
            since = LogPosition(read.position.epoch, change.seq)
            if change.kind == DELETED:
                self._forget(change.blob_key)
            if change.kind != STORED or not self._ours(change.blob_key):
                continue
            record = self.index.current(change.sop_uid)
            if record is None or record.blob_key != change.blob_key:
                continue  # superseded since: the current version has its own change
            try:
                self.built += int(self.cache.ensure(record))
            except Exception as exc:  # unreadable or gone: the request will tell
                log.debug("metadata warm-up failed for %s: %s", record.blob_key, exc)
        if read.changes:
            MetadataCache._write(self.checkpoint, str(since))
        return since

    def _ours(self, blob_key: str) -> bool:
        """Whether this warmer builds the entry of ``blob_key`` (see ``only_node``)."""
        if self.only_node is None:
            return True
        parts = parse_object_key(blob_key)
        return parts is not None and parts["node"] == self.only_node

    def _forget(self, blob_key: str) -> None:
        """Remove the file-cache entry of a deleted version (a viewer can no longer ask for it)."""
        path = self.cache._file(blob_key)
        if path is not None:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.debug("metadata cache entry of %s not removed: %s", blob_key, exc)

    def rest_after(self, worked_s: float) -> float:
        """Seconds to rest after ``worked_s`` of work while ingest is busy: the warmer's time is then at most
        :attr:`busy_share` of the whole."""
        return worked_s * (1 - self.busy_share) / self.busy_share

    def _run(self) -> None:
        try:
            since = self.position()
            newest_seen: LogPosition | None = None
            deferred_at: float | None = None
            while not self._stop.is_set() and not self.index.closed:
                newest = self.index.log_end()
                if newest.epoch == since.epoch and newest.seq <= since.seq:
                    newest_seen, deferred_at = newest, None
                    self._stop.wait(self.interval_s)
                    continue
                # Objects still arriving: ingest has the CPU; once the backlog has waited max_lag_s, the
                # warmer takes a bounded share of it until they stop.
                arriving, newest_seen = newest != newest_seen, newest
                if arriving and self.quiet_s > 0:
                    now = time.monotonic()
                    deferred_at = deferred_at or now
                    if now - deferred_at < self.max_lag_s:
                        self._stop.wait(self.quiet_s)
                        continue
                    since = self.run_once(since, self.busy_batch)
                    self._stop.wait(self.rest_after(time.monotonic() - now))
                    continue
                since = self.run_once(since)
        except Exception as exc:  # the index was closed under us, or is broken: stop quietly
            if not self.index.closed:
                log.warning("metadata warmer stopped: %s", exc)


def start_warmer(index: Index, retriever: Retriever, data: Path, only_node: str | None = None) -> MetadataWarmer:
    """Start a :class:`MetadataWarmer` for the archive in ``data`` (primary process only); ``only_node``: warm
    only what that node stored (an index that several nodes share)."""
    directory = cache_directory(data)
    warmer = MetadataWarmer(index, MetadataCache(retriever, directory, max_entries=0),
                            directory.parent / "metadata-warmer.seq", only_node=only_node)
    warmer.start()
    return warmer
