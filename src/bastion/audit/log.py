"""The audit log writer: events queued by the caller, appended in batches by a background thread to a hash chain
(:mod:`bastion.audit.chain`) that all of a node's processes share.

``record`` only queues (it never waits for I/O, never raises); a thread started at the first event writes the
queue :attr:`AuditLog.interval` seconds after the first event queued, or at once at :attr:`AuditLog.batch`
events: one ``flock``, one
``write``, one ``fsync`` per batch, then the anchor (``head``) is rewritten atomically. Each process keeps the
chain's tail (file, size, seq, hash) and reads the file again only when it grew under it (another process wrote).
The files rotate by UTC day (``audit-YYYY-MM-DD.jsonl``); the chain runs on across them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bastion.audit.chain import (
    GENESIS,
    HEAD_FILE,
    LOCK_FILE,
    encode,
    log_files,
    newest_entries,
    parse_entry,
    read_head,
    seal,
)
from bastion.audit.events import AuditEvent, AuditKind, Outcome

log = logging.getLogger("bastion.audit")

#: Events kept waiting at most (a log that cannot be written for long loses the oldest, and says so).
MAX_QUEUED = 100_000


def iso_time(seconds: float) -> str:
    """UTC, ISO 8601 with milliseconds: ``2026-12-07T06:21:26.123Z``."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def compact(event: AuditEvent) -> dict[str, Any]:
    """The event's fields as stored: ``kind``, ``outcome``, ``action`` always, the others only when set."""
    out: dict[str, Any] = {"kind": str(event.kind), "outcome": int(event.outcome), "action": event.action}
    for f in dataclasses.fields(event):
        if f.name in out:
            continue
        value = getattr(event, f.name)
        if value != f.default:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def event_of(entry: dict[str, Any]) -> AuditEvent:
    """The :class:`AuditEvent` a stored entry holds (fields it does not know are ignored)."""
    names = {f.name for f in dataclasses.fields(AuditEvent)}
    values = {k: v for k, v in entry.items() if k in names}
    values["kind"] = AuditKind(values["kind"])
    values["outcome"] = Outcome(values.get("outcome", 0))
    if "studies" in values:
        values["studies"] = tuple(values["studies"])
    return AuditEvent(**values)


@dataclass
class Tail:
    """The end of the chain as this process last saw it: the file written to, its size then, last seq and hash."""

    path: str = ""
    size: int = -1
    seq: int = 0
    hash: str = GENESIS


def _scan(data: bytes, tail: Tail) -> tuple[Tail, int]:
    """The tail after the entries in ``data`` (whole lines, the bytes following ``tail``), and the length of a
    torn last line (0 if ``data`` ends with a newline)."""
    torn = 0 if not data or data.endswith(b"\n") else len(data) - (data.rfind(b"\n") + 1)
    whole = data[:len(data) - torn]
    seq, hash_ = tail.seq, tail.hash
    for raw in whole.splitlines():
        entry = parse_entry(raw)
        if entry is not None:
            seq, hash_ = entry["seq"], entry["hash"]
    return Tail(tail.path, tail.size, seq, hash_), torn


class AuditLog:
    """The audit log in ``directory`` (created if needed); ``None``: kept in :attr:`memory` only (tests, read-only
    openers), sealed the same way."""

    def __init__(self, directory: str | None, *, interval: float = 0.2, batch: int = 500) -> None:
        self.directory = directory
        self.interval = interval
        self.batch = batch
        self.memory: list[dict[str, Any]] = []
        self._tail = Tail()
        self._queue: list[tuple[float, AuditEvent]] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._dropped = 0
        self._written = 0  # events written (or kept in memory) by this process
        self._writing = False  # a batch taken from the queue is being written
        self._pid = os.getpid()

    # -- the caller's side ----------------------------------------------------------------------
    def record(self, event: AuditEvent) -> None:
        """Queue one event; it is written within :attr:`interval`. Never blocks on I/O, never raises."""
        try:
            now = time.time()
            if self.directory is None:
                with self._cond:
                    self._append_memory([(now, event)])
                return
            if os.getpid() != self._pid:  # forked: the parent's thread, queue and lock (maybe held) are not ours
                self._pid, self._thread, self._queue, self._tail = os.getpid(), None, [], Tail()
                self._cond = threading.Condition()
            with self._cond:
                if len(self._queue) >= MAX_QUEUED:
                    self._queue.pop(0)
                    self._dropped += 1
                self._queue.append((now, event))
                if self._thread is None and not self._closing:
                    self._thread = threading.Thread(target=self._run, name="bastion-audit", daemon=True)
                    self._thread.start()
                if len(self._queue) in (1, self.batch):  # the writer starts gathering; a full batch goes now
                    self._cond.notify_all()
        except Exception:  # noqa: BLE001 - auditing must never fail the access it describes
            log.exception("audit event not recorded: %s", event)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every event queued so far is written; whether it was within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()
            while (self._queue or self._writing) and self._thread is not None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self) -> None:
        """Write what is queued, then stop the writer thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30.0)
        with self._cond:
            self._thread = None
            self._closing = False

    def recent(self, limit: int = 100, *, kind: str = "", since: str = "") -> list[dict[str, Any]]:
        """The newest ``limit`` entries, newest first, of ``kind`` (any if empty) at or after ``since`` (ISO 8601):
        those of every process of the node written so far."""
        def wanted(entry: dict[str, Any]) -> bool:
            return not kind or entry.get("kind") == kind

        if self.directory is None:
            with self._cond:
                kept = [e for e in self.memory if wanted(e) and e.get("time", "") >= since]
            return list(reversed(kept[-limit:]))
        return newest_entries(self.directory, limit, wanted, since)

    # -- the writer's side ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait(5.0)  # the first event queued wakes us
                if len(self._queue) < self.batch and not self._closing:
                    self._cond.wait(self.interval)  # gather a batch; a full one, flush() or close() ends it
                batch, self._queue = self._queue, []
                closing = self._closing
                self._writing = bool(batch)
            if batch:
                try:
                    self._write(batch)
                except Exception as exc:  # noqa: BLE001 - keep the events and try again (a full disk may clear)
                    log.error("audit log %s not written (%d events kept for the next try): %s", self.directory,
                              len(batch), exc)
                    with self._cond:
                        self._queue[:0] = batch
                        overflow = len(self._queue) - MAX_QUEUED
                        if overflow > 0:
                            del self._queue[:overflow]
                            self._dropped += overflow
                    if closing:
                        return
                    time.sleep(1.0)
            with self._cond:
                self._writing = False
                self._cond.notify_all()
                if closing and not self._queue:
                    return

    def _append_memory(self, batch: list[tuple[float, AuditEvent]]) -> None:
        for at, event in batch:
            prev = self.memory[-1]["hash"] if self.memory else GENESIS
            self.memory.append(seal({"seq": len(self.memory) + 1, "time": iso_time(at), **compact(event),
                                     "prev": prev}))

    def _write(self, batch: list[tuple[float, AuditEvent]]) -> None:
        """Append ``batch`` to the chain under the directory's lock: one write and one fsync, then the anchor."""
        assert self.directory is not None
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"audit-{datetime.now(UTC):%Y-%m-%d}.jsonl")
        lock = os.open(os.path.join(self.directory, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                size = os.fstat(fd).st_size
                tail, torn, torn_here = self._find_tail(path, fd, size)
                out = bytearray(b"\n" if torn_here else b"")
                seq, prev = tail.seq, tail.hash
                notes: list[tuple[float, AuditEvent]] = []
                if self._dropped:
                    notes.append((time.time(), AuditEvent(AuditKind.CONFIG, Outcome.MINOR_FAILURE, via="audit",
                                                          detail=f"{self._dropped} audit events lost: the log could "
                                                          "not be written for too long")))
                for i, (at, event) in enumerate(notes + batch):
                    seq += 1
                    fields: dict[str, Any] = {"seq": seq, "time": iso_time(at), **compact(event), "prev": prev}
                    if i == 0 and torn:
                        fields["recovered"] = torn
                    entry = seal(fields)
                    out += encode(entry)
                    prev = entry["hash"]
                os.write(fd, out)
                os.fsync(fd)
                self._dropped = 0
                self._tail = Tail(path, size + len(out), seq, prev)
            finally:
                os.close(fd)
            self._write_head()
            self._written += len(batch)
        finally:
            os.close(lock)  # releases the flock

    def _find_tail(self, path: str, fd: int, size: int) -> tuple[Tail, int, bool]:
        """The chain's tail as it is now, the length of a torn last line a crash left (0 if none) and whether that
        line is at the end of ``path`` (it must be ended before appending). Reads only what grew since this
        process's cached tail, or since the anchor."""
        cached = self._tail
        if cached.path == path and cached.size == size:
            return cached, 0, False
        if cached.path == path and 0 <= cached.size < size:
            tail, torn = _scan(os.pread(fd, size - cached.size, cached.size), cached)
            return tail, torn, torn > 0
        head = read_head(self.directory or "")
        if head is not None and isinstance(head.get("file"), str) and isinstance(head.get("size"), int):
            head_path = os.path.join(self.directory or "", head["file"])
            with contextlib.suppress(OSError):
                with open(head_path, "rb") as fh:
                    fh.seek(head["size"])
                    tail, torn = _scan(fh.read(), Tail(path, 0, head["seq"], head["hash"]))
                if head_path == path or size == 0:
                    return tail, torn, torn > 0 and head_path == path
                # a new day's file written after the anchor was last rewritten (a crash in between)
                tail, torn = _scan(os.pread(fd, size, 0), tail)
                return tail, torn, torn > 0
        # no usable anchor: read the newest non-empty file whole
        for candidate in reversed(log_files(self.directory or "")):
            with open(candidate, "rb") as fh:
                data = fh.read()
            if data:
                tail, torn = _scan(data, Tail(path, 0))
                return tail, torn, torn > 0 and candidate == path
        return Tail(path, 0), 0, False

    def _write_head(self) -> None:
        """Rewrite the anchor atomically (a temporary file, flushed, renamed over it)."""
        directory = self.directory or ""
        tmp = os.path.join(directory, f".{HEAD_FILE}.tmp-{os.getpid()}")
        tail = self._tail
        body = encode({"seq": tail.seq, "hash": tail.hash, "file": os.path.basename(tail.path), "size": tail.size,
                       "time": iso_time(time.time())})
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(directory, HEAD_FILE))
