"""``bastion drill SCENARIO``: run a failure drill against a throw-away server and print what it measured.

The drills themselves are in :mod:`bastion.drills`; this is their command line: progress on stderr, the table
(or with ``--json`` one JSON object) on stdout, exit status 0 when the drill is ``ok``, 1 otherwise (a drill
that could not run here, e.g. ``full-disk`` without the right to mount a tmpfs, is not ok: it says why).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from bastion.drills import SCENARIOS, DrillOptions


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``drill`` to the subcommands ``sub`` (of :func:`bastion.cli.main.build_parser`)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "drill", help="run a failure drill on a throw-away server and measure it",
        description="Start a bastion serve of its own (temporary data directory, free loopback ports), load it "
        "over C-STORE, damage it and measure: acknowledged instances lost, corrupt bytes served, failed reads, "
        "seconds to recover. kill-node: SIGKILL to the whole server mid-ingest, --rounds times; lose-index: "
        "the index deleted under load; lose-copy: one of two blob stores deleted under load; bit-rot: bytes "
        "flipped in stored copies; full-disk: the second blob store on a small tmpfs (needs root). The last "
        "three need a server keeping copies in several blob stores. See docs/drills.md. Exit status 0 when the "
        "drill is ok, 1 otherwise.")
    p.add_argument("scenario", choices=SCENARIOS, metavar="SCENARIO", help=", ".join(SCENARIOS))
    p.add_argument("--instances", type=int, default=500, metavar="N", help="instances sent (default 500)")
    p.add_argument("--rounds", type=int, default=5, metavar="N", help="kill-node: kills and restarts (default 5)")
    p.add_argument("--flips", type=int, default=20, metavar="N", help="bit-rot: stored copies damaged "
                   "(default 20)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S", help="longest wait for a recovery or "
                   "repair, in seconds (default 300)")
    p.add_argument("--seed", type=int, help="random seed (default: a new one, reported)")
    p.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting of the server under drill, as BASTION_NAME (repeatable)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--keep", action="store_true", help="keep the work directory (data, stores, server logs)")
    return p


def run_drill_command(args: argparse.Namespace) -> int:
    """Entry point of ``bastion drill``."""
    from bastion.drills import run_drill

    settings: dict[str, str] = {}
    for item in args.setting:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            print(f"bastion drill: --setting {item!r} is not NAME=VALUE", file=sys.stderr)
            return 2
        settings[name.strip()] = value
    if args.instances < 2 or args.rounds < 1 or args.flips < 0:
        print("bastion drill: --instances must be at least 2, --rounds at least 1", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(logging.WARNING)
    options = DrillOptions(instances=args.instances, rounds=args.rounds, keep=args.keep, timeout=args.timeout,
                           flips=args.flips, seed=args.seed, settings=settings)
    result = run_drill(args.scenario, options)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(result.table())
    return 0 if result.ok else 1
