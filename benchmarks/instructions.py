"""Instructions per C-STORE in the serving worker: a measure of the store path's CPU that a noisy VM does not move.

Runs ``bastion serve --workers 1`` under ``valgrind --tool=callgrind`` (every process of it: the supervisor, the
worker, the metadata warmer), sends ``--more`` instances with DCMTK ``storescu`` over one association (or
``--associations N`` at once, each with its share: the worker then serves them as it serves several peers, its
flushes awaited off the loop), stops the server, and does the same with ``--fewer``; the worker is the process
with the most instructions. The difference between the two runs, divided by the difference in instances, leaves
out start-up and shutdown.

Identical runs differ by up to about ±50k instructions per C-STORE (the event loop's turns depend on timing), so
compare two versions of the code measured in the same hour: ``--src`` points the server at another checkout's
``src`` (build its extensions there first: ``python setup.py build_ext --inplace``).

Usage: ``python benchmarks/instructions.py [--kind small] [--more 550] [--fewer 50] [--associations 1] [--src DIR]``
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402
import servers  # noqa: E402

STORESCU = "/usr/bin/storescu"  # DCMTK's


def _instructions(profile: Path) -> int:
    """The total a callgrind output file records (0 if it recorded none)."""
    for line in profile.read_text(errors="replace").splitlines():
        m = re.match(r"(?:summary|totals):\s+(\d+)", line)
        if m:
            return int(m.group(1))
    return 0


def worker_instructions(files: list[Path], src: Path, workdir: Path, associations: int = 1) -> int:
    """Start the server under callgrind, store ``files`` over ``associations`` at once (disjoint parts), stop it;
    the busiest process's instruction count."""
    run_dir = Path(tempfile.mkdtemp(prefix="instructions-", dir=workdir))
    dicom_port, http_port = servers.free_ports(2)
    env = {**os.environ, "PYTHONPATH": str(src), "TCP_NODELAY": "1"}
    argv = ["valgrind", "--tool=callgrind", "--trace-children=yes",
            f"--callgrind-out-file={run_dir}/callgrind.%p", sys.executable, "-m", "bastion.cli.main", "serve",
            "--data", str(run_dir / "data"), "--host", servers.HOST, "--dicom-port", str(dicom_port),
            "--http-port", str(http_port), "--workers", "1"]
    with open(run_dir / "server.log", "wb") as log:
        server = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # everything runs about fifty times slower under callgrind
        while not servers._port_open(dicom_port):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {(run_dir / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        time.sleep(2)  # let the worker finish setting up its journal before the timed part
        parts = [files[i::associations] for i in range(associations)]
        clients = [subprocess.Popen([STORESCU, "-aec", "BASTION", servers.HOST, str(dicom_port), *map(str, part)],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for part in parts]
        for client in clients:
            output, _ = client.communicate(timeout=3600)
            if client.returncode != 0:
                raise RuntimeError(f"storescu failed: {output[-2000:]}")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=600)
    counts = [_instructions(p) for p in run_dir.glob("callgrind.*")]
    return max(counts, default=0)


def main() -> int:
    """Print the instructions per C-STORE."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=sorted(corpus.KINDS), default="small")
    parser.add_argument("--more", type=int, default=550, help="instances in the longer run")
    parser.add_argument("--fewer", type=int, default=50, help="instances in the shorter run")
    parser.add_argument("--associations", type=int, default=1,
                        help="storescu processes at once, each sending its share (the served mode differs from one)")
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src",
                        help="the bastion source tree the server runs (default: this checkout's)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "bastion-benchmarks")
    parser.add_argument("--workdir", type=Path, default=None, help="where the runs' directories go")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    if not args.more > args.fewer > 0:
        parser.error("--more must be larger than --fewer, and both positive")
    files = corpus.ensure_corpus(args.kind, args.more, args.cache / f"{args.kind}-{args.more}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-instructions-", dir=args.workdir))
    try:
        more = worker_instructions(files[: args.more], args.src, workdir, args.associations)
        fewer = worker_instructions(files[: args.fewer], args.src, workdir, args.associations)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    per_store = (more - fewer) / (args.more - args.fewer)
    print(f"{args.kind} x{args.associations}, source {args.src}: {more:,} - {fewer:,} instructions over {args.more} "
          f"and {args.fewer} C-STOREs => {per_store / 1000:,.0f}k instructions per C-STORE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
