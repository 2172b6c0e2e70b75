"""``bastion queue list|retry|purge|reconcile``: the forwarding queues (:mod:`bastion.forward`) of a node.

Reads and changes ``<data>/forward.sqlite3`` directly, also while the server runs (the server's forwarder sees
retried entries at its next look, within a second). ``reconcile`` (edge mode) checks that upstream holds what was
delivered there (:mod:`bastion.forward.reconcile`) and queues again what it lacks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import asdict

from bastion.archive import Archive
from bastion.cli.serve import settings_from
from bastion.errors import BastionError
from bastion.forward import open_queue, queue_path
from bastion.forward.edge import open_edge_store
from bastion.forward.reconcile import reconcile
from bastion.forward.upstream import upstream_of


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: object) -> None:
    """``bastion queue`` and its commands; ``common`` adds the options every command takes."""
    queue = sub.add_parser("queue", help="show, retry and purge the forwarding queues",
                           description="The per-destination queues of the [[forward]] rules: pending, in flight, "
                           "delivered and dead (failed forward_max_attempts times) instances.")
    queue_sub = queue.add_subparsers(dest="queue_command", required=True)
    show = queue_sub.add_parser("list", help="each destination's counts, the oldest wait and the last error")
    show.add_argument("--dead", action="store_true", help="also list the dead letters with their last error")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    retry = queue_sub.add_parser("retry", help="make the dead letters pending again, their attempts reset")
    purge = queue_sub.add_parser("purge", help="drop the dead letters (--all: every queued instance)")
    purge.add_argument("--all", action="store_true", help="drop pending and in-flight instances too")
    purge.add_argument("--yes", action="store_true", help="really drop them (required)")
    for p in (show, retry, purge):
        common(p)  # type: ignore[operator]
        p.add_argument("--destination", metavar="NAME", help="only this destination (its rule's name)")
    check = queue_sub.add_parser("reconcile", help="edge mode: check that upstream holds what was delivered there, "
                                 "with the same content, and queue again what it lacks")
    common(check)  # type: ignore[operator]
    check.add_argument("--days", type=float, help="the instances delivered in the last DAYS days "
                       "(default: reconcile_days)")
    check.add_argument("--json", action="store_true", help="print JSON instead of a sentence")


def run_reconcile(args: argparse.Namespace) -> int:
    """``bastion queue reconcile``: one reconciliation now; exit 1 if upstream lacked anything or could not be
    asked about every study."""
    settings = settings_from(args)
    if settings.upstream_rule is None:
        raise BastionError("not an edge: set upstream (docs/configuration.md, Edge mode)")
    archive = Archive.open(settings, primary=False)
    try:
        with contextlib.closing(open_queue(settings)) as queue, contextlib.closing(open_edge_store(settings)) as edge:
            upstream = upstream_of(settings, lambda data: None)
            assert upstream is not None
            report = reconcile(archive, edge, queue, upstream,
                               settings.reconcile_days if args.days is None else args.days)
    finally:
        archive.close()
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        print(f"{report.checked} instance(s) of {report.studies} stud(ies) checked: {report.held} held upstream, "
              f"{report.missing} missing, {report.different} different, {report.requeued} queued again"
              + (f"; {report.unreachable_studies} stud(ies) not checked: {report.error}" if report.error else ""))
    return 1 if report.missing or report.different or report.unreachable_studies else 0


def run_queue(args: argparse.Namespace) -> int:
    """Entry point of ``bastion queue``."""
    if args.queue_command == "reconcile":
        return run_reconcile(args)
    settings = settings_from(args)
    if args.queue_command == "list" and not queue_path(settings).exists() and not settings.forward:
        print("no forwarding rules and no queue")
        return 0
    queue = open_queue(settings)
    try:
        if args.queue_command == "list":
            names = [r.name for r in settings.forward]
            stats = [s for s in queue.stats(names) if args.destination in (None, s.destination)]
            dead = queue.dead(args.destination, limit=1000) if args.dead else []
            if args.json:
                print(json.dumps({"queues": [asdict(s) for s in stats], "dead": [asdict(e) for e in dead]}))
                return 0
            print(f"{'destination':30} {'pending':>8} {'in flight':>9} {'delivered':>9} {'dead':>6} {'oldest':>9}"
                  "  last error")
            for s in stats:
                age = "" if s.oldest_pending_age_s is None else f"{s.oldest_pending_age_s:.0f} s"
                print(f"{s.destination[:30]:30} {s.pending:8} {s.in_flight:9} {s.delivered:9} {s.dead:6} {age:>9}"
                      f"  {s.last_error}")
            for e in dead:
                print(f"dead: {e.destination} {e.sop_uid} after {e.attempts} attempt(s): {e.last_error}")
            return 0
        if args.queue_command == "retry":
            n = queue.retry(args.destination)
            print(f"{n} dead letter(s) pending again")
            return 0
        if not args.yes:
            raise BastionError("purge drops queued instances for good: add --yes")
        n = queue.purge(args.destination, everything=args.all)
        print(f"{n} queued instance(s) dropped")
        return 0
    finally:
        queue.close()

