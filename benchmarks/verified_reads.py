"""What checking a copy's digest on every read costs (issue 22: nothing is served whose digest does not match).

Stores ``--count`` instances of each corpus kind (:mod:`corpus`: ``small`` 64x64, ``ct`` 512x512) in a throw-away
archive with one or two file stores, in this process, then reads every instance whole ``--repeat`` times two
ways, alternating: the retriever's read (:meth:`bastion.query.retrieve.Retriever.read`: the copy hashed against
its key's digest first, as WADO, C-GET and C-MOVE read it) and a bare read of the same file
(:meth:`BlobStore.open`). It prints the median CPU time per instance of each (process CPU time, so the other
processes on a shared machine count less) and the difference; the files are in the page cache throughout, so
this is the hashing's cost, not the disk's.

Usage: ``python benchmarks/verified_reads.py [--count 2000] [--repeat 5] [--stores 1]``
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402

from bastion.archive import Archive  # noqa: E402
from bastion.model.records import InstanceRecord  # noqa: E402
from bastion.settings import load_settings  # noqa: E402


def _stored(archive: Archive, kind: str, count: int) -> list[InstanceRecord]:
    records = []
    for n in range(count):
        buf = io.BytesIO()
        corpus.make_instance(corpus.KINDS[kind], n, count).save_as(buf, enforce_file_format=True)
        records.append(archive.ingest.store_bytes(buf.getvalue(), "benchmark").record)
    return records


def _cpu_per_instance(read: object, records: list[InstanceRecord]) -> float:
    start = time.process_time()
    for record in records:
        read(record)  # type: ignore[operator]
    return (time.process_time() - start) / len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000, help="instances per corpus kind")
    parser.add_argument("--repeat", type=int, default=5, help="passes over every instance, each way")
    parser.add_argument("--stores", type=int, default=1, help="blob stores (a copy in each)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bastion-verified-reads-") as tmp:
        data = Path(tmp) / "data"
        blobs = [str(Path(tmp) / f"store-{n}") for n in range(args.stores)]
        archive = Archive.open(load_settings(None, env={}, data=data, blobs=blobs))
        try:
            print(f"{'corpus':8} {'bytes/instance':>15} {'bare read us':>13} {'verified us':>12} {'hash cost us':>13}"
                  f" {'verified MB/s':>14}")
            for kind in corpus.KINDS:
                records = _stored(archive, kind, args.count)

                def bare(record: InstanceRecord) -> bytes:
                    return archive.blobs.get(record.blob_key)

                bares, verifieds = [], []
                for _ in range(args.repeat):
                    bares.append(_cpu_per_instance(bare, records))
                    verifieds.append(_cpu_per_instance(archive.retriever.read, records))
                size = statistics.mean(r.size for r in records)
                b, v = statistics.median(bares) * 1e6, statistics.median(verifieds) * 1e6
                print(f"{kind:8} {size:15,.0f} {b:13.1f} {v:12.1f} {v - b:13.1f} {size / v:14.0f}")
        finally:
            archive.close()


if __name__ == "__main__":
    main()
