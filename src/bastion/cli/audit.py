"""``bastion audit verify|export``: check the audit log's hash chain, export it as PS3.15 A.5 audit messages.

Both read ``<data>/audit/`` directly (:mod:`bastion.audit.chain`), also while the server runs: ``verify`` holds
the writers off for the walk, so that the files and the anchor agree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from typing import TextIO

from bastion.audit import AUDIT_DIR
from bastion.audit.chain import consistent, since_key, verify
from bastion.audit.export import entries, jsonl_record, send_tls, syslog_record
from bastion.cli.serve import settings_from
from bastion.errors import BastionError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: object) -> None:
    """``bastion audit`` and its commands; ``common`` adds the options every command takes."""
    audit = sub.add_parser("audit", help="verify and export the tamper-evident audit log",
                           description="The audit log (<data>/audit/): one hash-chained JSON line per audited "
                           "access (docs/audit.md).")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    check = audit_sub.add_parser("verify", help="walk the hash chain and check it against its anchor",
                                 description="Walk the chain: says OK with the counts, or exits 1 naming the "
                                 "first bad entry (file, line, seq) and what is wrong with it: edited, inserted, "
                                 "removed, or the log truncated.")
    common(check)  # type: ignore[operator]
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    export = audit_sub.add_parser("export", help="the log as PS3.15 A.5 audit messages: JSON lines or RFC 5424 "
                                  "syslog", description="Write each entry as JSON (the entry and its full DICOM "
                                  "audit message) or as an RFC 5424 syslog message whose MSG is the audit "
                                  "message's XML, as an ATNA Audit Record Repository takes it; or send those "
                                  "to one over TLS (RFC 5425).")
    common(export)  # type: ignore[operator]
    export.add_argument("--format", choices=("jsonl", "syslog"), default="jsonl", help="default jsonl")
    export.add_argument("--since", metavar="TIME", default="", help="only entries at or after TIME (UTC, ISO "
                        "8601: 2026-12-07 or 2026-12-07T06:00)")
    export.add_argument("--out", metavar="FILE", help="write to FILE (default: standard output)")
    export.add_argument("--send", metavar="tls://HOST:PORT", help="send syslog messages to an audit repository "
                        "over TLS (RFC 5425 octet counting) instead of writing them")
    export.add_argument("--cafile", metavar="FILE", help="with --send: the CA certificates to check the "
                        "repository's certificate against (default: the system's)")


def run_audit(args: argparse.Namespace) -> int:
    """Entry point of ``bastion audit``."""
    settings = settings_from(args)
    directory = str(settings.data / AUDIT_DIR)
    if args.audit_command == "verify":
        return _verify(directory, args.json)
    source = settings.aet
    try:
        since = since_key(args.since)
    except ValueError as exc:
        raise BastionError(f"--since: {exc}") from None
    hostname = socket.gethostname()
    if args.send:
        sent = send_tls(args.send, (syslog_record(e, source, hostname) for e in entries(directory, since)),
                        cafile=args.cafile)
        print(f"{sent} audit message(s) sent to {args.send}")
        return 0
    with _output(args.out) as out:
        for entry in entries(directory, since):
            text = (jsonl_record(entry, source) if args.format == "jsonl"
                    else syslog_record(entry, source, hostname))
            out.write(text + "\n")
    return 0


def _verify(directory: str, as_json: bool) -> int:
    if not os.path.isdir(directory):
        raise BastionError(f"no audit log in {directory}")
    with consistent(directory):
        verdict = verify(directory)
    if as_json:
        print(json.dumps(verdict.as_json()))
    else:
        print(verdict.describe())
    return 0 if verdict.ok else 1


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[TextIO]:
    if path is None:
        yield sys.stdout
        return
    with open(path, "w", encoding="utf-8") as fh:
        yield fh
