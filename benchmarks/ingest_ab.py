"""Two checkouts of Bastion side by side on the C-STORE benchmark, with where the machine's CPU went.

For each round, each checkout (``--src``, a ``src`` directory: this one's and another's) and each association
count, it starts a fresh ``bastion serve`` on that code, sends the corpus with DCMTK ``storescu`` as
``benchmarks/ingest.py`` does, and prints one line: instances per second, how busy the machine was (user + system
over both cores), its iowait and **steal** (time the hypervisor gave to other guests: on the shared VMs this is
developed on it ranged 0-35 % from one minute to the next, and a run with much steal says little), the CPU
per instance of the server's processes and of the ``storescu`` processes (from ``/proc``, at 100 Hz), and how often per
instance the scheduler took the CPU from a server thread that could have gone on (involuntary context switches).

Alternating the checkouts round by round is what makes two versions comparable here: rates move by tens of
percent between minutes. Every other round runs them in the reverse order, since the position in a round
moved a cell's rate by about 10 % (use an even number of rounds). Compare medians, and read the busy and CPU columns too: a change that keeps the
machine busier at the same CPU per instance is a change in waiting, one that lowers CPU per instance a change in
work. The server directories are kept (under ``--workdir``) and never deleted by this script: deleting thousands
of files makes creating files slow for minutes on this VM's filesystem (see ``servers._run_server``).

Build the other checkout's extensions first (``python setup.py build_ext --inplace`` there).

Usage: ``python benchmarks/ingest_ab.py --src OTHER/src,src [--kind small] [--associations 1,4] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402
import ingest  # noqa: E402
import servers  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")


def machine_ticks() -> list[int]:
    """user nice system idle iowait irq softirq steal, summed over the CPUs (``/proc/stat``)."""
    with open("/proc/stat") as stat:
        return [int(x) for x in stat.readline().split()[1:9]]


def group_preemptions(pgid: int) -> int:
    """Involuntary context switches of every thread of the processes in process group ``pgid`` so far."""
    total = 0
    for pid in servers.group_pids(pgid):
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as status:
                    total += next(int(line.split()[1]) for line in status
                                  if line.startswith("nonvoluntary_ctxt_switches"))
            except (OSError, StopIteration):
                continue
    return total


def group_ticks(pgid: int) -> tuple[int, int]:
    """User and system ticks of the processes in process group ``pgid``."""
    user = system = 0
    for pid in servers.group_pids(pgid):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user, system = user + int(fields[11]), system + int(fields[12])
    return user, system


def measure(src: str, files: list[Path], associations: int, args: argparse.Namespace) -> dict[str, float]:
    """One cell: a fresh server on ``src``, the corpus over ``associations`` associations."""
    os.environ["PYTHONPATH"] = src  # the server (a child) imports bastion from there
    ingest.quiet_disk(files)
    with (
        servers.bastion(shlex.split(args.bastion_args), base_dir=args.workdir) as server,
        tempfile.TemporaryDirectory(dir=args.workdir) as logdir,
    ):
        pgid = os.getpgid(server.process.pid)
        before, server_before, clients_before = machine_ticks(), group_ticks(pgid), os.times()
        preempted_before = group_preemptions(pgid)
        elapsed, failures = ingest.send(server, ingest.split(files, associations), Path(logdir))
        preempted = group_preemptions(pgid) - preempted_before
        after, server_after, clients_after = machine_ticks(), group_ticks(pgid), os.times()
        held = servers.instance_count(server)
    if failures or (held is not None and held != len(files)):
        raise RuntimeError(f"{src} x{associations}: {failures or f'{held} instances held'}")
    delta = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(delta[:7]) or 1
    per_instance_ms = 1e3 / len(files)
    return {
        "rate": len(files) / elapsed,
        "busy": 100 * (total - delta[3] - delta[4]) / total,
        "iowait": 100 * delta[4] / total,
        "steal": 100 * delta[7] / (total + delta[7]),
        "server_user": (server_after[0] - server_before[0]) / HZ * per_instance_ms,
        "server_system": (server_after[1] - server_before[1]) / HZ * per_instance_ms,
        "clients": (
            clients_after.children_user
            + clients_after.children_system
            - clients_before.children_user
            - clients_before.children_system
        )
        * per_instance_ms,
        "preempted": preempted / len(files),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--src",
        default=str(Path(__file__).resolve().parents[1] / "src"),
        help="comma-separated src directories to compare (default: this checkout's)",
    )
    parser.add_argument("--kind", default="small", choices=corpus.KINDS)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--associations", default="1,4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bastion-args", default="", help="extra arguments for 'bastion serve'")
    parser.add_argument("--workdir", type=Path, help="where the servers' directories go (kept)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "bastion-benchmarks")
    args = parser.parse_args()
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ab-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    files = corpus.ensure_corpus(args.kind, args.count, args.cache / f"{args.kind}-{args.count}")
    sources = [s.strip() for s in args.src.split(",") if s.strip()]
    counts = [int(n) for n in args.associations.split(",")]
    results: dict[tuple[str, int], list[dict[str, float]]] = defaultdict(list)
    print(f"{time.strftime('%H:%M')} {args.kind}, {len(files)} instances, servers kept in {args.workdir}")
    for round_no in range(1, args.rounds + 1):
        # Every other round in the reverse order: the cell that follows another's four-association cell ran
        # about 10 % faster over one association than the one that follows its own (eighth session), so a
        # fixed order favours one checkout.
        for src in sources if round_no % 2 else sources[::-1]:
            for n in counts:
                cell = measure(src, files, n, args)
                results[(src, n)].append(cell)
                print(
                    f"round {round_no} {src} x{n}: {cell['rate']:7.1f}/s  busy {cell['busy']:4.1f}%  "
                    f"iowait {cell['iowait']:4.1f}%  steal {cell['steal']:4.1f}%  server {cell['server_user']:.2f} "
                    f"user + {cell['server_system']:.2f} system ms/inst  clients {cell['clients']:.2f} ms/inst  "
                    f"server preempted {cell['preempted']:.2f}/inst",
                    flush=True,
                )
    print("medians:")
    for src in sources:
        rates = {n: statistics.median(c["rate"] for c in results[(src, n)]) for n in counts}
        line = "  ".join(f"x{n} {rates[n]:.1f}/s" for n in counts)
        if len(counts) > 1:
            line += f"  x{counts[-1]}/x{counts[0]} {rates[counts[-1]] / rates[counts[0]]:.2f}"
        busy = "  ".join(
            f"busy x{n} {statistics.median(c['busy'] for c in results[(src, n)]):.0f}%" for n in counts
        )
        print(f"  {src}: {line}  ({busy})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
