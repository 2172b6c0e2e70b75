"""Server CPU per stored instance on one Bastion node and on two nodes sharing one index and one blob store
(issue 21: on two nodes no more than 1.2x that on one).

Each cell starts fresh nodes on a fresh PostgreSQL schema (``BASTION_BENCH_POSTGRESQL``, default the local
``test`` database) and a fresh prefix of one SeaweedFS bucket (one ``weed mini`` for the whole run): one node, or
two (``--node-id node-1`` and ``node-2``, data directories of their own, the same ``--index`` and ``--blobs``).
The corpus (:mod:`corpus`, default 2,000 small instances) is split into ``--associations`` (default 4) disjoint
parts sent at once by DCMTK ``storescu`` (``TCP_NODELAY=1``): all to the one node, or alternately to the two
(2 + 2). The instances held are checked afterwards.

Reported per layout (medians of ``--repeat`` rounds; each round runs both layouts, in alternating order): the
rate, and CPU seconds per 1,000 instances of the Bastion processes (every node's process group: supervisor, DICOM
workers, metadata warmer) during the send and until they are idle again (with the work they deferred, the
metadata warmers' above all), of SeaweedFS and of the PostgreSQL backends serving the nodes' connections; then
the ratio two nodes / one node of each. The target is on the Bastion processes.

Usage: ``python benchmarks/nodes.py [--count 2000] [--kind small] [--associations 4] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402
import ingest  # noqa: E402
import servers  # noqa: E402

LAYOUTS = {"1 node": 1, "2 nodes": 2}
#: The CPU parts reported, with their labels: :data:`ingest.CPU_COLUMNS`, the server's being Bastion's.
PARTS = {"cpu": "bastion_send", "idle": "bastion_until_idle", "weed": "weed", "pg": "pg_backends"}
#: The issue's bound on two nodes' Bastion CPU per instance against one node's.
TARGET = 1.2


def run_once(result: ingest.Result, files: list[Path], nodes: int, s3: servers.S3,
             args: argparse.Namespace) -> None:
    """Start ``nodes`` fresh nodes on a fresh schema and prefix, send ``files`` over ``result.associations``
    associations spread over them, record the outcome in ``result``."""
    ingest.quiet_disk(files)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(servers.pg_schema("bench_nodes"))
        blobs = s3.location()
        running = [stack.enter_context(servers.bastion_shared(url, blobs, s3, shlex.split(args.bastion_args),
                                                              args.workdir, f"node-{n + 1}"))
                   for n in range(nodes)]
        logdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-scu-", dir=args.workdir)))
        chunks = ingest.split(files, result.associations)
        meter = servers.cpu_meter(running, s3)
        meter.start()
        elapsed, failures = ingest.send_to([(running[i % nodes], chunk) for i, chunk in enumerate(chunks)], logdir)
        held = servers.instance_count(running[0])
        ingest.measure_cpu(meter, result.cpu_s)
    ingest.note_ended(meter, result)
    result.seconds.append(elapsed)
    if held != len(files):
        failures.append(f"the index holds {held} instances, expected {len(files)}")
    result.ok = result.ok and not failures
    result.notes.extend(failures)


def spread(associations: int, nodes: int) -> str:
    """How many associations go to each node, e.g. ``2+2``."""
    return "+".join(str(len(range(n, associations, nodes))) for n in range(nodes))


def print_table(one: ingest.Result, two: ingest.Result) -> None:
    """One row per layout, then the ratios two / one."""
    header = ("layout", "associations", "instances", "seconds", "inst/s",
              *(f"{label}_s/1000" for label in PARTS.values()), "status")
    rows = [header]
    # CPU milliseconds per instance (Result.cpu_ms) are CPU seconds per 1,000 instances
    for name, r in (("1 node", one), ("2 nodes", two)):
        rows.append((name, spread(r.associations, LAYOUTS[name]), str(r.instances), f"{r.median_s:.2f}",
                     f"{r.rate:.1f}", *(f"{r.cpu_ms(p):.3f}" for p in PARTS), "ok" if r.ok else "FAILED"))
    rows.append(("two / one", "", "", "", ingest.ratio(two.rate, one.rate),
                 *(ingest.ratio(two.cpu_ms(p), one.cpu_ms(p)) for p in PARTS), ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    for part in ("cpu", "idle"):
        value = two.cpu_ms(part) / one.cpu_ms(part)
        print(f"target (Bastion CPU per instance, two nodes <= {TARGET}x one), {PARTS[part]}: {value:.2f}x "
              f"{'met' if value <= TARGET else 'NOT met'}")
    for name, r in (("1 node", one), ("2 nodes", two)):
        for note in r.notes:
            print(f"note: {name}: {note}")
    print(f"note: {servers.CPU_PARTS_NOTE} (per 1,000 instances here, in seconds)")


def parse_args() -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="instances per cell (default 2,000)")
    parser.add_argument("--kind", default="small", choices=sorted(corpus.KINDS))
    parser.add_argument("--associations", type=int, default=4, help="parallel associations in all (split "
                                                                    "evenly over the nodes)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--bastion-args", default="", help="extra arguments for every node's 'bastion serve'")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "bastion-benchmarks",
                        help="where the generated corpora are kept between runs")
    parser.add_argument("--workdir", type=Path, help="where the run's temporary directory goes")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    return parser.parse_args()


def main() -> int:
    """Run the benchmark; exit 1 if a cell failed."""
    args = parse_args()
    files = corpus.ensure_corpus(args.kind, args.count, args.cache / f"{args.kind}-{args.count}")
    cells = {name: ingest.Result(args.kind, name, args.associations, len(files)) for name in LAYOUTS}
    with tempfile.TemporaryDirectory(prefix="bench-nodes-", dir=args.workdir) as run_dir, \
            servers.seaweedfs() as s3:
        args.workdir = Path(run_dir)
        for round_ in range(args.repeat):
            order = list(LAYOUTS) if round_ % 2 == 0 else list(reversed(LAYOUTS))
            for name in order:
                result = cells[name]
                try:
                    run_once(result, files, LAYOUTS[name], s3, args)
                except (OSError, RuntimeError) as error:
                    result.ok = False
                    result.notes.append(f"{type(error).__name__}: {str(error)[-600:]}")
                print(f"round {round_ + 1} {name}: {result.seconds[-1] if result.seconds else float('nan'):.2f} s"
                      f", Bastion CPU {result.cpu_s.get('cpu', [float('nan')])[-1]:.2f} s during the send, "
                      f"{result.cpu_s.get('idle', [float('nan')])[-1]:.2f} s until idle", file=sys.stderr,
                      flush=True)
    print_table(cells["1 node"], cells["2 nodes"])
    if args.json:
        args.json.write_text(json.dumps({name: {**asdict(r), "cpu_s_per_1000": {p: r.cpu_ms(p) for p in PARTS}}
                                         for name, r in cells.items()}, indent=2) + "\n")
    return 0 if all(r.ok for r in cells.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
