"""C-STORE ingest benchmark: Bastion against Orthanc, over one and over several parallel associations.

For every corpus, server and association count it starts a fresh server (empty storage), splits the corpus into
disjoint contiguous parts, runs one DCMTK ``storescu`` per part at the same time (``TCP_NODELAY=1``), and times
the wall clock from the first process start to the last exit. Afterwards it checks that every ``storescu``
exited 0 and that the server holds exactly the instances sent. It prints the median over ``--repeat`` runs,
taken in rounds: each round runs every (server, associations) cell of a corpus once, so that the shared
machine's slow spells fall on all servers alike.

Every server's directory is kept until the whole run is over: deleting thousands of files between cells slows
file creation in the next cells on an ext4 without a journal (see :func:`servers._run_server`). For the same
reason, leave a few quiet minutes after anything that deleted many files (a previous run, the test suite): a run
started within six minutes of an earlier one's end in the same ``--workdir`` waits for them (:func:`settle`).

On PostgreSQL (issue 21): ``orthanc-pg`` is Orthanc with its PostgreSQL plugins (index and storage in a fresh
database per cell), ``bastion-pg`` Bastion on a fresh PostgreSQL schema and a fresh prefix of a SeaweedFS bucket
(one ``weed mini`` started for the whole run), ``bastion-pg-landing`` the same with objects of up to 1 MiB landing
in PostgreSQL first (``[landing] max_kb``, :mod:`bastion.blobs.landing`; its CPU until idle is read once every
landed object is in the bucket; ``--landing-delay 0`` moves them while the send goes on); each is compared with
``orthanc-pg`` (``vs_orthanc``). Every cell also
reports CPU per instance (:data:`servers.CPU_PARTS_NOTE` says what is counted): after its send it waits until the
server is idle again, at least 3 s.

Several copies (issue 22): ``bastion-2copies`` is Bastion with two blob stores (``--blobs`` twice, both copies
required before success), on the same disk here: what writing every object twice costs, against ``bastion``.

Usage: ``python benchmarks/ingest.py [--servers orthanc,bastion] [--count 1000] [--repeat 3] [--json FILE]``
``python benchmarks/ingest.py --servers orthanc-pg,bastion-pg,bastion-pg-landing --corpora small,ct --associations 1 --repeat 3``
``python benchmarks/ingest.py --servers orthanc,bastion,bastion-2copies --corpora small,ct --associations 1,4 --repeat 3``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402
import servers  # noqa: E402

STORESCU = "/usr/bin/storescu"  # DCMTK's; the venv's bin/ also holds pynetdicom's storescu of the same name
CALLING_AET = "BENCHSCU"
SERVERS = ("orthanc", "bastion", "storescp", "orthanc-pg", "bastion-pg", "bastion-pg-landing", "bastion-2copies")
#: The Orthanc a server's rate is compared with (``vs_orthanc``): the one on the same kind of storage.
REFERENCE = {"bastion-pg": "orthanc-pg", "bastion-pg-landing": "orthanc-pg"}
#: ``[landing] max_kb`` of ``bastion-pg-landing``.
LANDING_KB = 1024
#: The CPU parts of a cell (``cpu`` / ``idle``: the server's process group during the send / until idle; ``weed``
#: and ``pg`` until idle; see :data:`servers.CPU_PARTS_NOTE`).
CPU_COLUMNS = ("cpu", "idle", "weed", "pg")


@dataclass
class Result:
    """Figures for one (corpus, server, associations) cell; ``seconds`` holds one entry per repeat."""

    corpus: str
    server: str
    associations: int
    instances: int
    seconds: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    ok: bool = True
    notes: list[str] = field(default_factory=list)
    cpu_s: dict[str, list[float]] = field(default_factory=dict)  # CPU_COLUMNS -> CPU seconds per repeat

    @property
    def median_s(self) -> float:
        """Median wall-clock time over the repeats."""
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def rate(self) -> float:
        """Instances per second at the median time."""
        return self.instances / self.median_s if self.seconds else float("nan")

    def cpu_ms(self, part: str) -> float:
        """Median CPU milliseconds per instance of ``part`` (NaN where not measured)."""
        values = self.cpu_s.get(part)
        return statistics.median(values) * 1000 / self.instances if values else float("nan")


def split(files: list[Path], parts: int) -> list[list[Path]]:
    """Split ``files`` into ``parts`` disjoint contiguous chunks of near-equal size."""
    return [files[i * len(files) // parts : (i + 1) * len(files) // parts] for i in range(parts)]


def send(server: servers.Server, chunks: list[list[Path]], logdir: Path) -> tuple[float, list[str]]:
    """Run one ``storescu`` per chunk in parallel; return wall-clock seconds and failure descriptions."""
    return send_to([(server, chunk) for chunk in chunks], logdir)


def send_to(targets: list[tuple[servers.Server, list[Path]]], logdir: Path) -> tuple[float, list[str]]:
    """Run one ``storescu`` per (server, files) in parallel; return wall-clock seconds and failure descriptions."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    logs = [logdir / f"storescu-{i}.log" for i in range(len(targets))]
    start = time.perf_counter()
    procs = []
    for (server, chunk), log in zip(targets, logs, strict=True):
        argv = [STORESCU, "-aet", CALLING_AET, "-aec", server.aet, servers.HOST, str(server.dicom_port)]
        with open(log, "wb") as out:
            procs.append(
                subprocess.Popen([*argv, *map(str, chunk)], env=env, stdout=out, stderr=subprocess.STDOUT)
            )
    codes = [proc.wait() for proc in procs]
    elapsed = time.perf_counter() - start
    failures = [
        f"storescu #{i} exited {code}: {log.read_text(errors='replace')[-300:].strip()}"
        for i, (code, log) in enumerate(zip(codes, logs, strict=True))
        if code != 0
    ]
    return elapsed, failures


def quiet_disk(files: Sequence[Path] = ()) -> None:
    """Write back what earlier cells left in the page cache before the next one starts, and read the corpus
    ``files`` into it.

    DCMTK's ``storescp`` does not flush its files: the kernel wrote them back about 30 s later, in the middle of
    whichever cell ran then, whose own flushes queued behind thousands of small writes (Bastion alone over one
    association: a median of 1,099/s; after the other servers' cells in the same rounds: 937/s). And this VM's
    memory reclaim (DAMON) writes out pages nobody touched for a while: ``storescu`` then read its files from the
    disk, 1,865 reads for 1,000 files in one cell, none in another.
    """
    os.sync()
    for path in files:
        with open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass


def server_context(name: str, args: argparse.Namespace) -> contextlib.AbstractContextManager[servers.Server]:
    """A fresh server of kind ``name`` (see :data:`SERVERS`)."""
    if name in ("orthanc", "orthanc-pg"):
        return servers.orthanc(base_dir=args.workdir, postgresql=name == "orthanc-pg")
    if name == "storescp":
        return servers.dcmtk_storescp(base_dir=args.workdir)
    if name in ("bastion-pg", "bastion-pg-landing"):
        return servers.bastion_pg(args.s3, shlex.split(args.bastion_args), base_dir=args.workdir, name=name,
                                  landing_kb=LANDING_KB if name == "bastion-pg-landing" else 0,
                                  landing_delay_s=args.landing_delay)
    return servers.bastion(shlex.split(args.bastion_args), base_dir=args.workdir, name=name,
                           copies=2 if name == "bastion-2copies" else 1)


def measure_cpu(meter: servers.CpuMeter, record: dict[str, list[float]],
                landed: Callable[[], int] | None = None) -> dict[str, float]:
    """Once a send is over: the meter's parts then (``cpu``: the server's) and, once the server is idle again
    (:meth:`servers.CpuMeter.wait_idle`) with its landing empty (``landed``: every object moved into the bucket),
    the server's (``idle``) and the others'; appended to ``record``."""
    sent = meter.read()
    while landed is not None and landed():
        time.sleep(0.5)
    meter.wait_idle("server")
    settled = meter.read()
    found = {"cpu": sent["server"], "idle": settled["server"],
             **{part: used for part, used in settled.items() if part != "server"}}
    for part, used in found.items():
        record.setdefault(part, []).append(used)
    return found


def note_ended(meter: servers.CpuMeter, result: Result) -> None:
    """Note in ``result`` (once) each part of ``meter`` that lost a process whose last CPU is not counted."""
    for part, n in meter.ended.items():
        note = f"{part}: a process ended during a repeat, its last CPU not counted"
        if n and note not in result.notes:
            result.notes.append(note)


def run_once(result: Result, files: list[Path], args: argparse.Namespace) -> None:
    """Start a fresh server, send ``files`` over ``result.associations`` associations, record the outcome."""
    quiet_disk(files)
    with server_context(result.server, args) as server, \
            tempfile.TemporaryDirectory(prefix="bench-scu-", dir=args.workdir) as logdir:
        meter = servers.cpu_meter([server], args.s3 if result.server.startswith("bastion-pg") else None)
        meter.start()
        elapsed, failures = send(server, split(files, result.associations), Path(logdir))
        held = servers.instance_count(server)
        measure_cpu(meter, result.cpu_s, server.landed)
    note_ended(meter, result)
    result.peak_rss_mb = max(result.peak_rss_mb, server.peak_rss_bytes / 1e6)
    result.seconds.append(elapsed)
    if held is not None and held != len(files):
        failures.append(f"server holds {held} instances, expected {len(files)}")
    result.ok = result.ok and not failures
    result.notes.extend(failures)
    unchecked = "instance count not checked: no usable /api/statistics"
    if held is None and unchecked not in result.notes:
        result.notes.append(unchecked)


def ratio(numerator: float, denominator: float) -> str:
    """Format a throughput ratio, or a dash when either side is missing."""
    if math.isnan(numerator) or math.isnan(denominator) or denominator == 0:
        return "-"
    return f"{numerator / denominator:.2f}x"


def print_table(results: list[Result]) -> None:
    """Print one row per cell, with bastion/orthanc and N-assoc/1-assoc throughput ratios and the CPU per
    instance (ms; the storage parts only where a server has them)."""
    rate = {(r.corpus, r.server, r.associations): r.rate for r in results if r.ok}
    parts = [p for p in CPU_COLUMNS if any(p in r.cpu_s for r in results)]
    header = tuple(
        "corpus server assoc instances seconds inst/s peak_RSS_MB vs_orthanc vs_1_assoc status".split()
    ) + tuple(f"{p}_ms/inst" for p in parts)
    rows = [header]
    for r in results:
        reference = REFERENCE.get(r.server, "orthanc")
        vs_orthanc = ratio(r.rate, rate.get((r.corpus, reference, r.associations), float("nan")))
        vs_single = ratio(r.rate, rate.get((r.corpus, r.server, 1), float("nan")))
        rows.append(
            (
                r.corpus,
                r.server,
                str(r.associations),
                str(r.instances),
                f"{r.median_s:.2f}",
                f"{r.rate:.1f}",
                f"{r.peak_rss_mb:.0f}",
                vs_orthanc if not r.server.startswith("orthanc") else "",
                vs_single if r.associations > 1 else "",
                "ok" if r.ok else "FAILED",
                *(f"{r.cpu_ms(p):.3f}" if p in r.cpu_s else "-" for p in parts),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    for r in results:
        for note in r.notes:
            print(f"note: {r.corpus}/{r.server}/{r.associations}: {note}")
    compared = [f"{a} with {b}" for a, b in REFERENCE.items() if any(r.server == a for r in results)]
    if compared:
        print(f"note: vs_orthanc compares {', '.join(compared)}, the others with orthanc")
    if parts:
        print(f"note: {servers.CPU_PARTS_NOTE}")


def parse_args() -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="orthanc,bastion",
                        help="comma-separated: orthanc, bastion, storescp (DCMTK's storescp: the wire ceiling), "
                             "orthanc-pg, bastion-pg (on PostgreSQL, Bastion's blobs in SeaweedFS), "
                             "bastion-pg-landing (the same, objects up to 1 MiB landing in PostgreSQL first)")
    parser.add_argument("--corpora", default="small,ct", help=f"comma-separated: {', '.join(corpus.KINDS)}")
    parser.add_argument("--count", type=int, default=1000, help="instances per corpus")
    parser.add_argument("--associations", default="1,4", help="comma-separated parallel association counts")
    parser.add_argument("--repeat", type=int, default=1, help="runs per cell; the median is reported")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument(
        "--bastion-args", default="", help="extra arguments for 'bastion serve', e.g. '--workers 2'"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "bastion-benchmarks",
        help="where the generated corpora are kept between runs",
    )
    parser.add_argument("--landing-delay", type=float, default=None,
                        help="bastion-pg-landing's [landing] delay_s (default: Bastion's, 10 s); 0: objects are moved "
                             "into the bucket while the send goes on")
    parser.add_argument("--workdir", type=Path, help="where the run's temporary directory goes (default: the system's)")
    args = parser.parse_args()
    args.servers = [s for s in args.servers.split(",") if s]
    args.corpora = [c for c in args.corpora.split(",") if c]
    args.associations = [int(n) for n in args.associations.split(",") if n]
    unknown = set(args.servers) - set(SERVERS) | set(args.corpora) - set(corpus.KINDS)
    if unknown:
        parser.error(f"unknown server or corpus: {', '.join(sorted(unknown))}")
    return args


#: How long creating files stays slow after many were deleted, on an ext4 without a journal: the kernel skips
#: inodes freed in the last 60 s, or 360 s while their inode table block is not yet written back.
SETTLE_S = 360.0
#: Touched in the parent of the run's directory once the run has deleted its files.
CLEANED_MARKER = ".bench-ingest-cleaned"


def settle(parent: Path) -> None:
    """Wait until :data:`SETTLE_S` have passed since an earlier run deleted its servers' files under ``parent``.

    Run back to back, each run's first cells (Bastion's one-association small cell among them: all its files go
    into one directory, so one block group) paid for the previous run's deletions.
    """
    marker = parent / CLEANED_MARKER
    try:
        wait = SETTLE_S - (time.time() - marker.stat().st_mtime)
    except FileNotFoundError:
        return
    if wait > 0:
        print(f"waiting {wait:.0f} s: the previous run deleted its files under {parent} (see SETTLE_S)",
              file=sys.stderr, flush=True)
        time.sleep(wait)



@contextlib.contextmanager
def s3_for(args: argparse.Namespace) -> Iterator[servers.S3 | None]:
    """The run's SeaweedFS if a server needs one (``bastion-pg``), else None."""
    if not any(name.startswith("bastion-pg") for name in args.servers):
        yield None
        return
    with servers.seaweedfs() as s3:
        yield s3


def main() -> int:
    """Run the benchmark; exit 1 if any cell failed."""
    args = parse_args()
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    settle(parent)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=parent) as run_dir, s3_for(args) as s3:
            args.workdir = Path(run_dir)  # the servers' directories, deleted only after the last cell
            args.s3 = s3
            return run(args)
    finally:
        (parent / CLEANED_MARKER).touch()


def run(args: argparse.Namespace) -> int:
    """Run every cell, print the table, optionally write JSON."""
    results: list[Result] = []
    for kind in args.corpora:
        files = corpus.ensure_corpus(kind, args.count, args.cache / f"{kind}-{args.count}")
        cells = [Result(kind, server, associations, len(files))
                 for server in args.servers for associations in args.associations]
        # Rounds: each runs every cell once, so a slow spell of the shared machine hits every cell alike
        # instead of whichever server happened to run then.
        for _ in range(args.repeat):
            for result in cells:
                if not result.ok:
                    continue
                try:
                    run_once(result, files, args)
                except (OSError, RuntimeError) as error:  # server failed to start or to answer
                    result.ok = False
                    result.notes.append(f"{type(error).__name__}: {str(error)[-600:]}")
        for result in cells:
            print(
                f"{kind:>5} {result.server:>7} x{result.associations}: {result.median_s:.2f} s, "
                f"{result.rate:.1f} inst/s{'' if result.ok else '  FAILED'}",
                file=sys.stderr,
                flush=True,
            )
        results.extend(cells)
    print_table(results)
    if args.json:
        machine = {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        }
        found = [{**asdict(r), "median_s": r.median_s, "instances_per_s": r.rate,
                  "cpu_ms_per_instance": {p: r.cpu_ms(p) for p in r.cpu_s}} for r in results]
        args.json.write_text(json.dumps({"machine": machine, "results": found}, indent=2) + "\n")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
