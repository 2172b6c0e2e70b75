"""``bastion``: the command-line entry point."""

from __future__ import annotations

import argparse
import logging
import sys

from bastion import __version__
from bastion.errors import BastionError
from bastion.settings import LOG_LEVELS


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML settings file (also BASTION_CONFIG)")
    p.add_argument("--data", metavar="DIR", help="data directory (default ./bastion-data; BASTION_DATA)")
    p.add_argument("--index", metavar="URL", help="index: a SQLite file (default <data>/index.sqlite3) or "
                   "postgresql://USER@HOST:PORT/DB (BASTION_INDEX)")
    p.add_argument("--blobs", metavar="URL", action="append", help="blob store: a directory (default "
                   "<data>/blobs) or s3://BUCKET/PREFIX?endpoint=URL&region=R; repeat it for several stores, each "
                   "holding a copy of every object (BASTION_BLOBS, comma-separated)")
    p.add_argument("--copies-required", metavar="K", type=int, help="durable copies an object needs before its "
                   "store succeeds (default: one in every blob store; BASTION_COPIES_REQUIRED)")
    p.add_argument("--node-id", metavar="NAME", help="this node's id among the nodes sharing the index and blob "
                   "store (default: generated once into <data>/node-id; BASTION_NODE_ID)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (the CLI reference in docs/ comes from it)."""
    parser = argparse.ArgumentParser(prog="bastion", description="Bastion: a PACS that never loses an "
                                     "acknowledged image.")
    parser.add_argument("--version", action="version", version=f"bastion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the DICOM and HTTP listeners",
                           description="Run the DICOM listener (C-ECHO/STORE/FIND/MOVE/GET) and the HTTP "
                           "listener (/health, /api, /dicom-web, /admin, viewer). Settings come from the TOML "
                           "file, then BASTION_* environment variables (BASTION_DATA, BASTION_AET, BASTION_HOST, "
                           "BASTION_DICOM_PORT, BASTION_HTTP_PORT, BASTION_MAX_PDU, BASTION_REMOTES, "
                           "BASTION_CORS_ORIGINS, BASTION_WORKERS, BASTION_LOG_LEVEL), then these flags.")
    _common(serve)
    serve.add_argument("--aet", help="our AE title (default BASTION)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument("--dicom-port", type=int, help="DICOM port (default 11112)")
    serve.add_argument("--http-port", type=int, help="HTTP port (default 8080)")
    serve.add_argument("--remote", action="append", metavar="AET@HOST:PORT",
                       help="a C-MOVE destination (repeatable; adds to the config file's [remotes])")
    serve.add_argument("--workers", type=int, help="DICOM worker processes sharing the port (default 2; "
                       "BASTION_WORKERS)")
    serve.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, metavar="LEVEL",
                       help=f"{', '.join(LOG_LEVELS)}, any case (default INFO)")

    imp = sub.add_parser("import", help="store DICOM files, folders and zip archives",
                         description="Store files, folders (recursively) and zip archives through the same "
                         "ingest path as C-STORE; prints stored / duplicate / superseded / rejected with reasons. "
                         "Exit status 1 if anything was rejected.")
    _common(imp)
    imp.add_argument("paths", nargs="+", metavar="PATH")
    imp.add_argument("--jobs", type=int, default=4, help="parallel stores (default 4)")

    idx = sub.add_parser("index", help="index maintenance")
    idx_sub = idx.add_subparsers(dest="index_command", required=True)
    rebuild = idx_sub.add_parser("rebuild", help="rebuild the whole index from the blob store alone",
                                 description="Rebuild the index from the stored files alone into a new "
                                 "index, then swap it in. While a server has the archive open, asks that server "
                                 "(at its HTTP port) to do it online: it builds the new index while it serves and "
                                 "switches it in during a short pause (SQLite index only).")
    _common(rebuild)

    verify = sub.add_parser("verify", help="re-hash every stored object against the content digest in its name",
                            description="Re-hash every stored object (current and superseded versions) and "
                            "report missing or corrupt ones; with several blob stores, every copy in each. Exit "
                            "status 1 if any (with --repair: if any is left after the repair).")
    _common(verify)
    verify.add_argument("--repair", action="store_true", help="with several blob stores: make every missing or "
                        "corrupt copy again from a good one, now, and report per store what was checked, found and "
                        "repaired")

    from bastion.cli.audit import add_parser as add_audit_parser
    from bastion.cli.auth import add_parser as add_auth_parser
    from bastion.cli.deletion import add_parser as add_deletion_parser
    from bastion.cli.drill import add_parser as add_drill_parser
    from bastion.cli.export import add_parser as add_export_parser
    from bastion.cli.queue import add_parser as add_queue_parser

    add_drill_parser(sub)
    add_deletion_parser(sub, _common)
    add_audit_parser(sub, _common)
    add_queue_parser(sub, _common)
    add_auth_parser(sub, _common)
    add_export_parser(sub, _common)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", None) or "INFO",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            from bastion.cli.serve import run_serve

            return run_serve(args)
        if args.command == "import":
            from bastion.cli.importer import run_import

            return run_import(args)
        if args.command == "index":
            from bastion.cli.maintenance import run_rebuild

            return run_rebuild(args)
        if args.command == "verify":
            from bastion.cli.maintenance import run_verify

            return run_verify(args)
        if args.command == "queue":
            from bastion.cli.queue import run_queue

            return run_queue(args)
        if args.command == "audit":
            from bastion.cli.audit import run_audit

            return run_audit(args)
        if args.command == "export":
            from bastion.cli.export import run_export

            return run_export(args)
        if args.command == "apikey":
            from bastion.cli.auth import run_apikey

            return run_apikey(args)
        if args.command == "emergency-token":
            from bastion.cli.auth import run_emergency_token

            return run_emergency_token(args)
        if args.command in ("purge", "undelete"):
            from bastion.cli.deletion import run_purge, run_undelete

            return run_purge(args) if args.command == "purge" else run_undelete(args)
        if args.command == "drill":
            from bastion.cli.drill import run_drill_command

            return run_drill_command(args)
    except BastionError as exc:
        print(f"bastion: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
