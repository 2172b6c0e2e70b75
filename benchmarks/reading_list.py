"""The reading list: ``GET /api/reports`` median latency over 10,000 reports (target: at most 100 ms), and with
``--studies-too`` the reading list page's ``GET /api/reading-list`` over as many studies.

A data directory gets one report for each of ``--studies`` studies (a third each draft, preliminary and final),
written in process through :class:`bastion.reporting.store.ReportStore` as the API writes them (each version a
write-once object in the blob store, then the index's ``reports`` row); the studies' images are not stored (the
reading list reads the ``reports`` table alone). A ``bastion serve`` then answers ``GET /api/reports`` with the
default page (100), filtered by state, by modality and date range, and by a text search (a full scan of the
table's search text), over one kept-alive httpx connection. Medians and 95th percentiles are printed.

``--studies-too`` also stores one small CT instance per study (through the ingest, in process), so that the
index holds the studies, and times ``GET /api/reading-list`` (default page of 50; a report state; modality and
date; text; ``state=unreported``, which no study is in here: the worst case, every study read).

Usage: ``.venv/bin/python benchmarks/reading_list.py [--studies 10000] [--requests 300] [--data DIR]
[--index postgresql://...] [--studies-too] [--json]``
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import corpus
import httpx
import servers

from bastion.archive import Archive
from bastion.index.reports import ReportQuery
from bastion.model.levels import QueryLevel
from bastion.reporting import report as rpt
from bastion.reporting.store import ReportStore
from bastion.reporting.templates import load_templates
from bastion.settings import load_settings

MODALITIES = ("CT", "MR", "CR", "US")


def store_studies(archive: Archive, studies: int) -> None:
    """Store one small CT instance for each study :func:`fill` reports on (the same UID, patient, date)."""
    kind = corpus.KINDS["small"]
    for n in range(studies):
        ds = corpus.make_instance(kind, n, studies)
        ds.StudyInstanceUID = f"2.25.{10**20 + n}"
        ds.SeriesInstanceUID = f"{ds.StudyInstanceUID}.1"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.StudyInstanceUID}.1.1"
        ds.PatientID, ds.PatientName, ds.AccessionNumber = f"RL{n:06d}", f"Reading^Patient{n:06d}", f"ACC{n:07d}"
        ds.Modality = MODALITIES[n % len(MODALITIES)]
        ds.StudyDate = f"2026{1 + n % 12:02d}{1 + n % 28:02d}"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        archive.ingest.store_bytes(buffer.getvalue(), "benchmark")


def fill(data: Path, studies: int, index: str | None, with_studies: bool = False) -> float:
    """Write one report per study (and store the studies, ``with_studies``); the seconds it took."""
    archive = Archive.open(load_settings(env={}, data=str(data), index=index))
    try:
        if with_studies and not archive.index.find(QueryLevel.STUDY, [], limit=1):
            store_studies(archive, studies)
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


def timed(client: httpx.Client, path: str, params: dict[str, str], requests: int, key: str = "reports"
          ) -> dict[str, float]:
    times = []
    for _ in range(requests):
        began = time.perf_counter()
        rsp = client.get(path, params=params)
        times.append((time.perf_counter() - began) * 1000)
        assert rsp.status_code == 200, rsp.text
    times.sort()
    return {"median_ms": round(statistics.median(times), 2), "p95_ms": round(times[int(len(times) * 0.95) - 1], 2),
            "results": len(rsp.json()[key])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--data", type=Path, help="keep the archive here (reused when run again)")
    parser.add_argument("--index", help="a PostgreSQL index (postgresql://...; its schema must exist)")
    parser.add_argument("--studies-too", action="store_true", help="also store the studies; time /api/reading-list")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp) / "data"
        seconds = fill(data, args.studies, args.index, args.studies_too)
        with servers.bastion(["--workers", "1", "--log-level", "WARNING", *(["--index", args.index] if args.index else [])],
                             data=data, name="bastion-reading-list") as server:
            cases = {"default page (100)": {}, "state=final": {"state": "final"},
                     "modality=CT, from/to one month": {"modality": "CT", "from": "2026-05-01", "to": "2026-05-31"},
                     "q=patient00123 (text search)": {"q": "patient00123"}}
            with httpx.Client(base_url=server.base_url, timeout=30) as client:
                for params in cases.values():
                    timed(client, "/api/reports", params, 10)  # warm up
                results = {name: timed(client, "/api/reports", params, args.requests)
                           for name, params in cases.items()}
                if args.studies_too:
                    listing = {"reading list, default page (50)": {}, "reading list, state=final": {"state": "final"},
                               "reading list, modality=CT, one month": {"modality": "CT", "from": "2026-05-01",
                                                                        "to": "2026-05-31"},
                               "reading list, q=patient00123": {"q": "patient00123"},
                               "reading list, state=unreported (none)": {"state": "unreported"}}
                    for name, params in listing.items():
                        timed(client, "/api/reading-list", params, 3, "studies")  # warm up
                        results[name] = timed(client, "/api/reading-list", params,
                                              args.requests if "unreported" not in name else 10, "studies")
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
