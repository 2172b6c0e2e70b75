"""What making one object durable costs: the blob store's journal against fsync of file and directory.

Commits ``--count`` objects of each ``--sizes`` through :class:`bastion.blobs.filesystem.FileBlobStore`,
once with its write-ahead journal (the default) and once without (``journal=False``: write a spool file,
write the file in place and ``fdatasync`` it, with ``O_DIRECT`` where allowed, then fsync the directory),
interleaved so both see the same machine. A pause between commits (``--gap-ms``, default 1 ms, about what a DICOM
client takes to send the next object) lets the background threads (commit, checkpoint) work as they do under a
real association. Prints the median
and 90th percentile of ``commit`` in milliseconds, and the raw syscall costs the design rests on.

Usage: ``python benchmarks/blob_commit.py [--count 500] [--sizes 8500,530000] [--workdir /tmp]``
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import tempfile
import time
from pathlib import Path

from bastion.blobs.filesystem import FileBlobStore


def commit_times(root: Path, size: int, count: int, journal: bool, gap_s: float) -> list[float]:
    store = FileBlobStore(str(root), journal=journal)
    data = bytearray(os.urandom(size))
    times = []
    try:
        for i in range(count):
            data[:8] = i.to_bytes(8, "little")
            start = time.perf_counter()
            w = store.writer()
            w.write(data)
            w.commit(f"2026/01/01/00/obj-{i}.dcm")
            times.append((time.perf_counter() - start) * 1000)
            time.sleep(gap_s)
    finally:
        store.close()
    return times


def durable_in_place(path: Path, data: bytes, area: mmap.mmap | None) -> None:
    """Create ``path`` holding ``data`` and make it durable: through the page cache, or with ``O_DIRECT`` from
    the page-aligned ``area`` (padded to whole pages, then cut to length) as the blob store does from 128 KB."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if area is not None else 0), 0o600)
    try:
        if area is None:
            os.write(fd, data)
        else:
            padded = -(-len(data) // mmap.PAGESIZE) * mmap.PAGESIZE
            area[:len(data)] = data
            area[len(data):padded] = bytes(padded - len(data))
            with memoryview(area) as view:
                os.write(fd, view[:padded])
            os.ftruncate(fd, len(data))
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)


def syscall_costs(directory: Path, size: int, count: int = 200) -> dict[str, float]:
    """Median ms of: a new file made durable (fsync, rename, fsync dir); the same in place through the page cache
    and with O_DIRECT (fdatasync, fsync dir); a write into a preallocated file made durable (fdatasync);
    creating an empty file."""
    data = os.urandom(size)
    new, prealloc, create, buffered, direct = [], [], [], [], []
    area = mmap.mmap(-1, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
    for i in range(count):  # interleaved: the machine drifts
        for name, times, via in ((f"b{i}", buffered, None), (f"d{i}", direct, area)):
            t = time.perf_counter()
            durable_in_place(directory / name, data, via)
            times.append(time.perf_counter() - t)
    seg = os.open(directory / "segment", os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(seg, bytes(size * count), 0)
    os.fsync(seg)
    for i in range(count):
        t = time.perf_counter()
        fd = os.open(directory / f"tmp{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        create.append(time.perf_counter() - t)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.rename(directory / f"tmp{i}", directory / f"obj{i}")
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
        new.append(time.perf_counter() - t)
        t = time.perf_counter()
        os.pwrite(seg, data, i * size)
        os.fdatasync(seg)
        prealloc.append(time.perf_counter() - t)
    os.close(seg)
    return {name: statistics.median(v) * 1000 for name, v in
            (("new file: create+write+fsync+rename+fsync dir", new),
             ("new file in place, page cache: create+write+fdatasync+fsync dir", buffered),
             ("new file in place, O_DIRECT: create+write+ftruncate+fdatasync+fsync dir", direct),
             ("preallocated file: pwrite+fdatasync", prealloc), ("create an empty file", create))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--sizes", default="8500,530000", help="object sizes in bytes, comma-separated")
    parser.add_argument("--gap-ms", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, help="where the temporary stores go (default: the system's)")
    args = parser.parse_args()
    print(f"{'size':>8}  {'path':<26} {'median ms':>9} {'p90 ms':>7}")
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            results = {}
            for journal in (True, False, True, False):  # interleaved: the machine drifts
                name = "journal (default)" if journal else "fsync file + directory"
                results.setdefault(name, []).extend(
                    commit_times(Path(tmp) / f"{name[:7]}-{len(results.get(name, []))}", size, args.count // 2,
                                 journal, args.gap_ms / 1000))
            for name, times in results.items():
                times.sort()
                print(f"{size:>8}  {name:<26} {statistics.median(times):9.2f} {times[int(0.9 * len(times))]:7.2f}")
            raw = Path(tmp) / "raw"
            raw.mkdir()
            for what, ms in syscall_costs(raw, size).items():
                print(f"{size:>8}    {what}: {ms:.2f} ms")


if __name__ == "__main__":
    main()
