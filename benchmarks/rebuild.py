"""How fast the index is rebuilt from the blob store: ``bastion index rebuild`` and the self-rebuild at start.

1. Builds (once; kept and reused) an archive of ``--count`` small instances (16x16 CT images of about 1.7 KB,
   the structure of ``benchmarks/corpus.py``: 10 studies x 2 series, two studies per patient) under ``--data``,
   stored through the real ingest (``Archive.ingest.store_bytes``) on the embedded backends (SQLite, filesystem).
2. Runs ``bastion index rebuild --data DIR`` ``--runs`` times and prints instances/s of each run (wall time of
   the command, start-up included) and their median.
3. With ``--self-rebuild``: ``--runs`` times, deletes the index files, starts ``bastion serve`` (one DICOM worker)
   on free loopback ports and polls ``/health`` until it says "ok" again after "rebuilding"; prints instances/s
   over the rebuild (from the first "rebuilding" answer to the first "ok": poll interval 20 ms) and the median.
4. With ``--online``: ``--runs`` times, starts ``bastion serve`` (two DICOM workers) on the archive and runs
   ``bastion index rebuild`` against it (the server rebuilds online and switches the new index in); prints
   instances/s (wall time of the command), the pause the server measured (``pause_s``: from the supervisor's stop
   to HTTP serving again) and the longest ``/health`` answer a client polling every 20 ms waited for meanwhile.

Usage::

    python benchmarks/rebuild.py --data /tmp/bastion-rebuild --count 20000 --runs 3 --self-rebuild --online

Measured 2026-12-07 on the 2-core development machine, shared (load average about 3), 20,000 instances:
``bastion index rebuild`` 3,033 / 3,363 / 3,904 instances/s (median 3,363); the rebuild at start 4,986 / 4,522 /
3,291 (median 4,522). Before the reader thread, in-process A/B runs gave about 3,200/s against 3,850/s with it.
The online rebuild (``--online``, same day): 2,292 / 2,539 / 2,018 instances/s, switch pause 1.00 / 0.78 / 0.81 s.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import Kind, make_instance  # noqa: E402

BASTION = str(Path(sys.executable).parent / "bastion")
#: 16x16 pixels: the header dominates, as it does for the rebuild (which reads headers only).
SMALL = Kind(code=7, size=16)
INDEX_FILE = "index.sqlite3"


def build(data: Path, count: int) -> None:
    """Store ``count`` instances into the archive in ``data`` unless it holds that many already."""
    import io

    from bastion.archive import Archive
    from bastion.settings import load_settings

    archive = Archive.open(load_settings(None, env={}, data=data))
    try:
        have = archive.index.statistics().instances
        if have == count:
            return
        if have:
            raise SystemExit(f"{data} holds {have} instances, not {count}: give another --data")
        started = time.monotonic()
        for n in range(count):
            buf = io.BytesIO()
            make_instance(SMALL, n, count).save_as(buf, enforce_file_format=True)
            archive.ingest.store_bytes(buf.getvalue(), "benchmark")
            if n and n % 5000 == 0:
                print(f"  stored {n} ({n / (time.monotonic() - started):.0f}/s)", file=sys.stderr)
    finally:
        archive.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BASTION_") or k == "BASTION_PURE_PYTHON"}


def run_cli_rebuild(data: Path, count: int) -> float:
    """One ``bastion index rebuild``: instances per second."""
    started = time.monotonic()
    subprocess.run([BASTION, "index", "rebuild", "--data", str(data)], check=True, env=_env(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return count / (time.monotonic() - started)


def _health(port: int) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as rsp:
            return dict(json.loads(rsp.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))
    except (urllib.error.URLError, OSError, ValueError):
        return None


def run_self_rebuild(data: Path, count: int) -> float:
    """Delete the index, start ``bastion serve``, time its rebuild from "rebuilding" to "ok": instances per second."""
    for name in os.listdir(data):
        if name.startswith(INDEX_FILE):
            os.unlink(data / name)
    http = _free_port()
    args = [BASTION, "serve", "--data", str(data), "--host", "127.0.0.1", "--dicom-port", str(_free_port()),
            "--http-port", str(http), "--workers", "1"]
    with open(data.parent / f"{data.name}-serve.log", "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    try:
        first = None
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"bastion serve exited with {proc.returncode}")
            answer = _health(http)
            now = time.monotonic()
            if answer is not None and answer.get("status") == "rebuilding" and first is None:
                first = now
            if answer is not None and answer.get("status") == "ok" and first is not None:
                return count / (now - first)
            time.sleep(0.02)
        raise SystemExit("the rebuild did not finish within an hour")
    finally:
        proc.terminate()
        proc.wait(60)


def run_online_rebuild(data: Path, count: int) -> tuple[float, float, float]:
    """Start ``bastion serve``, run ``bastion index rebuild`` against it: instances per second, the switch's pause
    as the server measured it, and the longest wait for a ``/health`` answer meanwhile (seconds)."""
    import threading

    http = _free_port()
    args = [BASTION, "serve", "--data", str(data), "--host", "127.0.0.1", "--dicom-port", str(_free_port()),
            "--http-port", str(http), "--workers", "2"]
    with open(data.parent / f"{data.name}-serve.log", "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    longest = [0.0]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            asked = time.monotonic()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/health", timeout=120) as rsp:
                    rsp.read()
            except (urllib.error.URLError, OSError):
                continue
            longest[0] = max(longest[0], time.monotonic() - asked)
            time.sleep(0.02)

    try:
        deadline = time.monotonic() + 60
        while (_health(http) or {}).get("status") != "ok":
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("bastion serve did not start")
            time.sleep(0.05)
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        started = time.monotonic()
        subprocess.run([BASTION, "index", "rebuild", "--data", str(data)], check=True,
                       env=_env() | {"BASTION_HTTP_PORT": str(http)}, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        rate = count / (time.monotonic() - started)
        stop.set()
        poller.join(120)
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/api/index/rebuild", timeout=10) as rsp:
            state = json.loads(rsp.read())
        return rate, float(state["pause_s"]), longest[0]
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--self-rebuild", action="store_true", help="time the rebuild at start too")
    parser.add_argument("--online", action="store_true", help="time the online rebuild of a running server too")
    args = parser.parse_args()
    build(args.data, args.count)
    rates = [run_cli_rebuild(args.data, args.count) for _ in range(args.runs)]
    print(f"bastion index rebuild, {args.count} instances: "
          f"{', '.join(f'{r:.0f}' for r in rates)} instances/s; median {statistics.median(rates):.0f}/s")
    if args.self_rebuild:
        rates = [run_self_rebuild(args.data, args.count) for _ in range(args.runs)]
        print(f"self-rebuild at start, {args.count} instances: "
              f"{', '.join(f'{r:.0f}' for r in rates)} instances/s; median {statistics.median(rates):.0f}/s")
    if args.online:
        runs = [run_online_rebuild(args.data, args.count) for _ in range(args.runs)]
        print(f"online rebuild of a running server, {args.count} instances: "
              f"{', '.join(f'{r:.0f}' for r, _, _ in runs)} instances/s; switch pause "
              f"{', '.join(f'{p:.2f}' for _, p, _ in runs)} s; longest /health wait "
              f"{', '.join(f'{w:.2f}' for _, _, w in runs)} s")


if __name__ == "__main__":
    main()
