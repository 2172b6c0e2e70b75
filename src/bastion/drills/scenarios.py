"""The drills. Each runs in a fresh work directory (``<work>/data`` the server's data directory, with
``<work>/store1`` and ``<work>/store2`` its blob stores in the scenarios that need two), starts its own
``bastion serve``, loads it over C-STORE, does its damage and measures (``docs/drills.md``).

Common to all: an instance is *acknowledged* once its C-STORE was answered with success or a warning;
*lost* counts acknowledged instances QIDO-RS no longer lists; *corrupt served* counts WADO-RS answers whose
dataset differs from the one sent; *failed reads* counts WADO-RS retrieves of acknowledged instances that got
no answer or an error status.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from bastion.drills import DrillOptions, DrillResult
from bastion.drills.harness import (
    STUDY_SIZE,
    Instance,
    Loader,
    ServerProcess,
    StoredFile,
    bastion_command,
    file_digest,
    flip_byte,
    intact_copies,
    make_instances,
    store_files,
    stray_files,
)
from bastion.drills.readback import Reader, check_all, http_get, indexed_sops, qido_snapshot

#: Bytes of one drill instance, about (pydicom's CT_small.dcm).
INSTANCE_BYTES = 39_206


def note(text: str) -> None:
    """A progress line on stderr."""
    tqdm.write(f"drill: {text}", file=sys.stderr)


@dataclass
class Drill:
    """One run: its options, work directory, instances and result."""

    name: str
    options: DrillOptions
    workdir: Path
    result: DrillResult
    rng: random.Random
    servers: list[ServerProcess] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)

    def server(self, stores: int = 0, **defaults: str) -> ServerProcess:
        """A server on ``<work>/data``; with ``stores``, blob stores ``<work>/store1`` ... as ``--blobs``; its
        settings ``defaults`` (e.g. ``copies_required="1"``) unless ``--setting`` gives them."""
        args: list[str] = []
        for i in range(1, stores + 1):
            (self.workdir / f"store{i}").mkdir(exist_ok=True)
            args += ["--blobs", str(self.workdir / f"store{i}")]
        given = {**defaults, **self.options.settings}
        env = {f"BASTION_{k.upper()}": v for k, v in given.items()}
        if given:
            self.result.add("server_settings", ", ".join(f"{k}={v}" for k, v in given.items()),
                            "settings of the server under drill")
        srv = ServerProcess(self.workdir, self.workdir / "data", args, env)
        self.servers.append(srv)
        return srv

    def load(self, srv: ServerProcess, instances: Sequence[Instance], what: str, *, retry: bool = True,
             until: Callable[[Loader], bool] | None = None, timeout: float | None = None) -> Loader:
        """C-STORE ``instances``; wait until every one is acknowledged (or, with ``retry`` off, answered), or
        ``until(loader)`` is true (the loader is then left running), or ``timeout``."""
        bar = tqdm(total=len(instances), desc=what, unit=" inst", file=sys.stderr, disable=None, leave=False)

        def acked(_: Instance) -> None:
            bar.update(1)

        loader = Loader(srv.dicom_port, instances, retry=retry, on_ack=acked).start()
        deadline = time.monotonic() + (timeout or self.options.timeout)
        try:
            while not loader.done and time.monotonic() < deadline:
                if until is not None and until(loader):
                    return loader
                time.sleep(0.01)
            if not loader.done:
                loader.stop()
                self.result.notes.append(f"{what}: stopped after {timeout or self.options.timeout:.0f} s with "
                                         f"{len(loader.acked)} of {len(instances)} acknowledged")
            return loader
        finally:
            bar.close()

    def finish(self, acked: dict[str, Instance], srv: ServerProcess) -> None:
        """The common zero-loss figures over the ``acked`` instances, from the running ``srv``: lost (not listed
        by QIDO-RS) and, retrieving each once over WADO-RS, failed and corrupt reads (added to the counts so
        far)."""
        note(f"checking {len(acked)} acknowledged instances (QIDO-RS, then WADO-RS of each)")
        present = indexed_sops(srv.base_url)
        lost = sorted(set(acked) - present)
        self.result.lost = (self.result.lost or 0) + len(lost)
        if lost:
            self.result.notes.append(f"lost e.g. {lost[:3]}")
        failed, corrupt, examples = check_all(srv.base_url, acked.values())
        self.result.failed_reads = (self.result.failed_reads or 0) + failed
        self.result.corrupt_served = (self.result.corrupt_served or 0) + corrupt
        if examples:
            self.result.notes.append(f"bad reads e.g. {examples[:3]}")

    def verify_offline(self) -> None:
        """``bastion verify`` on the stopped server's data directory (single-store scenarios)."""
        proc = bastion_command("verify", "--data", str(self.workdir / "data"))
        summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        self.result.add("verify_ok", proc.returncode == 0, "bastion verify passes")
        if proc.returncode != 0:
            self.result.notes.append(f"bastion verify: {summary} {proc.stderr.strip()[-300:]}")

    def zero_loss(self) -> bool:
        return self.result.lost == 0 and self.result.corrupt_served == 0 and self.result.failed_reads == 0


# -- kill-node --------------------------------------------------------------------------------------------------
def kill_node(d: Drill) -> None:
    """SIGKILL the server's whole process group while instances are being sent, restart it; ``rounds`` times."""
    rounds = max(1, d.options.rounds)
    srv = d.server()
    srv.start()
    acked: dict[str, Instance] = {}
    per_round = max(1, len(d.instances) // (rounds + 1))  # the last share is sent after the last restart
    recover: list[float] = []
    unanswered = 0
    lost_after_round: list[int] = []
    acked_at_kill: list[int] = []
    queue = list(d.instances)
    for r in range(rounds):
        batch, queue = queue[:per_round * 2], queue[per_round * 2:]  # more than the kill leaves time for
        target = max(1, int(per_round * d.rng.uniform(0.3, 0.8)))

        def enough(ld: Loader, target: int = target) -> bool:
            return len(ld.acked) >= target

        loader = d.load(srv, batch, f"round {r + 1}/{rounds}: sending", until=enough)
        note(f"round {r + 1}: SIGKILL to the server's process group after {len(loader.acked)} acknowledged")
        srv.kill_group()
        acked_at_kill.append(len(loader.acked))
        loader.stop()
        acked.update(loader.acked)
        unanswered += loader.statuses.get(-1, 0)
        queue = [i for i in batch if i.sop not in loader.acked] + queue  # sent again after the restart
        t0 = srv.launch()
        seconds = srv.wait_serving(t0, d.options.timeout)
        recover.append(seconds)
        note(f"round {r + 1}: serving again {seconds:.2f} s after the restart")
        present = indexed_sops(srv.base_url)
        lost_after_round.append(len(set(acked) - present))
        sample = d.rng.sample(list(acked.values()), min(20, len(acked)))
        failed, corrupt, _ = check_all(srv.base_url, sample)
        d.result.failed_reads = (d.result.failed_reads or 0) + failed
        d.result.corrupt_served = (d.result.corrupt_served or 0) + corrupt
    rest = d.load(srv, queue, "sending the rest")
    acked.update(rest.acked)
    d.finish(acked, srv)
    d.result.lost = max(d.result.lost or 0, max(lost_after_round, default=0))
    srv.stop()
    d.verify_offline()
    d.result.seconds_to_recover = round(sum(recover), 3)
    d.result.add("rounds", rounds)
    d.result.add("acknowledged", len(acked), "instances acknowledged")
    d.result.add("acknowledged_before_kill", acked_at_kill, "acknowledged in the round before its kill")
    d.result.add("unanswered_at_kill", unanswered, "C-STOREs cut off unanswered by the kills")
    d.result.add("lost_per_round", lost_after_round, "acknowledged lost after each restart")
    d.result.add("seconds_to_serve", [round(s, 3) for s in recover], "seconds to serve again, by round")
    d.result.add("seconds_to_serve_max", round(max(recover), 3), "seconds to serve again, worst")
    d.result.ok = d.zero_loss() and bool(d.result.figures["verify_ok"]) and len(acked) == len(d.instances)


# -- lose-index -------------------------------------------------------------------------------------------------
def lose_index(d: Drill) -> None:
    """Delete ``<data>/index.sqlite3*`` while instances are being sent, then restart the server and measure
    until its queries answer completely again: by its own rebuild at start where it has one (``/health`` says
    ``rebuilding``), else by ``bastion index rebuild`` run while it is stopped."""
    srv = d.server()
    srv.start()
    # The first half, whole studies, is stored before the damage: QIDO-RS's answers about its studies are the
    # reference the answers after the recovery must equal (the second half's studies are other studies).
    half = max(STUDY_SIZE, len(d.instances) // 2 // STUDY_SIZE * STUDY_SIZE)
    first = d.load(srv, d.instances[:half], "sending (first half)")
    acked = dict(first.acked)
    before = qido_snapshot(srv.base_url)
    second = d.instances[half:]
    target = max(1, len(second) // 4)
    loader = d.load(srv, second, "sending (second half)", until=lambda ld: len(ld.acked) >= target)
    index_files = sorted((d.workdir / "data").glob("index.sqlite3*"))
    for f in index_files:
        f.unlink(missing_ok=True)
    note(f"deleted {', '.join(f.name for f in index_files)} after {len(acked) + len(loader.acked)} acknowledged")
    query_status, _, _ = http_get(f"{srv.base_url}/dicom-web/studies?limit=1", "application/dicom+json")
    deadline = time.monotonic() + d.options.timeout
    while not loader.done and time.monotonic() < deadline:
        time.sleep(0.05)
    loader.stop()
    acked.update(loader.acked)
    failed_after = sum(n for s, n in loader.statuses.items() if s != 0 and s != -1)
    note(f"{len(acked)} acknowledged; restarting the server")
    srv.stop()
    index_files_at_restart = sorted(f.name for f in (d.workdir / "data").glob("index.sqlite3*"))
    t0 = srv.launch()
    seconds_to_serve = srv.wait_serving(t0, d.options.timeout, states=("ok", "rebuilding", "degraded"))
    method = "self-rebuild at start"
    rebuilding_seen = (srv.health() or {}).get("status") == "rebuilding"
    wanted = set(acked)
    complete_at: float | None = None
    deadline = time.monotonic() + d.options.timeout
    quiet_since = time.monotonic()
    last = -1
    progress: list[tuple[float, int]] = []  # (when, objects done) from /health while it says "rebuilding"
    while time.monotonic() < deadline:
        health = srv.health() or {}
        status = health.get("status")
        rebuilding_seen = rebuilding_seen or status == "rebuilding"
        done = (health.get("rebuild") or {}).get("done")
        if isinstance(done, int):
            progress.append((time.monotonic(), done))
        if status == "rebuilding":  # /health alone meanwhile: a full QIDO-RS listing every 0.1 s slowed it 30-fold
            time.sleep(0.2)
            continue
        present = indexed_sops(srv.base_url)
        if wanted <= present and status != "rebuilding":
            complete_at = time.monotonic()
            break
        if len(present) != last:
            last, quiet_since = len(present), time.monotonic()
        if not rebuilding_seen and time.monotonic() - quiet_since > 5.0:
            break  # no rebuild under way: the server started on an empty index
        time.sleep(0.1)
    rebuild_seconds: float | None = None
    if complete_at is not None:
        rebuild_seconds = complete_at - t0
    elif not rebuilding_seen:
        method = "bastion index rebuild (server stopped)"
        note(f"the server does not rebuild a missing index itself (it lists {last} instances): running "
             "`bastion index rebuild`")
        t0 = time.monotonic()  # the operator's way: from here (the wait to tell an empty index is not counted)
        srv.stop()
        r0 = time.monotonic()
        proc = bastion_command("index", "rebuild", "--data", str(d.workdir / "data"), timeout=d.options.timeout)
        rebuild_seconds = time.monotonic() - r0
        if proc.returncode != 0:
            d.result.notes.append(f"bastion index rebuild failed: {proc.stderr.strip()[-300:]}")
        srv.launch()
        srv.wait_serving(time.monotonic(), d.options.timeout)
        if wanted <= indexed_sops(srv.base_url):
            complete_at = time.monotonic()
    seconds = (complete_at - t0) if complete_at is not None else None
    first_studies = {i.study for i in d.instances[:half]}
    after = qido_snapshot(srv.base_url, first_studies)
    differing = {level: len(set(before[level]) ^ set(after[level])) for level in before}
    d.finish(acked, srv)
    srv.stop()
    d.verify_offline()
    d.result.seconds_to_recover = round(seconds, 3) if seconds is not None else None
    d.result.add("acknowledged", len(acked), "instances acknowledged")
    d.result.add("index_files_deleted", [f.name for f in index_files], "index files deleted")
    d.result.add("store_failures_after_delete", failed_after, "C-STOREs failed after the delete")
    d.result.add("qido_status_after_delete", query_status, "QIDO-RS status right after the delete")
    d.result.add("index_files_at_restart", index_files_at_restart, "index files there at the restart")
    d.result.add("recovery", method)
    d.result.add("rebuilding_seen", rebuilding_seen, "/health said \"rebuilding\"")
    d.result.add("seconds_to_serve", round(seconds_to_serve, 3), "seconds to serve again (health, C-ECHO)")
    d.result.add("seconds_to_complete_queries", d.result.seconds_to_recover,
                 "seconds until QIDO-RS lists every acknowledged")
    d.result.add("rebuild_seconds", round(rebuild_seconds, 3) if rebuild_seconds else None,
                 "rebuild seconds (self-rebuild: from the server's start)")
    d.result.add("rebuild_rate", round(len(acked) / rebuild_seconds, 1) if rebuild_seconds else None,
                 "rebuild rate (instances/s)")
    observed = None
    if len(progress) >= 2 and progress[-1][1] > progress[0][1] and progress[-1][0] > progress[0][0]:
        observed = round((progress[-1][1] - progress[0][1]) / (progress[-1][0] - progress[0][0]), 1)
    d.result.add("rebuild_rate_observed", observed, "rebuild rate in /health's progress (objects/s)")
    d.result.add("qido_identical", not any(differing.values()), "QIDO-RS answers identical to before")
    d.result.add("qido_differences", differing, "QIDO-RS matches differing, by level")
    if complete_at is None:
        d.result.notes.append(f"queries did not answer completely within {d.options.timeout:.0f} s")
    d.result.ok = (d.zero_loss() and complete_at is not None and not any(differing.values())
                   and bool(d.result.figures["verify_ok"]))


# -- scenarios on two stores -------------------------------------------------------------------------------------
def stores(d: Drill) -> tuple[Path, Path]:
    return d.workdir / "store1", d.workdir / "store2"


def copies_missing(d: Drill, acked: dict[str, Instance]) -> str | None:
    """Why the server under drill does not keep a copy of each object in both stores (``None``: it does)."""
    s1, s2 = stores(d)
    in1 = {f.sop for f in store_files(s1)}
    in2 = {f.sop for f in store_files(s2)}
    if not acked:
        return "no instance was acknowledged"
    if not in1 or not in2:
        return ("the server does not keep copies in several blob stores (`bastion serve --blobs A --blobs B` "
                f"wrote {len(in1)} objects to store1 and {len(in2)} to store2)")
    return None


def redundancy(d: Drill, sops: set[str]) -> tuple[int, int]:
    """How many of ``sops`` have an intact copy in store1, and in store2."""
    s1, s2 = stores(d)
    return len(intact_copies(s1, sops)), len(intact_copies(s2, sops))


def lose_copy(d: Drill) -> None:
    """Delete store2's whole directory tree while instances are being sent and read; measure failed reads and
    the seconds until every acknowledged object has an intact copy in both stores again. The server keeps a copy
    in each store and acknowledges once one is durable (``copies_required = 1``, unless ``--setting`` says
    otherwise), so storing goes on while store2 is gone."""
    # A full reconciliation of the stores every 10 s (default 10 min) finds the copies deleted with the tree.
    srv = d.server(stores=2, copies_required="1", repair_interval="10")
    srv.start()
    half = len(d.instances) // 2
    first = d.load(srv, d.instances[:half], "sending (first half)")
    acked = dict(first.acked)
    why = copies_missing(d, acked)
    if why:
        d.result.skipped = why
        srv.stop()
        return
    reader = Reader(srv.base_url, lambda: list(acked.values())).start()
    second = d.instances[half:]
    loader = d.load(srv, second, "sending (second half)", until=lambda ld: len(ld.acked) >= len(second) // 4)
    _, s2 = stores(d)
    gone = s2.with_name(s2.name + ".deleted")
    s2.rename(gone)  # the whole tree disappears at once, whatever the server is writing into it
    t_damage = time.monotonic()
    for _ in range(50):
        shutil.rmtree(gone, ignore_errors=True)
        if not gone.exists():
            break
        time.sleep(0.1)
    note(f"deleted {s2} under load ({len(acked) + len(loader.acked)} acknowledged)")
    deadline = t_damage + d.options.timeout
    while not loader.done and time.monotonic() < deadline:
        acked.update(loader.acked)
        time.sleep(0.05)
    loader.stop()
    acked.update(loader.acked)
    failed_stores = sum(n for s, n in loader.statuses.items() if s != 0)
    seconds: float | None = None
    sops = set(acked)
    c1 = c2 = 0
    while time.monotonic() < deadline:
        c1, c2 = redundancy(d, sops)
        if c1 == c2 == len(sops):
            seconds = time.monotonic() - t_damage
            break
        time.sleep(0.5)
    reader.stop()
    d.result.failed_reads, d.result.corrupt_served = reader.failed, reader.corrupt
    if reader.failures:
        d.result.notes.append(f"reads under damage e.g. {reader.failures[:3]}")
    d.finish(acked, srv)
    srv.stop()
    d.result.seconds_to_recover = round(seconds, 3) if seconds is not None else None
    d.result.add("acknowledged", len(acked), "instances acknowledged")
    d.result.add("store_failures", failed_stores, "C-STOREs not acknowledged (after the delete)")
    d.result.add("reads_under_damage", reader.reads, "WADO-RS reads during the drill")
    d.result.add("copies_store1", c1, "acknowledged with an intact copy in store1")
    d.result.add("copies_store2", c2, "acknowledged with an intact copy in store2")
    d.result.add("seconds_to_full_redundancy", d.result.seconds_to_recover,
                 "seconds until every copy is back in both stores")
    if seconds is None:
        d.result.notes.append(f"redundancy not restored within {d.options.timeout:.0f} s")
    d.result.ok = d.zero_loss() and seconds is not None


def bit_rot(d: Drill) -> None:
    """Flip one byte in each of ``flips`` stored copies (at most one copy of any instance), read every
    instance over WADO-RS, then wait for the repair loop to put every damaged copy right."""
    # A scrub at a set rate runs cycle after cycle (without one, the next cycle would start days later).
    srv = d.server(stores=2, scrub_rate="20")
    srv.start()
    loader = d.load(srv, d.instances, "sending")
    acked = dict(loader.acked)
    why = copies_missing(d, acked)
    if why:
        d.result.skipped = why
        srv.stop()
        return
    candidates = [f for root in stores(d) for f in store_files(root) if f.sop in acked]
    d.rng.shuffle(candidates)
    chosen: list[StoredFile] = []
    seen: set[str] = set()
    for f in candidates:
        if f.sop not in seen and len(chosen) < d.options.flips:
            chosen.append(f)
            seen.add(f.sop)
    for f in chosen:
        flip_byte(f.path, d.rng)
    t_damage = time.monotonic()
    note(f"flipped a byte in {len(chosen)} stored copies; reading every instance")
    d.finish(acked, srv)
    seconds: float | None = None
    repaired: set[Path] = set()
    deadline = t_damage + d.options.timeout
    while time.monotonic() < deadline:
        repaired = {f.path for f in chosen if file_digest(f.path) == f.digest}
        if len(repaired) == len(chosen):
            seconds = time.monotonic() - t_damage
            break
        time.sleep(0.5)
    srv.stop()
    d.result.seconds_to_recover = round(seconds, 3) if seconds is not None else None
    d.result.add("acknowledged", len(acked), "instances acknowledged")
    d.result.add("flipped", len(chosen), "stored copies damaged")
    d.result.add("repaired", len(repaired), "damaged copies detected and repaired")
    d.result.add("seconds_to_repair_all", d.result.seconds_to_recover, "seconds until all are repaired")
    if seconds is None:
        d.result.notes.append(f"{len(chosen) - len(repaired)} damaged copies not repaired within "
                              f"{d.options.timeout:.0f} s")
    d.result.ok = d.zero_loss() and seconds is not None


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[str | None]:
    """Mount a tmpfs of ``size_bytes`` at ``path`` (as root); yields ``None``, or why it could not."""
    path.mkdir(parents=True, exist_ok=True)
    size = f"{max(1, size_bytes // 2**20)}m"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        yield f"cannot mount a {size} tmpfs at {path}: {(proc.stderr or proc.stdout).strip() or proc.returncode}"
        return
    try:
        yield None
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def full_disk(d: Drill) -> None:
    """store2 on a small tmpfs that fills up while instances are sent: every C-STORE must still succeed (on
    store1), no store may fail, no partial file may be left, nothing acknowledged may be lost."""
    payload = len(d.instances) * INSTANCE_BYTES
    size = min(8, max(1, payload // 2 // 2**20)) * 2**20  # 8 MB, or half the payload of a small drill
    _, s2 = stores(d)
    with tmpfs(s2, size) as why:
        if why:
            d.result.skipped = why
            return
        srv = d.server(stores=2, copies_required="1")
        try:
            srv.start()
            loader = d.load(srv, d.instances, "sending", retry=False)
            acked = dict(loader.acked)
            failures = {s: n for s, n in loader.statuses.items() if s != 0}
            why = copies_missing(d, acked)
            if why:
                d.result.skipped = why
                return
            usage = shutil.disk_usage(s2)
            partial = [f.path for f in store_files(s2) if file_digest(f.path) != f.digest]
            partial += [f.path for f in store_files(stores(d)[0]) if file_digest(f.path) != f.digest]
            strays = stray_files(s2) + stray_files(stores(d)[0])
            d.finish(acked, srv)
            in2 = len({f.sop for f in store_files(s2)} & set(acked))
        finally:
            srv.stop()
    d.result.add("tmpfs_bytes", size, "store2 tmpfs size (bytes)")
    d.result.add("store2_used_percent", round(100 * usage.used / usage.total, 1), "store2 used (%)")
    d.result.add("acknowledged", len(acked), "instances acknowledged")
    d.result.add("store_failures", sum(failures.values()), "C-STOREs failed or unanswered")
    d.result.add("failure_statuses", {f"0x{s:04X}" if s >= 0 else "none": n for s, n in failures.items()},
                 "their statuses")
    d.result.add("copies_in_store2", in2, "acknowledged with a copy in store2")
    d.result.add("partial_files", len(partial) + len(strays), "partial or stray files in the stores")
    if partial or strays:
        d.result.notes.append(f"partial e.g. {[str(p) for p in (partial + strays)[:3]]}")
    if usage.used < 0.9 * usage.total:
        d.result.notes.append("store2 never filled up: more instances are needed to test anything")
    d.result.ok = (d.zero_loss() and not failures and not partial and not strays
                   and len(acked) == len(d.instances))


RUNNERS: dict[str, Callable[[Drill], None]] = {
    "kill-node": kill_node, "lose-index": lose_index, "lose-copy": lose_copy, "bit-rot": bit_rot,
    "full-disk": full_disk,
}


def index_integrity(path: Path) -> str | None:
    """``PRAGMA integrity_check`` of the stopped server's SQLite index: ``"ok"``, or its first findings; None
    where there is no SQLite index (a PostgreSQL one, or none left)."""
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            rows = conn.execute("PRAGMA integrity_check").fetchmany(3)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"cannot be checked: {exc}"
    return "; ".join(str(r[0]) for r in rows)


def run(scenario: str, options: DrillOptions) -> DrillResult:
    """Run ``scenario`` in a fresh work directory (removed afterwards unless ``options.keep``)."""
    runner = RUNNERS[scenario]
    workdir = Path(tempfile.mkdtemp(prefix=f"bastion-drill-{scenario}-"))
    result = DrillResult(scenario, options.instances)
    seed = options.seed if options.seed is not None else random.randrange(2**32)
    drill = Drill(scenario, options, workdir, result, random.Random(seed))
    result.add("seed", seed)
    try:
        note(f"{scenario}: work directory {workdir}; generating {options.instances} instances")
        drill.instances = make_instances(options.instances, workdir / "instances")
        runner(drill)
        for srv in drill.servers:
            srv.stop()
        integrity = index_integrity(workdir / "data" / "index.sqlite3")
        if integrity is not None:
            result.add("index_integrity", integrity, "SQLite index integrity_check, at the end")
            if integrity != "ok":
                result.ok = False
                note(f"{scenario}: the index fails PRAGMA integrity_check: {integrity}")
    except Exception as exc:  # the drill could not finish: say why, keep what it left for a look
        result.error = f"{type(exc).__name__}: {exc}"
        result.ok = False
    finally:
        for srv in drill.servers:
            srv.stop()
        if options.keep or result.error or not (result.ok or result.skipped):  # a failed drill's traces stay
            result.workdir = str(workdir)
            note(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if result.skipped:
        result.ok = False
        note(f"{scenario} skipped: {result.skipped}")
    return result
