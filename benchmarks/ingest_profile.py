"""Where the time of one C-STORE goes: per-stage latency of the ingest path, in process.

Two measurements on the benchmark corpora (``benchmarks/corpus.py``):

1. **Stages** of ``Ingest`` for N objects, without the network (median wall time, and mean CPU of this process): buffering + BLAKE3 digest, header
   scan, duplicate check, blob commit (file written, then made durable: by the blob journal under 128 KB,
   by fdatasync of the file and fsync of its directory from 128 KB), index commit.
2. **DIMSE**: a ``DicomServer`` in this process receives the corpus from DCMTK's ``storescu``
   (TCP_NODELAY=1, one association); prints the median time inside the C-STORE handler and the
   median gap between sending a response and the next command's dataset being complete (the
   client's own work plus receiving the PDUs).

With ``--pg-s3`` the archive is on a fresh PostgreSQL schema and a SeaweedFS bucket (``benchmarks/servers.py``)
instead of SQLite and files.

Usage: ``python benchmarks/ingest_profile.py [--kind small|ct] [--count 300] [--pg-s3] [--only stages|dimse]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402
import servers  # noqa: E402

from bastion.archive import Archive  # noqa: E402
from bastion.dimse import services as dimse_services  # noqa: E402
from bastion.dimse.server import DicomServer  # noqa: E402
from bastion.ingest.header import read_header  # noqa: E402
from bastion.model.records import InstanceRecord, StoredObject, object_key  # noqa: E402
from bastion.settings import load_settings  # noqa: E402


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.2f}"


def process_cpu_s() -> float:
    """This process's CPU time (all its threads: the blob store's and the index's too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def stages(archive: Archive, files: list[Path]) -> None:
    ingest = archive.ingest
    names = ("buffer+digest", "header", "duplicate check", "blob commit", "index commit")
    timings: dict[str, list[float]] = {k: [] for k in names}
    cpu = dict.fromkeys(names, 0.0)
    for path in files:
        data = path.read_bytes()
        marks = [(time.perf_counter(), process_cpu_s())]
        pending = ingest.begin("profile")
        pending.write(data)
        marks.append((time.perf_counter(), process_cpu_s()))
        header = read_header(pending.writer.reader())
        marks.append((time.perf_counter(), process_cpu_s()))
        ingest.index.current(header.sop_uid)
        marks.append((time.perf_counter(), process_cpu_s()))
        stamp = ingest._stamps.next()
        digest = pending.writer.digest
        key = object_key(header.sop_uid, stamp, digest)
        pending.writer.commit(key)
        marks.append((time.perf_counter(), process_cpu_s()))
        record = InstanceRecord(header.sop_uid, header.sop_class_uid, header.series_uid, header.study_uid,
                                header.transfer_syntax, key, digest, pending.writer.size)
        ingest.index.record(StoredObject(record, header.patient_id, stamp, header.attrs))
        marks.append((time.perf_counter(), process_cpu_s()))
        for name, before, after in zip(names, marks, marks[1:], strict=False):
            timings[name].append(after[0] - before[0])
            cpu[name] += after[1] - before[1]
    total = sum(statistics.median(v) for v in timings.values())
    print("ingest stages, median ms: " + ", ".join(f"{k} {ms(v)}" for k, v in timings.items())
          + f"; sum {total * 1000:.2f}")
    print("  this process's CPU, mean ms: " + ", ".join(f"{k} {cpu[k] / len(files) * 1000:.2f}" for k in names)
          + f"; sum {sum(cpu.values()) / len(files) * 1000:.2f}")


async def over_dimse(archive: Archive, directory: Path, count: int) -> None:
    inside: list[float] = []
    gaps: list[float] = []
    last = [0.0]
    original = dimse_services.Services.c_store

    async def timed(self, session, msg):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        if last[0]:
            gaps.append(start - last[0])
        await original(self, session, msg)
        last[0] = time.perf_counter()
        inside.append(last[0] - start)

    dimse_services.Services.c_store = timed  # type: ignore[method-assign]
    server = DicomServer(archive)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    await server.start("127.0.0.1", port)
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "/usr/bin/storescu", "-aec", "BASTION", "127.0.0.1", str(port), "+sd", "+r", str(directory),
        env={**os.environ, "TCP_NODELAY": "1"})
    await proc.wait()
    elapsed = time.perf_counter() - start
    await server.close()
    print(f"over DIMSE ({count} instances, one association): {count / elapsed:.0f} instances/s; median ms "
          f"in the C-STORE handler {ms(inside)}, from response to the next dataset complete {ms(gaps)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="small", choices=sorted(corpus.KINDS))
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=None, help="where the data directories go")
    parser.add_argument("--pg-s3", action="store_true", help="PostgreSQL index and S3 (SeaweedFS) blobs")
    parser.add_argument("--only", choices=("stages", "dimse"), help="make one of the two measurements")
    args = parser.parse_args()
    directory = Path.home() / ".cache" / "bastion-benchmarks" / f"{args.kind}-{args.count}"
    files = corpus.ensure_corpus(args.kind, args.count, directory)
    with contextlib.ExitStack() as stack:
        s3 = stack.enter_context(servers.seaweedfs()) if args.pg_s3 else None
        for run in [args.only] if args.only else ["stages", "dimse"]:
            with contextlib.ExitStack() as per_run:
                env: dict[str, str] = {}
                if s3 is not None:
                    os.environ.update(s3.env)
                    env = {"BASTION_INDEX": per_run.enter_context(servers.pg_schema("bench_profile")),
                           "BASTION_BLOBS": s3.location()}
                tmp = per_run.enter_context(tempfile.TemporaryDirectory(dir=args.workdir))
                archive = Archive.open(load_settings(None, env=env, data=tmp))
                try:
                    if run == "stages":
                        stages(archive, files)
                    else:
                        asyncio.run(over_dimse(archive, directory, len(files)))
                finally:
                    archive.close()


if __name__ == "__main__":
    main()
