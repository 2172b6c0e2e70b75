"""DICOMweb benchmark: QIDO-RS latency, series metadata and WADO-RS throughput, Bastion and Orthanc.

A benchmark, not a timed test: it prints figures and checks only that every answer is a success with the
expected number of results.

* **QIDO-RS**: a fixed query set (all studies limit 100; PatientName wildcard; StudyDate range;
  ModalitiesInStudy; PatientID; series of a study; instances of a series), each repeated ``--repeat`` times
  over one keep-alive connection after 3 warm-up requests: median and p95 latency.
* **Series metadata** (``/studies/{st}/series/{se}/metadata``) of the 1,000-instance 512x512 CT series:
  the first request (for Bastion after the background warmer has caught up with the change log, and the
  seconds it needed), then the median of 5 warm requests. ``--data`` runs also time the cold build in
  process (no cache at all: every file parsed).
* **WADO-RS** whole-study retrieval of that study (``Accept: multipart/related; type="application/dicom";
  transfer-syntax=*``): median MB/s over 5 downloads.

Two modes, both from the deterministic plan of :mod:`bulkload`:

* ``--data DIR --count N``: Bastion alone on a directory filled by ``bulkload.py --data DIR --count N``.
* ``--side-by-side N``: writes the plan's N small files plus the showcase series (cached under ``--corpus``),
  uploads them with DCMTK ``storescu`` (``TCP_NODELAY=1``) to a fresh Orthanc with its DICOMweb plugin and to
  a fresh Bastion, and runs the same measurements on both.

Usage::

    python benchmarks/bulkload.py --data /tmp/bastion-1m --count 1000000
    python benchmarks/dicomweb.py --data /tmp/bastion-1m --count 1000000
    python benchmarks/dicomweb.py --side-by-side 22000 --corpus /tmp/corpus-22k
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bulkload  # noqa: E402
import servers  # noqa: E402

STORESCU = "/usr/bin/storescu"
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
JSON_ACCEPT = "application/dicom+json"


@dataclass
class QueryFigure:
    """Latency of one query on one server."""

    name: str
    path: str
    results: int = 0
    median_ms: float = float("nan")
    p95_ms: float = float("nan")


@dataclass
class ServerFigures:
    """Everything measured on one server."""

    server: str
    instances: int
    queries: list[QueryFigure] = field(default_factory=list)
    metadata_first_ms: float = float("nan")
    metadata_warm_ms: float = float("nan")
    metadata_cold_build_ms: float = float("nan")
    warmer_wait_s: float = float("nan")
    wado_mb_s: float = float("nan")
    wado_mb: float = float("nan")
    load_s: float = float("nan")
    notes: list[str] = field(default_factory=list)


def query_set(studies: list[bulkload.Study]) -> list[tuple[str, str, int | None]]:
    """The fixed queries (name, path, expected result count or None) for a plan."""
    middle = studies[len(studies) // 2]
    series = max(middle.series, key=lambda s: s.count)
    pid = middle.patient.id
    n_pid = sum(1 for s in studies if s.patient.id == pid)
    return [
        ("all studies, limit 100", "/studies?limit=100", 100),
        ("PatientName=SMITH*", "/studies?PatientName=SMITH*&limit=100", None),
        ("StudyDate range (6 months)", "/studies?StudyDate=20200101-20200630&limit=100", None),
        ("ModalitiesInStudy=MR", "/studies?ModalitiesInStudy=MR&limit=100", 100),
        ("PatientID", f"/studies?PatientID={pid}", n_pid),
        ("series of a study", f"/studies/{middle.uid}/series", len(middle.series)),
        ("instances of a series", f"/studies/{middle.uid}/series/{series.uid}/instances", series.count),
    ]


def time_query(client: httpx.Client, url: str, repeat: int) -> tuple[list[float], int]:
    """Latencies in ms of ``repeat`` GETs (after 3 warm-ups) and the result count."""
    count = 0
    for _ in range(3):
        r = client.get(url, headers={"Accept": JSON_ACCEPT})
        if r.status_code != 200:
            raise RuntimeError(f"GET {url} answered {r.status_code}: {r.text[:300]}")
        count = len(r.json())
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = client.get(url, headers={"Accept": JSON_ACCEPT})
        r.read()
        times.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            raise RuntimeError(f"GET {url} answered {r.status_code}")
    return times, count


def p95(values: list[float]) -> float:
    """The 95th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * len(ordered))) - 1)]


def run_queries(fig: ServerFigures, client: httpx.Client, root: str, studies: list[bulkload.Study],
                repeat: int) -> None:
    """Measure the query set into ``fig``."""
    for name, path, expected in query_set(studies):
        times, count = time_query(client, root + path, repeat)
        q = QueryFigure(name, path, count, statistics.median(times), p95(times))
        if expected is not None and count != expected:
            fig.notes.append(f"{name}: {count} results, expected {expected}")
        fig.queries.append(q)
        print(f"  {fig.server:8s} {name:30s} {q.median_ms:8.1f} ms median {q.p95_ms:8.1f} p95  ({count} results)",
              flush=True)


def wait_for_warmer(data: Path, instances: int, timeout_s: float = 600) -> float:
    """Seconds until Bastion's metadata cache holds ``instances`` entries (the background warmer caught up)."""
    t0 = time.monotonic()
    cache = data / "cache" / "metadata"
    while time.monotonic() - t0 < timeout_s:
        n = sum(len(files) for _, _, files in os.walk(cache)) if cache.exists() else 0
        if n >= instances:
            return time.monotonic() - t0
        time.sleep(0.2)
    return float("nan")


def run_metadata_and_wado(fig: ServerFigures, client: httpx.Client, root: str, showcase: bulkload.Study,
                          data: Path | None) -> None:
    """Series metadata (first and warm) and WADO-RS whole-study throughput into ``fig``."""
    series = showcase.series[0]
    url = f"{root}/studies/{showcase.uid}/series/{series.uid}/metadata"
    if data is not None:
        fig.warmer_wait_s = wait_for_warmer(data, series.count)
    t0 = time.perf_counter()
    r = client.get(url, headers={"Accept": JSON_ACCEPT}, timeout=600)
    fig.metadata_first_ms = (time.perf_counter() - t0) * 1000
    if r.status_code != 200 or len(r.json()) != series.count:
        fig.notes.append(f"metadata: {r.status_code}, {len(r.content)} bytes")
    warm = []
    for _ in range(5):
        t0 = time.perf_counter()
        client.get(url, headers={"Accept": JSON_ACCEPT}).read()
        warm.append((time.perf_counter() - t0) * 1000)
    fig.metadata_warm_ms = statistics.median(warm)
    print(f"  {fig.server:8s} series metadata ({series.count}): first {fig.metadata_first_ms:.0f} ms "
          f"(warmer wait {fig.warmer_wait_s:.1f} s), warm {fig.metadata_warm_ms:.0f} ms", flush=True)
    rates, size = [], 0
    for _ in range(5):
        t0 = time.perf_counter()
        size = 0
        with client.stream("GET", f"{root}/studies/{showcase.uid}", headers={"Accept": WADO_ACCEPT},
                           timeout=600) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"WADO-RS answered {resp.status_code}: {resp.read()[:300]!r}")
            for chunk in resp.iter_raw(1 << 20):
                size += len(chunk)
        rates.append(size / 1e6 / (time.perf_counter() - t0))
    fig.wado_mb_s, fig.wado_mb = statistics.median(rates), size / 1e6
    print(f"  {fig.server:8s} WADO-RS study: {fig.wado_mb:.0f} MB at {fig.wado_mb_s:.0f} MB/s (median of 5)",
          flush=True)


def cold_build_ms(data: Path, showcase: bulkload.Study) -> float:
    """Build the showcase series' metadata in process with no cache at all (every file parsed)."""
    from bastion.archive import Archive
    from bastion.dicomweb.metadata import MetadataCache
    from bastion.settings import load_settings

    archive = Archive.open(load_settings(None, data=str(data)), primary=False)
    try:
        records = archive.index.instances(*_series_query(showcase))
        with tempfile.TemporaryDirectory() as tmp:
            cache = MetadataCache(archive.retriever, Path(tmp))
            t0 = time.perf_counter()
            cache.response_text(records, "http://x/dicom-web")
            return (time.perf_counter() - t0) * 1000
    finally:
        archive.close()


def _series_query(showcase: bulkload.Study) -> tuple[Any, list[Any]]:
    from bastion.model.levels import QueryLevel
    from bastion.model.matching import parse_condition

    series = showcase.series[0]
    return QueryLevel.SERIES, [parse_condition("SeriesInstanceUID", 0x0020000E, "UI", series.uid)]


def measure(fig: ServerFigures, server: servers.Server, studies: list[bulkload.Study], repeat: int,
            data: Path | None, showcase: bulkload.Study) -> None:
    """Run every measurement against a running server."""
    root = server.base_url + "/dicom-web"
    with httpx.Client(timeout=60) as client:
        run_queries(fig, client, root, studies, repeat)
        run_metadata_and_wado(fig, client, root, showcase, data)


def storescu(server: servers.Server, directory: Path) -> float:
    """Send every file under ``directory`` over one association; seconds taken."""
    t0 = time.monotonic()
    subprocess.run([STORESCU, "-aet", "BENCHSCU", "-aec", server.aet, "+sd", "+r", "-nh", "127.0.0.1",
                    str(server.dicom_port), str(directory)], check=True, env={**os.environ, "TCP_NODELAY": "1"},
                   stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def side_by_side(count: int, corpus: Path, repeat: int, showcase_n: int) -> list[ServerFigures]:
    """Upload the same files to Orthanc (DICOMweb plugin) and Bastion and measure both."""
    studies = bulkload.plan(count)
    showcase = bulkload.showcase(showcase_n)
    if not (corpus / "COMPLETE").exists():
        print(f"writing {count:,} + {showcase_n} files under {corpus} ...", flush=True)
        bulkload.write_files(corpus, studies, showcase_n)
    out = []
    for name in ("orthanc", "bastion"):
        ctx = servers.orthanc(dicomweb=True) if name == "orthanc" else servers.bastion()
        with ctx as server:
            fig = ServerFigures(name, count + showcase_n)
            fig.load_s = storescu(server, corpus / "plan") + storescu(server, corpus / "showcase")
            print(f"  {name:8s} loaded {count + showcase_n:,} instances in {fig.load_s:.0f} s", flush=True)
            data = server.workdir / "data" if name == "bastion" else None
            measure(fig, server, studies, repeat, data, showcase)
            out.append(fig)
    return out


def bastion_on(data: Path, count: int, repeat: int, showcase_n: int) -> ServerFigures:
    """Bastion alone on a bulk-loaded data directory."""
    studies = bulkload.plan(count)
    showcase = bulkload.showcase(showcase_n)
    fig = ServerFigures("bastion", count + showcase_n)
    fig.metadata_cold_build_ms = cold_build_ms(data, showcase)
    print(f"  cold metadata build in process (no cache): {fig.metadata_cold_build_ms:.0f} ms", flush=True)
    with servers.bastion(extra_args=["--data", str(data)]) as server:
        measure(fig, server, studies, repeat, data, showcase)
    return fig


def table(columns: list[tuple[str, ServerFigures]]) -> str:
    """A Markdown table of medians, one column per (label, figures); the ratio of the last two if two+."""
    heads = [label for label, _ in columns]
    ratio = len(columns) >= 2 and columns[-2][1].server == "orthanc"
    lines = ["| measurement | " + " | ".join(heads) + (" | Orthanc / Bastion |" if ratio else " |"),
             "|---|" + "---:|" * (len(heads) + int(ratio))]
    names = [q.name for q in columns[0][1].queries]
    for i, name in enumerate(names):
        vals = [f[1].queries[i] for f in columns]
        row = f"| QIDO {name} (median / p95 ms) | " + " | ".join(f"{q.median_ms:.1f} / {q.p95_ms:.1f}" for q in vals)
        if ratio:
            row += f" | {vals[-2].median_ms / vals[-1].median_ms:.1f}x"
        lines.append(row + " |")

    def add(label: str, attr: str, fmt: str, higher_better: bool = False) -> None:
        vals = [getattr(f, attr) for _, f in columns]
        row = f"| {label} | " + " | ".join(fmt.format(v) for v in vals)
        if ratio:
            a, b = vals[-2], vals[-1]
            row += f" | {(b / a if higher_better else a / b):.1f}x" if a == a and b == b and a and b else " | "
        lines.append(row + " |")

    add("series metadata, 1,000 instances: first request (ms)", "metadata_first_ms", "{:.0f}")
    add("series metadata, 1,000 instances: warm (ms)", "metadata_warm_ms", "{:.0f}")
    add("WADO-RS whole study (MB/s)", "wado_mb_s", "{:.0f}", higher_better=True)
    return "\n".join(lines)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a directory filled by bulkload.py --data (Bastion alone)")
    parser.add_argument("--count", type=int, default=1_000_000, help="the --count given to bulkload.py")
    parser.add_argument("--side-by-side", type=int, metavar="N", help="Orthanc and Bastion on N uploaded instances")
    parser.add_argument("--corpus", type=Path, default=Path(tempfile.gettempdir()) / "bastion-dicomweb-corpus",
                        help="where the side-by-side files are written (reused when complete)")
    parser.add_argument("--showcase", type=int, default=1000, help="instances in the CT series (default 1000)")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    if not args.data and not args.side_by_side:
        parser.error("give --data DIR and/or --side-by-side N")
    columns: list[tuple[str, ServerFigures]] = []
    if args.data:
        print(f"Bastion on {args.data} ({args.count:,} planned instances)", flush=True)
        columns.append((f"Bastion @ {args.count + args.showcase:,}", bastion_on(args.data, args.count,
                                                                              args.repeat, args.showcase)))
    if args.side_by_side:
        print(f"side by side at {args.side_by_side:,} instances", flush=True)
        figs = side_by_side(args.side_by_side, args.corpus, args.repeat, args.showcase)
        columns += [(f"{f.server.capitalize()} @ {f.instances:,}", f) for f in figs]
    print()
    print(table(columns))
    for label, fig in columns:
        for note in fig.notes:
            print(f"note ({label}): {note}")
    if args.json:
        args.json.write_text(json.dumps([{"label": label, **asdict(fig)} for label, fig in columns], indent=2))


if __name__ == "__main__":
    main()
