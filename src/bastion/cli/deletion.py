"""``bastion purge`` and ``bastion undelete``: the end of a deleted study's life, and its way back
(:mod:`bastion.ingest.deletion`, docs/deletion.md).

Purging is a command of the host, never a request over the network: removing bytes for good needs a shell on a
node, not only a stolen credential. Both may run while the server runs (the index and the state log are shared).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from datetime import UTC, datetime

from tqdm import tqdm

from bastion.archive import Archive
from bastion.audit import AuditEvent, AuditKind
from bastion.cli.serve import settings_from
from bastion.errors import BastionError
from bastion.ingest.deletion import Tombstone


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: object) -> None:
    """``bastion purge`` and ``bastion undelete``; ``common`` adds the options every command takes."""
    purge = sub.add_parser("purge", help="remove for good the bytes of studies deleted more than "
                           "deletion_delay_days ago",
                           description="Remove every copy of every version of the instances of each deleted study "
                           "whose tombstone is older than deletion_delay_days (default 30), from every blob store, and "
                           "record a 'deleted' change per instance. A purged study cannot be undeleted. Exit status 1 "
                           "if --study names a study that is not deleted or is still inside the delay.")
    common(purge)  # type: ignore[operator]
    purge.add_argument("--study", metavar="UID", help="purge only this study (refused inside the delay)")
    purge.add_argument("--dry-run", action="store_true", help="list what would be purged, remove nothing")
    purge.add_argument("--json", action="store_true", help="print JSON instead of lines")
    undelete = sub.add_parser("undelete", help="restore a deleted study that has not been purged",
                              description="Restore a deleted study exactly as it was (its instances, versions and "
                              "counts) and drop its tombstone. Exit status 1 if it is not deleted or its purge has "
                              "begun.")
    common(undelete)  # type: ignore[operator]
    undelete.add_argument("study", metavar="UID", help="the Study Instance UID")
    undelete.add_argument("--reason", default="", help="why (kept in the state log and the audit trail)")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _audit(archive: Archive, action: str, tombstone: Tombstone, detail: str) -> None:
    archive.audit.record(AuditEvent(kind=AuditKind.DELETE, action=action, user=_user(), via="cli",
                                    patient_id=tombstone.patient_id, studies=(tombstone.study,),
                                    count=tombstone.count, detail=detail))


def _from(tombstone: Tombstone, delay_days: float) -> str:
    when = tombstone.time_ns / 1e9 + delay_days * 86400
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def run_purge(args: argparse.Namespace) -> int:
    """``bastion purge [--study UID] [--dry-run]``."""
    settings = settings_from(args)
    delay = settings.deletion_delay_days
    archive = Archive.open(settings)
    try:
        ready, waiting = archive.deletions.due(delay, args.study)
        if args.study is not None and not ready:
            if waiting:
                print(f"bastion purge: study {args.study} was deleted on {waiting[0].at}, inside the "
                      f"{delay:g}-day delay (deletion_delay_days): it may be purged from {_from(waiting[0], delay)}; "
                      "nothing was removed", file=sys.stderr)
            else:
                found = archive.deletions.tombstone(args.study)
                state = f"{found.state} already" if found is not None else "not deleted"
                print(f"bastion purge: study {args.study} is {state}: nothing to purge", file=sys.stderr)
            return 1
        if args.dry_run:
            _report(args, [(t, None) for t in ready], waiting, delay, dry_run=True)
            return 0
        done: list[tuple[Tombstone, int | None]] = []
        for tombstone in tqdm(ready, desc="purging", unit=" studies", file=sys.stderr, disable=None):
            try:
                removed = archive.deletions.purge(tombstone, user=_user())
            except BastionError as exc:
                print(f"bastion purge: study {tombstone.study}: {exc.message} (run bastion purge again)",
                      file=sys.stderr)
                done.append((tombstone, None))
                continue
            _audit(archive, "D", tombstone, f"purged ({removed} stored versions): {tombstone.reason}")
            done.append((tombstone, removed))
        _report(args, done, waiting, delay, dry_run=False)
        return 1 if any(n is None for _, n in done) else 0
    finally:
        archive.close()


def _report(args: argparse.Namespace, done: list[tuple[Tombstone, int | None]], waiting: list[Tombstone],
            delay: float, *, dry_run: bool) -> None:
    if args.json:
        print(json.dumps({"dry_run": dry_run, "deletion_delay_days": delay,
                          "purged" if not dry_run else "would_purge": [
                              {**t.to_json(), "removed_versions": n} for t, n in done],
                          "waiting": [{**t.to_json(), "purge_from": _from(t, delay)} for t in waiting]}, indent=2))
        return
    for tombstone, removed in done:
        what = ("would purge" if dry_run else "purged" if removed is not None else "FAILED to purge")
        versions = f" ({removed} stored versions removed)" if removed is not None else ""
        print(f"{what} study {tombstone.study} (patient {tombstone.patient_id or '?'}, {tombstone.count} instances, "
              f"deleted {tombstone.at} by {tombstone.user or '?'}){versions}")
    for tombstone in waiting:
        print(f"kept study {tombstone.study}: deleted {tombstone.at}, may be purged from {_from(tombstone, delay)}")
    if not done and not waiting:
        print("no deleted study")


def run_undelete(args: argparse.Namespace) -> int:
    """``bastion undelete UID``."""
    archive = Archive.open(settings_from(args))
    try:
        try:
            tombstone = archive.deletions.undelete(args.study, reason=args.reason, user=_user(), via="cli")
        except BastionError as exc:
            print(f"bastion undelete: {exc.message}", file=sys.stderr)
            return 1
        _audit(archive, "U", tombstone, args.reason)
        print(f"undeleted study {tombstone.study} ({tombstone.count} instances, deleted {tombstone.at} by "
              f"{tombstone.user or '?'})")
        return 0
    finally:
        archive.close()
