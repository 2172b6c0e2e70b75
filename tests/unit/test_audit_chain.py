"""The audit log's hash chain: what ``verify`` accepts and what it names (edited, removed, inserted, truncated, torn),
and that several processes appending at once make one valid chain."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from bastion.audit import AuditEvent, AuditKind, AuditLog, Outcome
from bastion.audit.chain import (
    encode,
    entry_hash,
    lines_backwards,
    log_files,
    read_head,
    seal,
    since_key,
    verify,
)
from bastion.audit.log import compact, event_of


def _write(directory: Path, n: int, **kw: object) -> AuditLog:
    log = AuditLog(str(directory), **kw)  # type: ignore[arg-type]
    for i in range(n):
        log.record(AuditEvent(AuditKind.QUERY, user=f"user{i}", address="10.0.0.1", studies=(f"1.2.3.{i}",),
                              count=i, level="STUDY", detail=f"PatientID=P{i}"))
    log.close()
    return log


def _file(directory: Path) -> Path:
    (path,) = log_files(str(directory))
    return Path(path)


def _lines(directory: Path) -> list[bytes]:
    return _file(directory).read_bytes().splitlines(keepends=True)


def _put(directory: Path, lines: list[bytes]) -> None:
    _file(directory).write_bytes(b"".join(lines))


def test_a_written_chain_verifies_with_its_anchor(tmp_path: Path) -> None:
    _write(tmp_path, 25)
    verdict = verify(str(tmp_path))
    assert verdict.ok, verdict.describe()
    assert (verdict.entries, verdict.last_seq) == (25, 25)
    head = read_head(str(tmp_path))
    assert head is not None and head["seq"] == 25 and head["hash"] == verdict.last_hash
    first = json.loads(_lines(tmp_path)[0])
    assert first["seq"] == 1 and first["prev"] == "0" * 64 and first["hash"] == entry_hash(first)
    assert first["time"].endswith("Z") and len(first["time"]) == len("2026-12-07T06:21:26.123Z")
    assert first["user"] == "user0" and first["studies"] == ["1.2.3.0"] and first["level"] == "STUDY"
    assert "role" not in first  # fields left at their default are not stored


def test_an_event_survives_the_compact_form() -> None:
    event = AuditEvent(AuditKind.RETRIEVE, Outcome.MINOR_FAILURE, "R", user="MOD", destination="DEST",
                       studies=("1.2", "1.3"), count=7, detail="1 failed", emergency=True)
    assert event_of(compact(event)) == event


def test_an_edited_entry_is_named(tmp_path: Path) -> None:
    _write(tmp_path, 10)
    lines = _lines(tmp_path)
    lines[4] = lines[4].replace(b"user4", b"someone")
    _put(tmp_path, lines)
    verdict = verify(str(tmp_path))
    assert not verdict.ok
    assert (verdict.line, verdict.seq) == (5, 5)
    assert "edited" in verdict.problem
    assert "line 5 (seq 5)" in verdict.describe()


def test_an_entry_edited_past_parsing_is_named(tmp_path: Path) -> None:
    _write(tmp_path, 10)
    lines = _lines(tmp_path)
    lines[6] = b"garbage\n"
    _put(tmp_path, lines)
    verdict = verify(str(tmp_path))
    assert not verdict.ok and verdict.line == 7 and "not an audit entry" in verdict.problem


def test_a_removed_entry_is_named(tmp_path: Path) -> None:
    _write(tmp_path, 10)
    lines = _lines(tmp_path)
    del lines[3]
    _put(tmp_path, lines)
    verdict = verify(str(tmp_path))
    assert not verdict.ok
    assert (verdict.line, verdict.seq) == (4, 5) and "removed" in verdict.problem


def test_an_inserted_entry_is_named(tmp_path: Path) -> None:
    """A forged entry with a valid hash of its own, slotted in after seq 3: the real seq 4 after it is caught."""
    _write(tmp_path, 10)
    lines = _lines(tmp_path)
    third = json.loads(lines[2])
    forged = seal({**{k: v for k, v in json.loads(lines[3]).items() if k != "hash"}, "user": "forger",
                   "prev": third["hash"]})
    lines.insert(3, encode(forged))
    _put(tmp_path, lines)
    verdict = verify(str(tmp_path))
    assert not verdict.ok
    assert (verdict.line, verdict.seq) == (5, 4) and "inserted" in verdict.problem


def test_a_replaced_entry_with_its_own_valid_hash_is_named(tmp_path: Path) -> None:
    """Rewriting an entry and its hash does not help: the next entry's prev no longer matches."""
    _write(tmp_path, 10)
    lines = _lines(tmp_path)
    entry = json.loads(lines[5])
    lines[5] = encode(seal({**{k: v for k, v in entry.items() if k != "hash"}, "user": "nobody"}))
    _put(tmp_path, lines)
    verdict = verify(str(tmp_path))
    assert not verdict.ok
    assert (verdict.line, verdict.seq) == (7, 7) and "prev" in verdict.problem


def test_a_truncated_end_is_caught_by_the_anchor(tmp_path: Path) -> None:
    _write(tmp_path, 10)
    _put(tmp_path, _lines(tmp_path)[:7])
    verdict = verify(str(tmp_path))
    assert not verdict.ok
    assert "truncated" in verdict.problem and "seq 7" in verdict.problem and "10" in verdict.problem


def test_a_missing_anchor_is_reported(tmp_path: Path) -> None:
    _write(tmp_path, 3)
    os.unlink(tmp_path / "head")
    verdict = verify(str(tmp_path))
    assert not verdict.ok and "anchor" in verdict.problem


def test_a_torn_last_line_is_a_crash_not_tampering(tmp_path: Path) -> None:
    """A crash leaves half a line: verify says so without failing, and the next writer ends it, notes its length
    in ``recovered`` and chains on from the last whole entry."""
    _write(tmp_path, 5)
    path = _file(tmp_path)
    torn = b'{"action":"E","count":99,"kind":"query","outc'
    with open(path, "ab") as fh:
        fh.write(torn)
    verdict = verify(str(tmp_path))
    assert verdict.ok, verdict.describe()
    assert verdict.torn_tail and verdict.entries == 5
    log = _write(tmp_path, 2)
    assert log is not None
    verdict = verify(str(tmp_path))
    assert verdict.ok, verdict.describe()
    assert (verdict.entries, verdict.crashes, verdict.torn_tail) == (7, 1, False)
    recovered = json.loads(_lines(tmp_path)[6])
    assert recovered["seq"] == 6 and recovered["recovered"] == len(torn)
    assert recovered["prev"] == json.loads(_lines(tmp_path)[4])["hash"]


def test_a_torn_line_in_the_middle_without_its_account_is_tampering(tmp_path: Path) -> None:
    _write(tmp_path, 5)
    lines = _lines(tmp_path)
    lines[2] = lines[2][:30] + b"\n"
    _put(tmp_path, lines)
    verdict = verify(str(tmp_path))
    assert not verdict.ok and verdict.line == 3


def test_a_writer_catches_up_with_another_process(tmp_path: Path) -> None:
    """Two logs (as in two processes) on one directory, taking turns: one chain, each seeing the other's tail."""
    a, b = AuditLog(str(tmp_path)), AuditLog(str(tmp_path))
    for i in range(6):
        (a if i % 2 else b).record(AuditEvent(AuditKind.VIEW, user=str(i)))
        assert (a if i % 2 else b).flush()
    a.close()
    b.close()
    verdict = verify(str(tmp_path))
    assert verdict.ok and verdict.entries == 6, verdict.describe()


def _append_many(directory: str, who: str, n: int) -> None:
    log = AuditLog(directory, interval=0.01, batch=7)
    for i in range(n):
        log.record(AuditEvent(AuditKind.STORE, user=who, count=i))
    log.close()


def test_processes_appending_at_once_make_one_valid_chain(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), f"p{k}", 400)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    verdict = verify(str(tmp_path))
    assert verdict.ok, verdict.describe()
    assert verdict.entries == 1600
    users = [json.loads(raw)["user"] for raw in _lines(tmp_path)]
    assert {u: users.count(u) for u in set(users)} == {f"p{k}": 400 for k in range(4)}


def test_recording_never_raises_even_when_the_directory_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    log = AuditLog(str(blocker / "audit"), interval=0.01)
    log.record(AuditEvent(AuditKind.VIEW))
    assert not log.flush(timeout=0.5)  # kept queued: the write keeps failing
    log.close()


def test_the_memory_log_is_sealed_and_filterable() -> None:
    log = AuditLog(None)
    log.record(AuditEvent(AuditKind.VIEW, user="a"))
    log.record(AuditEvent(AuditKind.QUERY, user="b"))
    assert [e["user"] for e in log.recent(10)] == ["b", "a"]
    assert [e["user"] for e in log.recent(10, kind="view")] == ["a"]
    assert log.memory[1]["prev"] == log.memory[0]["hash"]


@pytest.mark.parametrize("kind", ["store", "query"])
def test_recent_reads_newest_first_with_a_filter(tmp_path: Path, kind: str) -> None:
    log = AuditLog(str(tmp_path))
    for i in range(10):
        log.record(AuditEvent(AuditKind.STORE if i % 2 else AuditKind.QUERY, count=i))
    log.flush()
    found = log.recent(3, kind=kind)
    log.close()
    assert [e["kind"] for e in found] == [kind] * 3
    assert [e["count"] for e in found] == ([9, 7, 5] if kind == "store" else [8, 6, 4])


@pytest.mark.parametrize("block", [1, 3, 7, 64, 1 << 16])
def test_lines_backwards_across_block_boundaries(tmp_path: Path, block: int) -> None:
    path = tmp_path / "f"
    lines = [b"a", b"bb", b"", b"ccc" * 5, b"d"]
    path.write_bytes(b"\n".join(lines) + b"\n" + b"torn")
    assert list(lines_backwards(str(path), block)) == [b"torn", b"d", b"ccc" * 5, b"bb", b"a"]


def test_since_takes_iso_8601_times_in_utc() -> None:
    assert since_key("") == ""
    assert since_key("2026-12-07") == "2026-12-07"
    assert since_key("2026-12-07 06:00") == "2026-12-07T06:00"
    assert since_key("2026-12-07T06:00:01.5Z") == "2026-12-07T06:00:01.5"
    for bad in ("yesterday", "2026-12-7", "2026-12-07T6", "2026-12-07T06:00+01:00"):
        with pytest.raises(ValueError):
            since_key(bad)


def test_a_line_encoded_otherwise_with_the_same_content_still_verifies(tmp_path: Path) -> None:
    """The hash is over the content: a line re-encoded with spaces (same fields) is checked by encoding it again."""
    _write(tmp_path, 4)
    lines = _lines(tmp_path)
    lines[1] = json.dumps(json.loads(lines[1]), indent=None, separators=(", ", ": ")).encode() + b"\n"
    _put(tmp_path, lines)
    verdict = verify(str(tmp_path))
    assert verdict.ok, verdict.describe()


_INHERITED: AuditLog | None = None


def _record_in_child(n: int) -> None:
    assert _INHERITED is not None
    for i in range(n):
        _INHERITED.record(AuditEvent(AuditKind.VIEW, user="child", count=i))
    _INHERITED.close()


def test_a_forked_child_records_with_the_log_it_inherited(tmp_path: Path) -> None:
    """A process forked while its parent's writer runs gets a writer (and a lock) of its own; one chain results."""
    global _INHERITED
    _INHERITED = log = AuditLog(str(tmp_path))
    for i in range(50):
        log.record(AuditEvent(AuditKind.VIEW, user="parent", count=i))
    child = multiprocessing.get_context("fork").Process(target=_record_in_child, args=(30,))
    child.start()
    for i in range(50, 100):
        log.record(AuditEvent(AuditKind.VIEW, user="parent", count=i))
    child.join(60)
    assert child.exitcode == 0
    log.close()
    verdict = verify(str(tmp_path))
    assert verdict.ok and verdict.entries == 130, verdict.describe()
