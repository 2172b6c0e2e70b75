"""``bastion apikey create|list|revoke`` and ``bastion emergency-token``: the credentials the archive issues itself.

API keys (:mod:`bastion.auth.apikeys`) are for services; a running server sees a creation or a revocation within a
second or two. A break-glass token (:mod:`bastion.auth.emergency`) lets a clinician in while the identity provider
is down; minting one is audited, and so is every use.
"""

from __future__ import annotations

import argparse
import getpass
import json
import time
from dataclasses import asdict

from bastion.archive import Archive
from bastion.audit import AuditEvent, AuditKind, Outcome
from bastion.auth import ROLES, apikeys
from bastion.auth.emergency import EmergencyError, mint, revoke
from bastion.cli.serve import settings_from
from bastion.errors import BastionError
from bastion.settings import Settings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: object) -> None:
    """``bastion apikey`` and ``bastion emergency-token``; ``common`` adds the options every command takes."""
    key = sub.add_parser("apikey", help="create, list and revoke API keys for services",
                         description="API keys authenticate services (Authorization: Bearer <key> or X-API-Key) "
                         "when [auth] is enabled. Only a SHA-256 of each key is stored, in <data>/auth/apikeys.json.")
    key_sub = key.add_subparsers(dest="apikey_command", required=True)
    create = key_sub.add_parser("create", help="make a key and print it (once: it is not stored)")
    create.add_argument("--name", required=True, help="the key's name (who uses it; in the audit log)")
    create.add_argument("--role", required=True, choices=ROLES, help="what the key may do")
    show = key_sub.add_parser("list", help="the keys made, with role, creation and revocation (never the key)")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    revoke = key_sub.add_parser("revoke", help="revoke a key by name (a running server refuses it within 2 s)")
    revoke.add_argument("name")
    for p in (create, show, revoke):
        common(p)  # type: ignore[operator]

    em = sub.add_parser("emergency-token", help="mint a break-glass token the server accepts offline",
                        description="Mint a short-lived token signed by the archive's own key (made on first use "
                        "in <data>/auth/emergency-key.jwk), accepted while the identity provider is down. Minting and "
                        "every use are audited and listed on the admin page (GET /api/emergency).")
    common(em)  # type: ignore[operator]
    em.add_argument("--role", choices=ROLES, help="what the token may do (required to mint)")
    em.add_argument("--hours", type=float, default=12.0, help="lifetime (default 12; at most "
                    "auth_emergency_max_hours, 24 by default)")
    em.add_argument("--reason", help="why the break-glass access is needed (audited; required to mint)")
    em.add_argument("--user", help="who will use it (default: the login name running this command)")
    em.add_argument("--revoke", metavar="ID", help="revoke the token with this id (printed when it was minted, and "
                    "on the admin page) instead of minting one: a running server refuses it at its next use")


def _audit(settings: Settings, event: AuditEvent) -> None:
    archive = Archive.open(settings, primary=False)
    try:
        archive.audit.record(event)
    finally:
        archive.close()


def run_apikey(args: argparse.Namespace) -> int:
    """Entry point of ``bastion apikey``."""
    settings = settings_from(args)
    operator = getpass.getuser()
    try:
        if args.apikey_command == "create":
            key = apikeys.create(settings.data, args.name, args.role)
            _audit(settings, AuditEvent(kind=AuditKind.CONFIG, action="C", user=operator, via="cli",
                                        destination=args.name, detail=f"API key {args.name!r} created, role "
                                        f"{args.role}"))
            print(key)
            return 0
        if args.apikey_command == "revoke":
            count = apikeys.revoke(settings.data, args.name)
            if not count:
                raise BastionError(f"no live API key named {args.name!r}")
            _audit(settings, AuditEvent(kind=AuditKind.CONFIG, action="D", user=operator, via="cli",
                                        destination=args.name, detail=f"API key {args.name!r} revoked"))
            print(f"API key {args.name!r} revoked")
            return 0
    except apikeys.ApiKeyError as exc:
        raise BastionError(str(exc)) from exc
    keys = apikeys.listing(settings.data)
    if args.json:
        print(json.dumps([{k: v for k, v in asdict(key).items() if k != "sha256"} for key in keys]))
        return 0
    print(f"{'name':30} {'role':9} {'created':20} revoked")
    for k in keys:
        print(f"{k.name[:30]:30} {k.role:9} {_when(k.created):20} {_when(k.revoked) if k.revoked else ''}")
    return 0


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t else ""


def run_emergency_token(args: argparse.Namespace) -> int:
    """Entry point of ``bastion emergency-token``: prints the token on stdout, what it grants on stderr."""
    import sys

    settings = settings_from(args)
    operator = getpass.getuser()
    if args.revoke:
        if not revoke(settings.data, args.revoke):
            raise BastionError(f"no live break-glass token with id {args.revoke!r} (bastion emergency-token ids are on "
                               "the admin page and in GET /api/emergency)")
        _audit(settings, AuditEvent(kind=AuditKind.EMERGENCY, action="D", user=operator, via="cli", emergency=True,
                                    detail=f"break-glass token {args.revoke} revoked by {operator}"))
        print(f"break-glass token {args.revoke} revoked")
        return 0
    if not args.role or not args.reason:
        raise BastionError("--role and --reason are required to mint a break-glass token")
    try:
        minted = mint(settings.data, args.role, args.hours, args.reason, args.user or operator,
                      settings.auth_emergency_max_hours, minted_by=operator)
    except EmergencyError as exc:
        raise BastionError(str(exc)) from exc
    _audit(settings, AuditEvent(kind=AuditKind.EMERGENCY, outcome=Outcome.SUCCESS, action="C", user=minted.user,
                                role=minted.role, via="cli", emergency=True,
                                detail=f"break-glass token {minted.jti} minted by {operator} until "
                                f"{_when(minted.expires)} UTC: {minted.reason}"))
    print(minted.token)
    print(f"break-glass token {minted.jti} for {minted.user} ({minted.role}) until {_when(minted.expires)} UTC; every "
          f"use is audited; `bastion emergency-token --revoke {minted.jti}` cuts it short", file=sys.stderr)
    return 0
