"""``bastion index rebuild`` and ``bastion verify``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from bastion.archive import exclusive, open_blobs
from bastion.cli.serve import settings_from
from bastion.index import Index, log_floor, open_index
from bastion.index.base import rebuild_index
from bastion.ingest.rebuild import RebuildReport, rebuild, stored_keys
from bastion.ingest.verify import verify
from bastion.settings import Settings


def _progress(bar: tqdm[Any]) -> Callable[[int], None]:
    """A progress callback that advances ``bar``."""

    def advance(count: int) -> None:
        bar.update(count)

    return advance


def run_rebuild(args: argparse.Namespace) -> int:
    """Rebuild the index from the blob store (:func:`bastion.index.base.rebuild_index`); refuses while the archive
    is in use."""
    settings = settings_from(args)
    with exclusive(settings.data):
        return _rebuild(settings)


def _rebuild(settings: Settings) -> int:
    blobs = open_blobs(settings)
    target = settings.index_location
    total = len(stored_keys(blobs))
    after = log_floor(target)  # the new change log goes on after the old one's

    def build(index: Index) -> RebuildReport:
        with tqdm(total=total, desc="rebuilding index", unit=" objects", file=sys.stderr, disable=None) as bar:
            return rebuild(blobs, index, _progress(bar), after=after)

    report = rebuild_index(target, build)
    print(f"index rebuilt from {total} stored object(s): {report.indexed} indexed "
          f"({report.superseded} superseding an older version), {len(report.skipped)} skipped, "
          f"{len(report.warned)} with warnings")
    for key, reason in report.skipped[:20]:
        print(f"  skipped {key}: {reason}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Re-hash everything; exit 1 if anything is missing or corrupt."""
    settings = settings_from(args)
    blobs = open_blobs(settings)
    index = open_index(settings.index_location)
    total = index.statistics()
    with tqdm(total=total.instances + total.versions, desc="verifying", unit=" objects", file=sys.stderr,
              disable=None) as bar:
        report = verify(blobs, index, _progress(bar))
    index.close()
    print(f"verified {report.checked} object(s): {len(report.missing)} missing, {len(report.corrupt)} corrupt, "
          f"{len(report.unindexed)} stored but not indexed")
    for key in report.missing:
        print(f"  MISSING {key}")
    for key in report.corrupt:
        print(f"  CORRUPT {key}")
    for key in report.unindexed[:20]:
        print(f"  not indexed (run `bastion index rebuild`): {key}")
    aside = blobs.set_aside_count()
    if aside:
        print(f"{aside} torn or invalid write(s) that crash recovery set aside (never acknowledged; safe to delete "
              f"once looked at): {getattr(blobs, 'quarantine_dir', blobs.location)}")
    blobs.close()
    return 0 if report.ok else 1
