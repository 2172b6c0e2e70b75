"""Edge mode benchmark (issue 23): how long an edge takes to drain a backlog to its upstream once the link is back,
and how long a reconciliation of that backlog takes.

Each run (``--repeat`` of them, medians reported):

1. a fresh upstream Bastion; an edge Bastion whose ``upstream`` points where nothing listens (the outage), with
   ``forward_max_attempts = 1000``: the corpus is stored on the running edge with ``bastion import`` and waits in
   the ``upstream`` queue (``/api/queues`` ``edge.backlog``); the edge is stopped;
2. **drain**: the edge is started again with ``upstream`` (and ``upstream_api``) pointing at the upstream; the time
   runs from the start of ``bastion serve`` (its start-up, about a second, included) until ``/api/queues`` says the
   backlog is empty and every instance held upstream; the upstream's count is checked;
3. **reconcile**: ``bastion queue reconcile --json`` on the edge (C-FIND per series and the upstream's
   ``/api/studies/{uid}/digests``, which reads and hashes every instance there); it must find nothing missing.

Usage: ``python benchmarks/edge.py [--instances 500] [--kind small|ct] [--repeat 3] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402
import servers  # noqa: E402

DEADLINE_S = 3600.0


def _wait(what: str, check: Any) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _edge(server: servers.Server) -> dict[str, Any]:
    report: dict[str, Any] = server.get_json("/api/queues")["edge"]
    return report


def run(corpus_dir: Path, count: int, workdir: Path) -> dict[str, float]:
    """One run: the drain's and the reconciliation's seconds."""
    edge_data = Path(tempfile.mkdtemp(prefix="edge-", dir=workdir)) / "data"
    config = edge_data.parent / "edge.toml"
    env = {"BASTION_CONFIG": str(config), "BASTION_FORWARD_MAX_ATTEMPTS": "1000", "BASTION_FORWARD_BACKOFF": "60"}
    with servers.bastion(base_dir=workdir, name="upstream") as upstream:
        [down] = servers.free_ports(1)
        config.write_text(f'upstream = "{upstream.aet}@{servers.HOST}:{down}"\n')
        with servers.bastion(["--data", str(edge_data), "--aet", "EDGE"], base_dir=workdir, env=env,
                             name="edge-outage") as edge:
            subprocess.run([servers.BASTION_BINARY, "import", "--data", str(edge_data), str(corpus_dir)],
                           check=True, capture_output=True, env={**env})
            _wait("the backlog queued", lambda: _edge(edge)["backlog"] == count)
        config.write_text(f'upstream = "{upstream.aet}@{servers.HOST}:{upstream.dicom_port}"\n'
                          f'upstream_api = "{upstream.base_url}"\n')
        started = time.monotonic()
        with servers.bastion(["--data", str(edge_data), "--aet", "EDGE"], base_dir=workdir, env=env,
                             name="edge") as edge:
            _wait("the backlog delivered", lambda: (e := _edge(edge))["backlog"] == 0 and e["held_upstream"] == count)
            drain = time.monotonic() - started
        held = servers.instance_count(upstream)
        if held != count:
            raise RuntimeError(f"the upstream holds {held} of {count} instances")
        started = time.monotonic()
        proc = subprocess.run([servers.BASTION_BINARY, "queue", "reconcile", "--json", "--data", str(edge_data)],
                              capture_output=True, text=True, env={**env}, check=False)
        reconcile = time.monotonic() - started
        found = json.loads(proc.stdout)
        if (found["checked"], found["missing"], found["different"]) != (count, 0, 0):
            raise RuntimeError(f"reconciliation found {found}")
    return {"drain_s": drain, "drain_per_s": count / drain, "reconcile_s": reconcile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--kind", choices=sorted(corpus.KINDS), default="small")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bastion-bench-edge")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus_dir = args.workdir / f"corpus-{args.kind}-{args.instances}"
    files = corpus.ensure_corpus(args.kind, args.instances, corpus_dir)
    runs: list[dict[str, float]] = []
    for n in range(args.repeat):
        cells = Path(tempfile.mkdtemp(prefix=f"run{n}-", dir=args.workdir))
        try:
            runs.append(run(corpus_dir, len(files), cells))
        finally:
            shutil.rmtree(cells, ignore_errors=True)
        r = runs[-1]
        print(f"run {n + 1}: backlog of {len(files)} drained in {r['drain_s']:.1f} s ({r['drain_per_s']:.0f}/s), "
              f"reconciled in {r['reconcile_s']:.1f} s", flush=True)
    median: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"median over {len(runs)} run(s), {len(files)} {args.kind} instances: drained in {median['drain_s']:.1f} s "
          f"({median['drain_per_s']:.0f}/s, the edge's start-up included), reconciled in {median['reconcile_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"instances": len(files), "kind": args.kind, "runs": runs, "median": median},
                                        indent=2))


if __name__ == "__main__":
    main()
