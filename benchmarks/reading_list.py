"""The reading list: ``GET /api/reports`` median latency over 10,000 reports (target: at most 100 ms).

A data directory gets one report for each of ``--studies`` studies (a third each draft, preliminary and final),
written in process through :class:`bastion.reporting.store.ReportStore` as the API writes them (each version a
write-once object in the blob store, then the index's ``reports`` row); the studies' images are not stored (the
reading list reads the ``reports`` table alone). A ``bastion serve`` then answers ``GET /api/reports`` with the
default page (100), filtered by state, by modality and date range, and by a text search (a full scan of the
table's search text), over one kept-alive httpx connection. Medians and 95th percentiles are printed.

Usage: ``.venv/bin/python benchmarks/reading_list.py [--studies 10000] [--requests 300] [--data DIR]
[--index postgresql://...] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bastion.archive import Archive
from bastion.index.reports import ReportQuery
from bastion.reporting import report as rpt
from bastion.reporting.store import ReportStore
from bastion.reporting.templates import load_templates
from bastion.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
BASTION = str(ROOT / ".venv" / "bin" / "bastion")
MODALITIES = ("CT", "MR", "CR", "US")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fill(data: Path, studies: int, index: str | None) -> float:
    """Write one report per study; the seconds it took."""
    archive = Archive.open(load_settings(env={}, data=str(data), index=index))
    try:
        store = ReportStore(archive.blobs, archive.index)
        have = len(store.search(ReportQuery(limit=studies)))
        templates = load_templates()
        head = templates["ct-head"]
        began = time.perf_counter()
        for n in range(have, studies):
            study = {"study": f"2.25.{10**20 + n}", "patient_id": f"RL{n:06d}",
                     "patient_name": f"Reading^Patient{n:06d}", "accession": f"ACC{n:07d}",
                     "modality": MODALITIES[n % len(MODALITIES)], "study_date": f"2026{1 + n % 12:02d}{1 + n % 28:02d}"}
            doc = store.create(study, head, "dr.bench")
            if n % 3:
                doc = store.change(doc["id"], lambda d, n=n: rpt.edited(d, {"findings": f"finding {n}"}, 1,
                                                                         "dr.bench", "preliminary"))
            if n % 3 == 2:
                store.change(doc["id"], lambda d, n=n: rpt.signed(d, "dr.bench", rpt.now_iso(), f"2.25.{n}"))
        return time.perf_counter() - began
    finally:
        archive.close()


def serve(data: Path, index: str | None) -> tuple[subprocess.Popen[bytes], str]:
    http = free_port()
    argv = [BASTION, "serve", "--data", str(data), "--host", "127.0.0.1", "--dicom-port", str(free_port()),
            "--http-port", str(http), "--workers", "1", "--log-level", "WARNING", *(["--index", index] if index else [])]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{http}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit("bastion serve did not start")


def timed(client: httpx.Client, path: str, params: dict[str, str], requests: int) -> dict[str, float]:
    times = []
    for _ in range(requests):
        began = time.perf_counter()
        rsp = client.get(path, params=params)
        times.append((time.perf_counter() - began) * 1000)
        assert rsp.status_code == 200, rsp.text
    times.sort()
    return {"median_ms": round(statistics.median(times), 2), "p95_ms": round(times[int(len(times) * 0.95) - 1], 2),
            "results": len(rsp.json()["reports"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--data", type=Path, help="keep the archive here (reused when run again)")
    parser.add_argument("--index", help="a PostgreSQL index (postgresql://...; its schema must exist)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp) / "data"
        seconds = fill(data, args.studies, args.index)
        proc, url = serve(data, args.index)
        try:
            cases = {"default page (100)": {}, "state=final": {"state": "final"},
                     "modality=CT, from/to one month": {"modality": "CT", "from": "2026-05-01", "to": "2026-05-31"},
                     "q=patient00123 (text search)": {"q": "patient00123"}}
            with httpx.Client(base_url=url, timeout=30) as client:
                for params in cases.values():
                    timed(client, "/api/reports", params, 10)  # warm up
                results = {name: timed(client, "/api/reports", params, args.requests)
                           for name, params in cases.items()}
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    report = {"studies": args.studies, "fill_seconds": round(seconds, 1), "requests": args.requests,
              "cases": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.studies} reports written in {seconds:.1f} s; GET /api/reports, {args.requests} requests each:")
    for name, r in results.items():
        print(f"  {name:34} median {r['median_ms']:7.2f} ms  p95 {r['p95_ms']:7.2f} ms  ({r['results']} results)")


if __name__ == "__main__":
    main()
