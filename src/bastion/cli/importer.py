"""``bastion import``: files, folders and zip archives through the one ingest path."""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from tqdm import tqdm

from bastion.archive import Archive
from bastion.audit import AuditEvent, AuditKind, StoreTally
from bastion.audit.events import local_user
from bastion.cli.serve import settings_from
from bastion.errors import BastionError
from bastion.ingest import Ingest
from bastion.model.records import StoreResult


def _sources(paths: list[str]) -> Iterator[tuple[str, bytes | str]]:
    """(display name, file path or bytes) for every candidate object under ``paths``."""
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield from _file(os.path.join(root, name))
        elif os.path.exists(path):
            yield from _file(path)
        else:
            yield path, b""


def _file(path: str) -> Iterator[tuple[str, bytes | str]]:
    if zipfile.is_zipfile(path) and not path.lower().endswith(".dcm"):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield f"{path}:{info.filename}", zf.read(info)
    else:
        yield path, path


def _store(ingest: Ingest, source: bytes | str) -> StoreResult:
    if isinstance(source, str):
        with open(source, "rb") as fh:
            source = fh.read()
    if not source:
        raise BastionError("no such file or empty file")
    # Imports are often run again over folders stored already: asking the index first costs a read, where
    # writing and removing each file again would cost a file created and deleted.
    return ingest.store_bytes(source, "import", lookup_first=True)


def run_import(args: argparse.Namespace) -> int:
    """Entry point of ``bastion import``."""
    archive = Archive.open(settings_from(args))
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    examples: dict[str, str] = {}
    bar = tqdm(desc="importing", unit=" files", file=sys.stderr, disable=None)
    tally = StoreTally()  # audited once per study at the end of the run
    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            running: dict[Future[StoreResult], str] = {}

            def collect(done: set[Future[StoreResult]]) -> None:
                for fut in done:
                    name = running.pop(fut)
                    try:
                        result = fut.result()
                        counts[result.status.value] += 1
                        tally.stored(result.record.study_uid, result.patient_id)
                    except BastionError as exc:
                        counts["rejected"] += 1
                        reasons[exc.message] += 1
                        examples.setdefault(exc.message, name)
                        tally.failed(exc.message)
                    except OSError as exc:
                        tally.failed(f"cannot read: {exc.strerror}")
                        counts["rejected"] += 1
                        reasons[f"cannot read: {exc.strerror}"] += 1
                        examples.setdefault(f"cannot read: {exc.strerror}", name)
                    bar.update(1)

            for name, source in _sources(args.paths):
                running[pool.submit(_store, archive.ingest, source)] = name
                if len(running) >= 4 * args.jobs:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    collect(done)
            collect(wait(running).done)
    finally:
        bar.close()
        for event in tally.events(AuditEvent(AuditKind.STORE, user=local_user(), via="cli")):
            archive.audit.record(event)
        archive.close()
    total = sum(counts.values())
    print(f"{total} file(s): {counts['stored']} stored, {counts['duplicate']} duplicate, "
          f"{counts['superseded']} superseded, {counts['rejected']} rejected")
    for reason, n in reasons.most_common():
        print(f"  rejected {n}: {reason} (e.g. {examples[reason]})")
    return 1 if counts["rejected"] else 0
