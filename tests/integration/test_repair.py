"""The repair and the scrub of the blob stores' copies (issue 22 item 3, :mod:`bastion.blobs.repair`): a real server
with two file stores and real damage (a store directory deleted under load, bytes flipped in copies nobody reads),
``bastion verify --repair`` on a stopped archive, and the scrub's rate limit and progress without real time.

Nothing here waits a fixed time: each test polls, with a generous deadline, for the state it expects."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pytest
from conftest import BastionServer, make_study, requires_dcmtk, run_bastion

from bastion.blobs import repair
from bastion.blobs.copies import open_copies
from bastion.blobs.findings import FindingLog
from bastion.blobs.repair import MB, Repairer, ScrubState, TokenBucket
from bastion.errors import StorageError
from bastion.model import digest as content_digest
from bastion.model.records import object_key

#: How long a test waits for the repair to have happened (it is seconds; the deadline is for a loaded machine).
DEADLINE_S = 150.0


def _start(factory: Any, tmp_path: Path, **settings: str) -> tuple[BastionServer, Path, Path]:
    one, two = tmp_path / "store-one", tmp_path / "store-two"
    env = {"BASTION_BLOBS": f"{one},{two}", "BASTION_REPAIR_INTERVAL": "3", "BASTION_SCRUB_RATE": "0"}
    env |= {f"BASTION_{k.upper()}": v for k, v in settings.items()}
    return factory(settings=env), one, two


def _objects(store: Path) -> dict[str, Path]:
    """The store's object files by SOP Instance UID (journal, spool and quarantine left out)."""
    if not store.is_dir():
        return {}
    return {p.name.split("_")[0]: p for p in store.rglob("*.dcm")
            if not any(part.startswith(".") for part in p.relative_to(store).parts)}


def _digest_ok(path: Path) -> bool:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False
    return path.name.rsplit("_", 1)[1] == f"b3-{blake3.blake3(data).hexdigest()}.dcm"


def _flip(path: Path, offset: int = -100) -> None:
    """Flip one byte in place, as a failing disk would: the file is neither read through Bastion nor replaced."""
    with open(path, "r+b") as fh:
        fh.seek(offset, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _sent(server: BastionServer, tmp_path: Path, name: str, n: int, kind: str = "small") -> list[str]:
    study = make_study(tmp_path / name, series=1, per_series=n, kind=kind)
    proc = server.storescu(*study.files)
    assert proc.returncode == 0 and "Refused" not in proc.stdout, proc.stdout
    return study.sop_uids


def _until(what: Callable[[], Any], server: BastionServer, why: str) -> Any:
    """Poll ``what`` until it returns something true (and return that); fail after :data:`DEADLINE_S`."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        result = what()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{why}: not within {DEADLINE_S:.0f} s\nserver log tail:\n{server.log()[-4000:]}")
        time.sleep(0.25)


def _warmed(server: BastionServer) -> bool:
    """Whether the metadata warmer has handled every change in the log (its checkpoint, ``<epoch>:<seq>``)."""
    last = server.get_json("/api/changes?since=0&limit=10000")["last"]
    try:
        text = next(server.data.rglob("metadata-warmer.seq")).read_text().strip()
    except (StopIteration, FileNotFoundError):
        return False
    return bool(text) and int(text.rsplit(":", 1)[-1]) >= last > 0


def _findings(data: Path) -> list[dict[str, Any]]:
    return FindingLog(str(data / "copies.jsonl")).entries()


# -- (a) a store directory lost under load ---------------------------------------------------------------------


@pytest.mark.timeout(300)
@requires_dcmtk
def test_a_deleted_store_is_filled_again_while_objects_keep_arriving(bastion_factory: Any, tmp_path: Path) -> None:
    server, one, two = _start(bastion_factory, tmp_path, copies_required="1")
    before = _sent(server, tmp_path, "before", 6)
    shutil.rmtree(one)  # the store that reads try first, under a running server
    during = _sent(server, tmp_path, "during", 6)
    during += _sent(server, tmp_path, "during-ct", 3, kind="ct")  # written in place, not through the journal
    every = set(before) | set(during)

    def whole() -> bool:
        a, b = _objects(one), _objects(two)
        return (set(a) == set(b) == every and all(_digest_ok(p) for p in [*a.values(), *b.values()])
                and all(a[sop].name == b[sop].name for sop in every))

    _until(whole, server, "every object back in both stores with its digest")
    health = _until(lambda: (h := server.get_json("/health"))["status"] == "ok" and h, server, "/health ok again")
    assert "reason" not in health
    findings = server.stats()["copies"]["findings"]
    assert findings["outstanding"] == 0 and findings["repaired"] >= len(before), findings
    assert "was gone and was made again" in server.log()


# -- (b) the scrub -----------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@requires_dcmtk
def test_the_scrub_finds_and_repairs_every_flipped_copy(bastion_factory: Any, tmp_path: Path) -> None:
    server, one, two = _start(bastion_factory, tmp_path, scrub_rate="200", repair_interval="600")
    sops = _sent(server, tmp_path, "study", 5, kind="ct") + _sent(server, tmp_path, "small", 5)
    # The metadata warmer reads every new object (and would find a flipped copy first): flip once it is done.
    _until(lambda: _warmed(server), server, "the metadata warmer through the new objects")
    flipped = [_objects(one)[sop] for sop in sops[:3]] + [_objects(two)[sop] for sop in sops[3:6]]
    flipped.append(_objects(one)[sops[7]])
    for i, path in enumerate(flipped):
        _flip(path, offset=-1 - 997 * i)
    assert not any(_digest_ok(p) for p in flipped)

    _until(lambda: all(_digest_ok(p) for p in flipped), server, "every flipped copy back to its digest")
    entries = _findings(server.data)
    for path in flipped:
        key = str(path.relative_to(one if path.is_relative_to(one) else two))
        store = str(one if path.is_relative_to(one) else two)
        mine = [e for e in entries if e["key"] == key and e["store"] == store]
        assert [e["problem"] for e in mine if not e["repaired"]] == ["corrupt"], mine
        assert "scrub" in mine[0]["detail"]
        assert [e["detail"] for e in mine if e["repaired"]] == ["was corrupt"], mine
    assert all(_digest_ok(p) for store in (one, two) for p in _objects(store).values())
    _until(lambda: server.get_json("/health")["status"] == "ok", server, "/health ok again")
    state = json.loads((server.data / "scrub.json").read_text())
    assert state["cycles"] >= 1 or state["corrupt"] >= 1, state


# -- (c) bastion verify --repair ---------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@requires_dcmtk
def test_verify_repair_makes_every_copy_again_on_a_stopped_archive(bastion_factory: Any, tmp_path: Path) -> None:
    server, one, two = _start(bastion_factory, tmp_path)
    sops = _sent(server, tmp_path, "study", 8)
    server.stop()
    files_one, files_two = _objects(one), _objects(two)
    for sop in sops[:2]:
        files_two[sop].unlink()  # missing in two
    for sop in sops[2:5]:
        _flip(files_one[sop])  # corrupt in one
    _flip(files_two[sops[5]])  # corrupt in two
    cli = ["--data", str(server.data), "--blobs", str(one), "--blobs", str(two)]

    checked = run_bastion("verify", *cli)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert f"{one}: 8 checked, 0 missing, 3 corrupt, 0 unreadable, 0 repaired" in checked.stdout, checked.stdout
    assert f"{two}: 6 checked, 2 missing, 1 corrupt, 0 unreadable, 0 repaired" in checked.stdout, checked.stdout
    assert "0 object(s) with no good copy left" in checked.stdout

    repaired = run_bastion("verify", "--repair", *cli)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert f"{one}: 8 checked, 0 missing, 3 corrupt, 0 unreadable, 3 repaired" in repaired.stdout, repaired.stdout
    assert f"{two}: 6 checked, 2 missing, 1 corrupt, 0 unreadable, 3 repaired" in repaired.stdout, repaired.stdout
    for store in (one, two):
        assert set(_objects(store)) == set(sops) and all(_digest_ok(p) for p in _objects(store).values())
    log = FindingLog(str(server.data / "copies.jsonl"))
    assert log.outstanding() == [] and log.summary()["repaired"] == 6

    again = run_bastion("verify", *cli)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{two}: 8 checked, 0 missing, 0 corrupt, 0 unreadable, 0 repaired" in again.stdout

    # An object with no good copy left: reported, and the exit status says so.
    gone = sops[6]
    _objects(one)[gone].unlink()
    _flip(_objects(two)[gone])
    lost = run_bastion("verify", "--repair", *cli)
    assert lost.returncode == 1, lost.stdout + lost.stderr
    assert "1 object(s) with no good copy left in any store" in lost.stdout
    assert f"LOST {_objects(two)[gone].relative_to(two)}" in lost.stdout


# -- (d) the rate limit and the scrub's progress, without real time ----------------------------------------------


class FakeTime:
    """A clock that only moves when slept on."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


def test_token_bucket_paces_bytes_to_the_rate() -> None:
    t = FakeTime()
    bucket = TokenBucket(10 * MB, burst=MB, clock=t.clock)
    assert bucket.take(MB, t.sleep) == 0.0  # the burst is there at once
    waited = sum(bucket.take(MB, t.sleep) for _ in range(100))
    assert waited == pytest.approx(10.0)  # 100 MB at 10 MB/s
    t.now += 3600.0  # an hour idle banks no more than one burst
    assert bucket.take(MB, t.sleep) == 0.0
    assert bucket.take(3 * MB, t.sleep) == pytest.approx(0.3)


def test_token_bucket_holds_any_mix_of_sizes_to_the_rate_over_time() -> None:
    t = FakeTime()
    bucket = TokenBucket(5 * MB, clock=t.clock)  # burst: one read (1 MiB) or a tenth of a second's worth
    start, sent = t.now, 0
    for i in range(5000):
        n = (i * 7919) % (3 * MB) + 1  # 1 byte to 3 MB, uneven
        bucket.take(n, t.sleep)
        sent += n
        t.now += 0.001  # the hashing itself takes a little time
    elapsed = t.now - start
    assert sent / elapsed <= 5 * MB * (1 + 1 / elapsed) + 1  # the rate, plus at most one burst over the run
    assert sent / elapsed >= 5 * MB * 0.99  # and no slower than asked


def test_token_bucket_never_waits_for_what_the_rate_already_paid() -> None:
    t = FakeTime()
    bucket = TokenBucket(MB, burst=MB, clock=t.clock)
    bucket.take(MB, t.sleep)
    t.now += 0.5  # half a second of refill
    assert bucket.delay(MB // 2) == 0.0
    assert bucket.delay(MB // 2) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        TokenBucket(0)


def _two_stores(tmp_path: Path, objects: int, required: int | None = None) -> tuple[Any, list[str]]:
    copies = open_copies([str(tmp_path / "a"), str(tmp_path / "b")], required,
                         findings=FindingLog(str(tmp_path / "copies.jsonl")))
    keys = []
    hour_ago = time.time_ns() - 3600 * 10**9
    for n in range(objects):
        data = os.urandom(50_000 + n)
        keys.append(object_key(f"1.2.826.0.1.{n + 1}", str(hour_ago + n).zfill(20),
                               content_digest.text(content_digest.of_bytes(data))))
        copies.put(keys[-1], data)
    return copies, sorted(keys)


def test_the_scrub_goes_on_where_it_stopped_after_a_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copies, keys = _two_stores(tmp_path, 7)
    state_file = str(tmp_path / "scrub.json")
    monkeypatch.setattr(repair, "SCRUB_BATCH", 3)
    first = Repairer(copies, scrub_state=state_file, scrub_rate=1000 * MB)
    first.state.cycle_started = time.time()
    first.state.store = copies.stores[0].location
    assert first.scrub_batch() == 3
    saved = ScrubState.load(state_file)
    assert (saved.store, saved.after, saved.checked) == (copies.stores[0].location, keys[2], 3)

    # A corrupt copy beyond where the first one stopped; the restarted scrub finds it and repairs it.
    victim = Path(copies.stores[0].location) / keys[5]
    _flip(victim)
    second = Repairer(copies, scrub_state=state_file, scrub_rate=1000 * MB)
    assert second.state.after == keys[2]
    assert second.scrub_batch() == 3  # keys[3:6]
    assert second.state.checked == 6 and second.state.corrupt == 1 and second.state.repaired == 1
    assert _digest_ok(victim)
    assert second.scrub_batch() == 1 and second.scrub_batch() == 0  # keys[6]; then store a is done
    assert second.state.store == copies.stores[1].location and second.state.after == ""
    while second.state.cycle_started:
        second.scrub_batch()
    assert second.state.cycles == 1 and second.state.checked == 14  # 7 objects x 2 stores, each once
    assert FindingLog(str(tmp_path / "copies.jsonl")).outstanding() == []
    copies.close()


def test_the_reconciliation_repairs_missing_copies_and_reports_lost_objects(tmp_path: Path) -> None:
    copies, keys = _two_stores(tmp_path, 6)
    a, b = (Path(s.location) for s in copies.stores)
    (b / keys[0]).unlink()
    (a / keys[1]).unlink()
    (a / keys[2]).unlink()
    (b / keys[2]).unlink()  # in neither store: lost (the index says it was stored)
    indexed = [*keys, "2020/01/01/00/not-a-key-any-store-holds"]
    repairer = Repairer(copies, scrub_rate=0, indexed_keys=lambda: indexed[:-1],
                        is_indexed=lambda key: key in indexed)
    report = repairer.reconcile()
    assert [(s.missing, s.repaired) for s in report.stores] == [(2, 1), (2, 1)]
    assert report.lost == [keys[2]] and not report.whole
    assert all(s.problem_with(k) is None for s in copies.stores for k in keys if k != keys[2])
    outstanding = copies.findings.outstanding()
    assert {(f.key, f.problem) for f in outstanding} == {(keys[2], "missing")}
    again = repairer.reconcile()  # the lost object is not a new finding every time
    assert again.lost == [keys[2]] and len(copies.findings.outstanding()) == 2
    assert copies.findings.size() == FindingLog(str(tmp_path / "copies.jsonl")).size()
    copies.close()


def test_a_store_that_could_not_be_opened_takes_writes_and_is_repaired_once_it_opens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bastion.blobs import copies as copies_module
    from bastion.blobs.late import LateStore

    (tmp_path / "b").write_text("a failed disk")
    copies, keys = _two_stores(tmp_path, 3, required=1)  # stored in "a" alone: "b" cannot be opened
    late = copies.stores[1]
    assert isinstance(late, LateStore)
    assert copies.findings.summary()["outstanding_by_store"] == {str(tmp_path / "b"): 3}
    with pytest.raises(StorageError, match="cannot be opened"):
        copies.stores[1].usage()
    (tmp_path / "b").unlink()  # the disk is back
    late.retry_after_s = 0.0  # its wait to be opened again is over...
    monkeypatch.setattr(copies_module, "RETRY_AFTER_S", 0.0)
    copies._states[1].retry_at = 0.0  # ...and so is its wait to take writes again
    data = b"after the disk came back"
    key = object_key("1.2.826.0.1.99", str(time.time_ns()).zfill(20), content_digest.text(content_digest.of_bytes(data)))
    copies.put(key, data)
    assert copies.stores[1].open_verified(key).read() == data  # the store opened and took the write
    assert Repairer(copies).repair_findings(force=True) == 3
    for k in keys:
        assert copies.stores[1].open_verified(k).read() == copies.stores[0].open_verified(k).read()
    copies.close()
