"""The S3 store's two clients side by side: ``S3BlobStore`` putting and reading small objects through obstore (the
default, ``bastion.blobs.s3fast``) and through boto3 (``fast=False``), against one SeaweedFS on loopback.

For each client, rounds alternating: ``--count`` objects of ``--size`` bytes committed one after another (as one
association stores them), then each read back whole through ``open`` (as retrieval and the metadata warmer read
them). Printed per operation: this process's CPU (user + system, the client's cost), SeaweedFS's CPU (what the
requests cost the server) and the wall-clock time, medians over the rounds.

Usage: ``.venv/bin/python benchmarks/s3_client.py [--count 500] [--size 9000] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable
from functools import partial

import servers

from bastion.blobs.s3 import S3BlobStore


def _own_cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


def _put(store: S3BlobStore, keys: list[str], data: list[bytes]) -> None:
    """Commit each object under its key, one after another (as one association stores them)."""
    for key, blob in zip(keys, data, strict=True):
        writer = store.writer()
        writer.write(blob)
        writer.commit(key)


def _read(store: S3BlobStore, keys: list[str]) -> None:
    for key in keys:
        with store.open(key) as fh:
            fh.read()


def _measure(fn: Callable[[], None], weed_pgid: int, count: int) -> tuple[float, float, float]:
    """(client CPU ms, SeaweedFS CPU ms, wall ms) per operation of ``fn()``, which does ``count`` operations."""
    cpu, weed, wall = _own_cpu(), servers.group_cpu_s(weed_pgid), time.perf_counter()
    fn()
    return ((_own_cpu() - cpu) * 1000 / count, (servers.group_cpu_s(weed_pgid) - weed) * 1000 / count,
            (time.perf_counter() - wall) * 1000 / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--size", type=int, default=9000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    data = [os.urandom(args.size) for _ in range(args.count)]
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    with servers.seaweedfs() as s3:
        for round_ in range(args.rounds):
            for name, fast in (("obstore", True), ("boto3", False)):
                store = S3BlobStore(s3.bucket, f"bench-{round_}-{name}", endpoint=s3.endpoint, region="us-east-1",
                                    credentials=(s3.access_key, s3.secret_key), fast=fast)
                keys = [f"o/{i:06d}.dcm" for i in range(args.count)]
                put, read = partial(_put, store, keys, data), partial(_read, store, keys)
                results.setdefault((name, "put"), []).append(_measure(put, s3.pgid, args.count))
                results.setdefault((name, "read"), []).append(_measure(read, s3.pgid, args.count))
                store.close()
    print(f"{args.count} objects of {args.size} bytes, {args.rounds} rounds; per operation, medians:")
    print(f"{'client':8} {'op':5} {'client CPU ms':>14} {'SeaweedFS CPU ms':>17} {'wall ms':>8}")
    for (name, op), runs in results.items():
        cpu, weed, wall = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"{name:8} {op:5} {cpu:14.3f} {weed:17.3f} {wall:8.3f}")


if __name__ == "__main__":
    main()
