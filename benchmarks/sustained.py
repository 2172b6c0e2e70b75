"""A long ingest without a pause: the rate, and what the server holds, window by window.

A scanner session, a night of teleradiology or a migration sends for hours. Whatever grows with every stored
instance instead of staying bounded shows here and not in the 1,000-instance benchmark (``ingest.py``): the
index's WAL grew by 31 KB a commit until the first pause (BENCHMARKS.md, item 61).

Starts ``bastion serve`` on an empty data directory (under ``--workdir``, kept), sends ``--count`` synthetic
instances (``benchmarks/corpus.py``) with ``--associations`` DCMTK ``storescu`` at once, each scanning a
directory of links to its share, and prints every ``--window`` seconds: the instances the index gained in the
window, the size of the index's WAL file and the server's memory: its processes' RSS, and of that their anonymous
memory (RSS also counts the index's pages mapped from the file, which the statistics request this script makes
each window reads: they grow with the index and the kernel can drop them); then the whole run's rate, the first
and last windows' and the largest WAL and memory seen.

Usage: ``python benchmarks/sustained.py [--kind small] [--count 20000] [--associations 1] [--window 2] [--src DIR]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402
import ingest  # noqa: E402
import servers  # noqa: E402


def linked_shares(files: list[Path], parts: int, into: Path) -> list[Path]:
    """One directory per association, holding links to its contiguous share of ``files`` (``storescu +sd``
    reads a directory: tens of thousands of paths do not fit on a command line)."""
    shares = []
    for i, chunk in enumerate(ingest.split(files, parts)):
        share = into / f"share-{i}"
        share.mkdir()
        for f in chunk:
            (share / f.name).symlink_to(f)
        shares.append(share)
    return shares


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="small", choices=sorted(corpus.KINDS))
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--associations", type=int, default=1)
    parser.add_argument("--window", type=float, default=2.0, help="seconds between lines")
    parser.add_argument("--src", type=Path, default=None,
                        help="the bastion source tree the server runs (default: the installed one)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "bastion-benchmarks")
    parser.add_argument("--workdir", type=Path, default=None, help="where the server's directory goes (kept)")
    args = parser.parse_args()
    if args.src is not None:
        os.environ["PYTHONPATH"] = str(args.src.resolve())  # the server (a child) imports bastion from there
    files = corpus.ensure_corpus(args.kind, args.count, args.cache / f"{args.kind}-{args.count}")
    base = Path(tempfile.mkdtemp(prefix="bench-sustained-", dir=args.workdir))
    shares = linked_shares(files, args.associations, base)
    ingest.quiet_disk(files)
    env = {**os.environ, "TCP_NODELAY": "1"}
    rates: list[float] = []
    wal_peak = rss_peak = anon_peak = 0
    with servers.bastion(base_dir=base) as server:
        wal = server.workdir / "data" / "index.sqlite3-wal"
        pgid = os.getpgid(server.process.pid)
        logs = [open(base / f"storescu-{i}.log", "wb") for i in range(len(shares))]  # noqa: SIM115
        start = time.perf_counter()
        clients = [subprocess.Popen([ingest.STORESCU, "-aet", ingest.CALLING_AET, "-aec", server.aet, "+sd",
                                     servers.HOST, str(server.dicom_port), str(share)],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
                   for share, log in zip(shares, logs, strict=True)]
        held, at = 0, start
        print(f"{args.count} {args.kind} instances over {args.associations} association(s), data in {server.workdir}")
        print(f"{'seconds':>8} {'inst/s':>8} {'held':>8} {'WAL MB':>8} {'RSS MB':>8} {'anon MB':>8}")
        finished = 0.0  # when the last client exited
        while not finished:
            while time.perf_counter() < at + args.window and not finished:
                time.sleep(0.01)
                if all(c.poll() is not None for c in clients):
                    finished = time.perf_counter()
            now, count = time.perf_counter(), servers.instance_count(server) or held
            wal_size = wal.stat().st_size if wal.exists() else 0
            pids = servers.group_pids(pgid)
            rss, anon = servers.rss_bytes(pids), servers.rss_bytes(pids, anonymous=True)
            wal_peak, rss_peak, anon_peak = max(wal_peak, wal_size), max(rss_peak, rss), max(anon_peak, anon)
            rates.append((count - held) / (now - at))
            print(f"{now - start:8.1f} {rates[-1]:8.1f} {count:8d} {wal_size / 1e6:8.1f} {rss / 1e6:8.1f} "
                  f"{anon / 1e6:8.1f}", flush=True)
            held, at = count, now
        elapsed = finished - start
        for log in logs:
            log.close()
        failed = [i for i, c in enumerate(clients) if c.returncode != 0]
        held = servers.instance_count(server) or 0
    print(f"overall {args.count / elapsed:.1f} inst/s in {elapsed:.1f} s; windows: first {rates[0]:.1f}, "
          f"median {statistics.median(rates):.1f}, last whole {rates[-2] if len(rates) > 1 else rates[0]:.1f} "
          f"inst/s; "
          f"largest WAL {wal_peak / 1e6:.1f} MB, RSS {rss_peak / 1e6:.1f} MB, anonymous {anon_peak / 1e6:.1f} MB; "
          f"{held} instances held")
    if failed or held != args.count:
        print(f"FAILED: storescu {failed} exited non-zero (logs in {base})" if failed else
              f"FAILED: {held} of {args.count} instances held")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
