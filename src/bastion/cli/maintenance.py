"""``bastion index rebuild`` and ``bastion verify``."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from bastion.archive import exclusive, open_blobs
from bastion.blobs.copies import Copies
from bastion.blobs.healing import check_copies
from bastion.cli.rebuild_online import rebuild_online
from bastion.cli.serve import settings_from
from bastion.errors import BastionError
from bastion.index import Index, log_floor, open_index
from bastion.index.base import rebuild_index
from bastion.ingest.online_rebuild import summary
from bastion.ingest.rebuild import RebuildReport, rebuild, stored_keys
from bastion.ingest.verify import verify
from bastion.reporting.intake import ReportIntake
from bastion.reporting.seal import ReportKey
from bastion.settings import Settings


def _progress(bar: tqdm[Any]) -> Callable[[int], None]:
    """A progress callback that advances ``bar``."""

    def advance(count: int) -> None:
        bar.update(count)

    return advance


def run_rebuild(args: argparse.Namespace) -> int:
    """Rebuild the index from the blob store (:func:`bastion.index.base.rebuild_index`); while a server holds the
    archive, that server is asked to rebuild it online (:func:`bastion.cli.rebuild_online.rebuild_online`)."""
    settings = settings_from(args)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive(settings.data))
        except BastionError:
            return rebuild_online(settings)
        return _rebuild(settings)


def _rebuild(settings: Settings) -> int:
    blobs = open_blobs(settings)
    target = settings.index_location
    total = len(stored_keys(blobs))
    after = log_floor(target)  # the new change log goes on after the old one's

    def build(index: Index) -> RebuildReport:
        with tqdm(total=total, desc="rebuilding index", unit=" objects", file=sys.stderr, disable=None) as bar:
            report = rebuild(blobs, index, _progress(bar), after=after)
        intake = ReportIntake(blobs, index, ReportKey(blobs, settings.report_key_file))
        kept = intake.catch_up()  # reports whose blobs were lost come back from their SRs
        if kept:
            print(f"{kept} report version(s) kept again from their SRs")
        return report

    report = rebuild_index(target, build)
    print(summary(total, report.indexed, report.superseded, len(report.skipped), len(report.warned)))
    for key, reason in report.skipped[:20]:
        print(f"  skipped {key}: {reason}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Re-hash everything; exit 1 if anything is missing or corrupt. With several blob stores every copy in each
    is re-hashed as well (:func:`bastion.blobs.healing.check_copies`) and, with ``--repair``, each missing or corrupt
    copy made again from a good one first."""
    settings = settings_from(args)
    blobs = open_blobs(settings)
    index = open_index(settings.index_location)
    copies_ok = True
    if len(blobs.stores) > 1:
        copies_ok = _verify_copies(blobs, index, repair=bool(getattr(args, "repair", False)))
    elif getattr(args, "repair", False):
        print("one blob store: there is no other copy to repair from (--repair does nothing)")
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
    return 0 if report.ok and copies_ok else 1


def _verify_copies(blobs: Copies, index: Index, *, repair: bool) -> bool:
    """Every copy in every store re-hashed (and repaired); prints the per-store report. True if all are whole."""
    with tqdm(desc="repairing copies" if repair else "checking copies", unit=" copies", file=sys.stderr,
              disable=None) as bar:

        def total(n: int) -> None:
            bar.reset(total=n)

        report = check_copies(blobs, repair=repair, indexed_keys=(v.blob_key for v in index.versions()),
                              is_indexed=index.has_blob, progress=_progress(bar), total=total)
    print(f"copies of {report.objects} object(s) in {len(blobs.stores)} blob stores:")
    for s in report.stores:
        state = f" UNREACHABLE ({s.unreachable})" if s.unreachable else ""
        print(f"  {s.location}: {s.checked} checked, {s.missing} missing, {s.corrupt} corrupt, "
              f"{s.unreadable} unreadable, {s.repaired} repaired{state}")
    for key, location in report.not_repaired[:50]:
        print(f"  {'NOT REPAIRED' if repair else 'WANTING'} {location}: {key}")
    if len(report.not_repaired) > 50:
        print(f"  ... and {len(report.not_repaired) - 50} more")
    print(f"{len(report.lost)} object(s) with no good copy left in any store" + (":" if report.lost else ""))
    for key in report.lost:
        print(f"  LOST {key}")
    if not repair and report.not_repaired:
        print("run `bastion verify --repair` (or let the server's repair do it) to make them again")
    return report.whole
