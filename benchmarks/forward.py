"""Forwarding benchmark (issue 23): edge → upstream over one association, against DCMTK ``storescu`` straight to
the same kind of upstream, and the time an edge takes to drain a backlog.

Each run (``--repeat`` of them, medians reported):

1. **direct**: a fresh upstream Bastion; one ``storescu`` (``TCP_NODELAY=1``, one association) sends the corpus
   to it; the wall clock from its start to its exit.
2. **backlog**: a fresh upstream Bastion, and an edge Bastion whose ``[[forward]]`` rule points where nothing
   listens (the outage), with ``forward_max_attempts = 1``: the corpus is stored on the running edge with
   ``bastion import``, queued, and dead after one attempt each; the benchmark waits until the edge's metadata
   warmer is done with it too. Then the edge is restarted with the rule pointing at the upstream (the link is
   back), and the drain time runs from ``POST /api/queues/upstream/retry`` until its ``/api/queues`` says every
   instance was delivered (the upstream then holds them all: checked).

The forwarding rate (instances / drain time) over the direct rate is the ratio the issue asks to be at least 0.8.

Usage: ``python benchmarks/forward.py [--instances 2000] [--kind small|ct] [--repeat 3] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402
import servers  # noqa: E402

STORESCU = "/usr/bin/storescu"  # DCMTK's; the venv's bin/ also holds pynetdicom's storescu of the same name
DEADLINE_S = 3600.0
POLL_S = 0.25


def _delivered(edge: servers.Server) -> int:
    queues = edge.get_json("/api/queues")["queues"]
    return sum(q["delivered"] for q in queues)


def direct(files: list[Path], workdir: Path) -> float:
    """Seconds for one storescu to send ``files`` to a fresh upstream."""
    with servers.bastion(base_dir=workdir, name="upstream-direct") as upstream:
        argv = [STORESCU, "-aet", "BENCHSCU", "-aec", upstream.aet, servers.HOST, str(upstream.dicom_port),
                *map(str, files)]
        started = time.monotonic()
        proc = subprocess.run(argv, env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, check=False)
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {proc.stderr[-2000:]!r}")
        held = servers.instance_count(upstream)
        if held != len(files):
            raise RuntimeError(f"the upstream holds {held} of {len(files)} instances")
    return seconds


def _wait(what: str, check: Any, every_s: float = 0.05) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(every_s)


def _warmed(edge: servers.Server, data: Path) -> bool:
    """Whether the edge's metadata warmer has caught up with its change log."""
    try:
        seq = int((data / "cache" / "metadata-warmer.seq").read_text().strip().rpartition(":")[2])
    except (OSError, ValueError):
        return False
    return bool(seq >= edge.get_json("/api/statistics")["last_change"])


def backlog(corpus_dir: Path, count: int, workdir: Path) -> float:
    """Seconds for an edge to drain a backlog of the corpus to a fresh upstream."""
    edge_data = Path(tempfile.mkdtemp(prefix="edge-", dir=workdir)) / "data"
    config = edge_data.parent / "edge.toml"
    with servers.bastion(base_dir=workdir, name="upstream-forward") as upstream:
        [down] = servers.free_ports(1)
        config.write_text(f'[[forward]]\nname = "upstream"\nto = "{upstream.aet}@{servers.HOST}:{down}"\n')
        env = {"BASTION_CONFIG": str(config), "BASTION_FORWARD_MAX_ATTEMPTS": "1"}
        with servers.bastion(["--data", str(edge_data)], base_dir=workdir, env=env, name="edge-outage") as edge:
            # The outage: everything stored meanwhile is queued, and dead after its one attempt.
            subprocess.run([servers.BASTION_BINARY, "import", "--data", str(edge_data), str(corpus_dir)],
                           check=True, capture_output=True)
            _wait("the backlog queued", lambda: edge.get_json("/api/queues")["queues"][0]["dead"] == count)
            _wait("the edge's metadata warmer", lambda: _warmed(edge, edge_data))
        config.write_text(f'[[forward]]\nname = "upstream"\nto = "{upstream.aet}@{servers.HOST}:'
                          f'{upstream.dicom_port}"\n')
        with servers.bastion(["--data", str(edge_data)], base_dir=workdir, env=env, name="edge") as edge:
            request = urllib.request.Request(f"{edge.base_url}/api/queues/upstream/retry", method="POST")
            started = time.monotonic()
            with urllib.request.urlopen(request, timeout=30) as rsp:
                assert json.loads(rsp.read())["retried"] == count
            # Polled four times a second: each look is a query of the edge's queue in the forwarder's own process.
            _wait("the backlog delivered", lambda: _delivered(edge) >= count, POLL_S)
            seconds = time.monotonic() - started
        held = servers.instance_count(upstream)
        if held != count:
            raise RuntimeError(f"the upstream holds {held} of {count} instances")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--kind", choices=sorted(corpus.KINDS), default="small")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bastion-bench-forward")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus_dir = args.workdir / f"corpus-{args.kind}-{args.instances}"
    files = corpus.ensure_corpus(args.kind, args.instances, corpus_dir)
    runs: list[dict[str, float]] = []
    for run in range(args.repeat):
        cells = Path(tempfile.mkdtemp(prefix=f"run{run}-", dir=args.workdir))
        try:
            d = direct(files, cells)
            b = backlog(corpus_dir, len(files), cells)
        finally:
            shutil.rmtree(cells, ignore_errors=True)
        runs.append({"direct_s": d, "direct_per_s": len(files) / d, "drain_s": b, "forward_per_s": len(files) / b,
                     "ratio": d / b})
        print(f"run {run + 1}: storescu direct {len(files) / d:7.1f}/s ({d:.1f} s); forward backlog drained in "
              f"{b:.1f} s ({len(files) / b:7.1f}/s); ratio {d / b:.2f}", flush=True)
    median: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"median over {len(runs)} run(s), {len(files)} {args.kind} instances: storescu direct "
          f"{median['direct_per_s']:.1f}/s, forwarding {median['forward_per_s']:.1f}/s (ratio {median['ratio']:.2f}), "
          f"backlog drained in {median['drain_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"instances": len(files), "kind": args.kind, "runs": runs, "median": median},
                                        indent=2))


if __name__ == "__main__":
    main()
