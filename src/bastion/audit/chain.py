"""The audit log's hash chain: how an entry is encoded and hashed, and how a chain is checked.

Each entry is one JSON line: ``seq`` (1, 2, ...), ``time`` (UTC, ISO 8601 with milliseconds), the event's fields
(those left at their default are omitted), ``prev`` (the previous entry's hash; 64 zeros for the first) and
``hash``: SHA-256, hex, over the canonical encoding of every other field (:func:`canonical`: JSON with sorted
keys, no spaces, UTF-8). Editing an entry breaks its hash; removing or inserting one breaks the next entry's
``seq`` or ``prev``. The newest entries cut off leave a valid but shorter chain: the anchor (:mod:`bastion.audit.log`'s
``head`` file) names the last seq and hash written, and :func:`verify` reports a chain that ends before it.

A crash can leave the last line torn (written in part). The next writer does not hide it: it ends the torn line
and its first entry says ``recovered``: the torn line's length in bytes, and chains on from the last whole entry.
:func:`verify` accepts exactly that (a torn line followed by an entry that names its length and continues the
chain) as a crash, not as tampering.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

#: ``prev`` of the first entry.
GENESIS = "0" * 64
#: The log's files, one per UTC day: ``audit-YYYY-MM-DD.jsonl``, in the order of their names.
FILE_RE = re.compile(r"^audit-\d{4}-\d{2}-\d{2}\.jsonl$")
#: The anchor: the last seq and hash written, rewritten (atomically) after each batch.
HEAD_FILE = "head"
#: Taken (``flock``) by a writer around each batch, shared by a reader that wants a consistent view.
LOCK_FILE = "lock"


#: What ``since`` may be (the OpenAPI document gives the same pattern, which also allows an empty value).
SINCE_PATTERN = r"([0-9]{4}-[0-9]{2}-[0-9]{2})(?:[T ]([0-9]{2}(?::[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,3})?)?)?))?Z?"
_SINCE_RE = re.compile(SINCE_PATTERN)


def since_key(text: str) -> str:
    """A time given as ``since`` (UTC, ISO 8601: ``2026-12-07``, ``2026-12-07T06:00``, ``2026-12-07 06:00:00Z``) as
    the prefix entry times are compared with (``2026-12-07T06:00``); empty stays empty. Raises ValueError for
    anything else."""
    if not text:
        return ""
    match = _SINCE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a UTC time in ISO 8601 (2026-12-07 or 2026-12-07T06:00)")
    return match.group(1) + (f"T{match.group(2)}" if match.group(2) else "")


def canonical(fields: dict[str, Any]) -> bytes:
    """The bytes an entry's hash is computed over: JSON, keys sorted, no spaces, UTF-8."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(fields: dict[str, Any]) -> str:
    """SHA-256 (hex) of :func:`canonical` of every field but ``hash``."""
    return hashlib.sha256(canonical({k: v for k, v in fields.items() if k != "hash"})).hexdigest()


def sealed_line(raw: bytes, entry: dict[str, Any]) -> bool:
    """Whether ``entry`` (parsed from ``raw``) carries the hash of its content. A line written by the log is the
    canonical encoding: its hash is checked on the bytes with the ``hash`` member cut out, without encoding the entry
    again; any other line is encoded again."""
    digest = entry["hash"]
    member = b'"hash":"' + digest.encode("ascii", "replace") + b'",'
    if raw.count(member) == 1 and hashlib.sha256(raw.replace(member, b"")).hexdigest() == digest:
        return True
    return entry_hash(entry) == digest


def seal(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with its ``hash`` added."""
    return {**fields, "hash": entry_hash(fields)}


def encode(entry: dict[str, Any]) -> bytes:
    """One line of the log file (the canonical encoding, newline-terminated)."""
    return canonical(entry) + b"\n"


def parse_entry(raw: bytes) -> dict[str, Any] | None:
    """The entry a line holds if it is a sealed entry (parses, has seq, prev and hash), else None."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    if (not isinstance(entry, dict) or not isinstance(entry.get("seq"), int) or not isinstance(entry.get("hash"), str)
            or not isinstance(entry.get("prev"), str)):
        return None
    return entry


def log_files(directory: str) -> list[str]:
    """The log's files in ``directory``, oldest first (full paths)."""
    try:
        names = sorted(n for n in os.listdir(directory) if FILE_RE.match(n))
    except FileNotFoundError:
        return []
    return [os.path.join(directory, n) for n in names]


def read_head(directory: str) -> dict[str, Any] | None:
    """The anchor (``seq``, ``hash``, ``file``, ``size``), or None if there is none or it does not parse."""
    try:
        with open(os.path.join(directory, HEAD_FILE), "rb") as fh:
            head = json.loads(fh.read())
    except (OSError, ValueError):
        return None
    if not isinstance(head, dict) or not isinstance(head.get("seq"), int) or not isinstance(head.get("hash"), str):
        return None
    return head


@dataclass(frozen=True)
class Line:
    """One line of the log: its file, 1-based line number, bytes (without the newline) and whether it ended in a
    newline (a line without one is the end of its file)."""

    file: str
    number: int
    raw: bytes
    terminated: bool


def lines(directory: str) -> Iterator[Line]:
    """Every line of every file of the log, oldest first."""
    for path in log_files(directory):
        with open(path, "rb") as fh:
            number = 0
            for raw in fh:
                number += 1
                terminated = raw.endswith(b"\n")
                yield Line(os.path.basename(path), number, raw[:-1] if terminated else raw, terminated)


@dataclass
class Verdict:
    """What :func:`verify` found: ``ok``, the counts, and for a broken chain the first bad line and why."""

    entries: int = 0
    last_seq: int = 0
    last_hash: str = GENESIS
    #: Torn lines a crash left, each followed by an entry that accounts for it.
    crashes: int = 0
    #: A torn last line no entry accounts for yet (a crash, or a writer caught mid-write).
    torn_tail: bool = False
    problem: str = ""
    file: str = ""
    line: int = 0
    seq: int | None = None
    anchor: dict[str, Any] | None = field(default=None)

    @property
    def ok(self) -> bool:
        return not self.problem

    def as_json(self) -> dict[str, Any]:
        """The verdict as ``bastion audit verify --json`` and ``GET /api/audit/verify`` give it."""
        return {"ok": self.ok, "entries": self.entries, "last_seq": self.last_seq, "crashes": self.crashes,
                "torn_tail": self.torn_tail, "problem": self.problem, "file": self.file, "line": self.line,
                "seq": self.seq, "message": self.describe()}

    def describe(self) -> str:
        """One or two sentences for a person."""
        if self.ok:
            text = f"OK: {self.entries} entries, seq 1-{self.last_seq}, chain intact"
            if self.anchor is not None:
                text += f", anchor at seq {self.anchor['seq']} matches"
            if self.crashes:
                text += f"; {self.crashes} torn line(s) from crashes, each accounted for"
            if self.torn_tail:
                text += "; the last line is torn (a crash, or a write in progress)"
            return text
        where = f"{self.file} line {self.line}" if self.file else "the log"
        seq = f" (seq {self.seq})" if self.seq is not None else ""
        return f"BROKEN at {where}{seq}: {self.problem}"


def _fail(verdict: Verdict, line: Line | None, problem: str, seq: int | None = None) -> Verdict:
    verdict.problem = problem
    if line is not None:
        verdict.file, verdict.line = line.file, line.number
    verdict.seq = seq
    return verdict


@contextlib.contextmanager
def consistent(directory: str) -> Iterator[None]:
    """Hold the writers off (a shared ``flock`` on the lock file) so that the files and the anchor agree."""
    try:
        fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def verify(directory: str) -> Verdict:
    """Walk the chain in ``directory`` and check it against its anchor; the first problem found ends the walk.

    Problems: a line that is not an entry (edited beyond parsing), an entry whose hash does not match its content
    (edited), a ``seq`` that skips (entries removed) or goes back (an entry inserted or duplicated), a ``prev``
    that is not the previous entry's hash (an entry removed, replaced or inserted), a chain that ends before the
    anchor's seq (truncated), an anchor whose hash differs from its entry's, or a missing anchor for a non-empty
    log. A torn line followed by an entry whose ``recovered`` is its length is a crash, not a problem.
    """
    verdict = Verdict(anchor=read_head(directory))
    pending: Line | None = None  # a line that is not an entry, waiting to be accounted for as torn
    for line in lines(directory):
        entry = parse_entry(line.raw)
        if entry is not None and not sealed_line(line.raw, entry):
            if pending is None and not line.terminated:
                verdict.torn_tail = True  # a torn last line that happens to parse: not an entry yet
                pending = line
                continue
            return _fail(verdict, line, "edited: the entry's hash does not match its content", entry["seq"])
        if entry is None:
            if pending is not None:
                return _fail(verdict, pending, "not an audit entry (edited, or a torn line no entry accounts for)")
            pending = line
            continue
        seq = entry["seq"]
        if pending is not None:
            if entry.get("recovered") != len(pending.raw):
                return _fail(verdict, pending, "not an audit entry (edited, or a torn line no entry accounts for)")
            verdict.crashes += 1
            pending = None
            verdict.torn_tail = False
        if seq > verdict.last_seq + 1:
            return _fail(verdict, line, f"seq jumps from {verdict.last_seq} to {seq}: "
                         f"{seq - verdict.last_seq - 1} entr{'y' if seq - verdict.last_seq == 2 else 'ies'} removed", seq)
        if seq <= verdict.last_seq:
            return _fail(verdict, line, f"seq {seq} after {verdict.last_seq}: an entry inserted or duplicated", seq)
        if entry["prev"] != verdict.last_hash:
            return _fail(verdict, line, "prev is not the previous entry's hash: an entry removed, replaced or "
                         "inserted before it", seq)
        verdict.entries += 1
        verdict.last_seq, verdict.last_hash = seq, entry["hash"]
        if verdict.anchor is not None and seq == verdict.anchor["seq"] and entry["hash"] != verdict.anchor["hash"]:
            return _fail(verdict, line, "the anchor's hash for this seq differs: the chain was rewritten from here",
                         seq)
    if pending is not None:
        if pending.terminated:
            return _fail(verdict, pending, "not an audit entry (edited, or a torn line no entry accounts for)")
        verdict.torn_tail = True
    anchor = verdict.anchor
    if anchor is None:
        if verdict.entries:
            return _fail(verdict, None, f"the anchor ({HEAD_FILE}) is missing: truncation cannot be ruled out")
    elif anchor["seq"] > verdict.last_seq:
        return _fail(verdict, None, f"truncated: the chain ends at seq {verdict.last_seq}, the anchor says "
                     f"{anchor['seq']} entries were written")
    return verdict


def lines_backwards(path: str, block: int = 1 << 16) -> Iterator[bytes]:
    """The lines of ``path``, last first (without their newline), read in blocks from the end."""
    with open(path, "rb") as fh:
        position = fh.seek(0, os.SEEK_END)
        rest = b""
        while position > 0:
            step = min(block, position)
            position -= step
            fh.seek(position)
            parts = (fh.read(step) + rest).split(b"\n")
            rest = parts[0]
            yield from (p for p in reversed(parts[1:]) if p)
        if rest:
            yield rest


def newest_entries(directory: str, limit: int, wanted: Callable[[dict[str, Any]], bool] | None = None,
                   since: str = "") -> list[dict[str, Any]]:
    """The newest ``limit`` sealed entries (those ``wanted`` keeps) at or after ``since`` (an ISO 8601 time), newest
    first: read back from the end of the newest file, the files of days before ``since`` not at all; torn lines
    are skipped."""
    out: list[dict[str, Any]] = []
    for path in reversed(log_files(directory)):
        day = os.path.basename(path)[len("audit-"):-len(".jsonl")]
        if since and day < since[:10]:
            break
        for raw in lines_backwards(path):
            entry = parse_entry(raw)
            if entry is not None and entry.get("time", "") >= since and (wanted is None or wanted(entry)):
                out.append(entry)
                if len(out) >= limit:
                    return out
    return out
