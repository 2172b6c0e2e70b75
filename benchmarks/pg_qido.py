"""QIDO-RS latency on a PostgreSQL index of N instances (issue 21: every query of the DICOMweb benchmark at most
10 ms median at 1,000,000 instances on PostgreSQL).

1. **Load**: the deterministic plan of :mod:`bulkload` (default 1,000,000 instances) is written into a fresh
   schema of the PostgreSQL database (``BASTION_BENCH_POSTGRESQL``, default the local ``test`` database) with
   ``COPY``: the schema is made by opening :class:`bastion.index.postgresql.PostgresIndex` on it (its migrations,
   as a server would), then the same rows as the SQLite loader's (:func:`bulkload.batches`: the record path's
   column derivation) are copied into its tables, the patients' counts and the studies' ModalitiesInStudy /
   SOPClassesInStudy are computed as the record path keeps them, the change log's sequence is set past the
   entries, and the tables are vacuumed and analysed (as autovacuum would do to a long-lived index).
   Benchmark only: the rows point at blob keys that do not exist, since QIDO needs only the index.
2. **Serve**: ``bastion serve --index URL`` on it, blobs in a local directory (empty), and wait until the server's
   processes are idle (its metadata warmer first works through the last entries of the change log, finding no
   objects).
3. **Query**: the fixed query set of :mod:`dicomweb` (:func:`dicomweb.query_set`, :func:`dicomweb.run_queries`),
   median and p95 of ``--repeat`` requests each on one keep-alive connection after 3 warm-ups.

With ``--sqlite`` the same plan is also loaded into a SQLite index (:func:`bulkload.fill_index`) and served and
queried the same way, and each query's answers on both are compared (the same results in the same order, but for
the retrieve URLs): a check that the PostgreSQL load and index answer as the SQLite ones do.

Usage::

    python benchmarks/pg_qido.py --count 20000 --sqlite
    python benchmarks/pg_qido.py --count 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bulkload  # noqa: E402
import dicomweb  # noqa: E402
import servers  # noqa: E402

from bastion.index import pg_record  # noqa: E402
from bastion.index.pg_schema import connect, parse_location  # noqa: E402
from bastion.index.postgresql import PostgresIndex  # noqa: E402
from bastion.index.schema import SUMMARY_SEP  # noqa: E402

#: Every study's ModalitiesInStudy / SOPClassesInStudy: the record path's statement for one study
#: (:data:`bastion.index.pg_record.REFRESH_SUMMARIES`) without its last ``WHERE``.
REFRESH_ALL_SUMMARIES = pg_record.REFRESH_SUMMARIES.rsplit(" WHERE ", 1)[0]
#: The retrieve URL, which names the server's port: left out when two servers' answers are compared.
RETRIEVE_URL = "00081190"


def copy_statement(table: str) -> str:
    """``COPY`` into ``table`` of the columns :data:`bulkload.INSERTS` gives it (``changes``: with ``seq`` first)."""
    found = re.match(r"INSERT INTO (\w+)(?: \(([^)]*)\))? VALUES", bulkload.INSERTS[table])
    assert found is not None and found.group(1) == table
    columns = found.group(2)
    if table == "changes":
        columns = f"seq, {columns}"
    return f"COPY {table}{f' ({columns})' if columns else ''} FROM STDIN"


def fill_pg(url: str, studies: list[bulkload.Study], batch: int = 50_000) -> float:
    """Write the plan's rows into the PostgreSQL index at ``url`` (made here; it must hold no instances yet);
    the seconds taken."""
    t0 = time.monotonic()
    PostgresIndex(url).close()  # creates the schema through the migrations, exactly as the server would
    conn = connect(parse_location(url))
    try:
        if conn.execute("SELECT EXISTS (SELECT 1 FROM instances)").fetchone() != (False,):
            raise SystemExit(f"{url} already holds instances: use a new schema")
        conn.execute("SET synchronous_commit = off")
        seq = 0
        for pending, done in bulkload.batches(studies, batch):
            with conn.transaction(), conn.cursor() as cur:
                for table, rows in pending.items():
                    if not rows:
                        continue
                    with cur.copy(copy_statement(table)) as copy:
                        for row in rows:
                            if table == "changes":
                                seq += 1
                                row = (seq, *row)
                            copy.write_row(row)
            print(f"  {done:,} instances copied ({time.monotonic() - t0:.0f} s)", flush=True)
        with conn.transaction():
            conn.execute(bulkload.PATIENT_COUNTS)
            conn.execute(REFRESH_ALL_SUMMARIES, {"sep": SUMMARY_SEP})
            conn.execute("UPDATE studies s SET patient_name_key = lower(p.patient_name) FROM patients p "
                         "WHERE p.patient_id = s.patient_id")  # as the record path keeps it (migration 0004)
            conn.execute("SELECT setval('changes_seq', %s, true)", (seq,))
        print(f"  counts and study summaries ({time.monotonic() - t0:.0f} s)", flush=True)
        for table in bulkload.INSERTS:
            conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(table)))
    finally:
        conn.close()
    seconds = time.monotonic() - t0
    print(f"  index filled: {seq:,} instances in {seconds:.0f} s ({seq / seconds:,.0f}/s)", flush=True)
    return seconds


def schema_size(url: str) -> str:
    """The size on disk of the index's tables and indexes, as PostgreSQL prints it."""
    where = parse_location(url)
    conn = connect(where)
    try:
        row = conn.execute("SELECT pg_size_pretty(sum(pg_total_relation_size(c.oid))) FROM pg_class c "
                           "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind = 'r'",
                           (where.schema,)).fetchone()
    finally:
        conn.close()
    return str(row[0]) if row else "?"


def answers(server: servers.Server, studies: list[bulkload.Study]) -> dict[str, Any]:
    """Each query's answer (DICOM JSON without retrieve URLs), by query name."""
    found: dict[str, Any] = {}
    with httpx.Client(timeout=120) as client:
        for name, path, _ in dicomweb.query_set(studies):
            response = client.get(f"{server.base_url}/dicom-web{path}", headers={"Accept": dicomweb.JSON_ACCEPT})
            response.raise_for_status()
            found[name] = [{k: v for k, v in item.items() if k != RETRIEVE_URL} for item in response.json()]
    return found


def measure(label: str, server: servers.Server, studies: list[bulkload.Study], count: int, repeat: int
            ) -> tuple[dicomweb.ServerFigures, dict[str, Any]]:
    """Wait until ``server`` is idle, then run the query set on it: its figures and its answers."""
    meter = servers.CpuMeter({"server": [server.process.pid]})
    waited = meter.wait_idle("server", first_s=3.0, timeout_s=600.0)
    print(f"  {label}: server idle after {waited:.0f} s", flush=True)
    fig = dicomweb.ServerFigures(label, count)
    with httpx.Client(timeout=120) as client:
        dicomweb.run_queries(fig, client, server.base_url + "/dicom-web", studies, repeat)
    return fig, answers(server, studies)


@contextlib.contextmanager
def pg_index(args: argparse.Namespace, studies: list[bulkload.Study]) -> Iterator[tuple[str, float]]:
    """The index location to serve and the seconds its load took (NaN: ``--schema`` named a loaded one)."""
    if args.schema:
        yield servers.with_schema(servers.POSTGRESQL, args.schema), float("nan")
        return
    with servers.pg_schema("bench_qido", keep=args.keep) as url:
        print(f"loading {args.count:,} instances into {url}", flush=True)
        seconds = fill_pg(url, studies)
        if args.keep:
            print(f"  kept: --schema {parse_location(url).schema}", flush=True)
        yield url, seconds


def compare(pg: dict[str, Any], lite: dict[str, Any]) -> list[str]:
    """Where the PostgreSQL index's answers differ from the SQLite index's."""
    return [f"{name}: PostgreSQL answered {len(pg[name])} results, SQLite {len(lite[name])}"
            + ("" if len(pg[name]) != len(lite[name]) else " (same count, different results or order)")
            for name in pg if pg[name] != lite[name]]


def main() -> int:
    """Command-line entry point; exit 1 if a query's count or a comparison is wrong."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="planned instances (default 1,000,000)")
    parser.add_argument("--repeat", type=int, default=30, help="requests per query (after 3 warm-ups)")
    parser.add_argument("--sqlite", action="store_true", help="also load, serve and query a SQLite index, and "
                                                              "compare the answers")
    parser.add_argument("--keep", action="store_true", help="keep the loaded schema (for --schema)")
    parser.add_argument("--schema", help="serve this schema, loaded before with --keep and the same --count")
    parser.add_argument("--workdir", type=Path, help="where the servers' data directories go")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    studies = bulkload.plan(args.count)
    print(f"plan: {len(studies):,} studies, {len({s.patient.id for s in studies}):,} patients, "
          f"{sum(len(s.series) for s in studies):,} series, {args.count:,} instances", flush=True)
    bulkload.self_check(studies)
    columns: list[tuple[str, dicomweb.ServerFigures]] = []
    with tempfile.TemporaryDirectory(prefix="bench-qido-", dir=args.workdir) as work:
        with pg_index(args, studies) as (url, load_s):
            print(f"  index size: {schema_size(url)}", flush=True)
            with servers.bastion(["--index", url], base_dir=Path(work), name="bastion-pg") as server:
                pg_fig, pg_answers = measure("bastion-pg", server, studies, args.count, args.repeat)
            pg_fig.load_s = load_s
            columns.append((f"Bastion on PostgreSQL @ {args.count:,}", pg_fig))
        if args.sqlite:
            data = Path(work) / "sqlite-data"
            data.mkdir()
            t0 = time.monotonic()
            bulkload.fill_index(data / "index.sqlite3", studies)
            with servers.bastion(["--data", str(data)], base_dir=Path(work)) as server:
                lite_fig, lite_answers = measure("bastion", server, studies, args.count, args.repeat)
            lite_fig.load_s = time.monotonic() - t0
            columns.append((f"Bastion on SQLite @ {args.count:,}", lite_fig))
            pg_fig.notes += compare(pg_answers, lite_answers)
    print()
    print(f"load: {pg_fig.load_s:.0f} s for {args.count:,} instances ({args.count / pg_fig.load_s:,.0f}/s)"
          if not math.isnan(pg_fig.load_s) else "load: (a schema loaded before)")
    print(dicomweb.table(columns).split("\n| series metadata")[0])
    for label, fig in columns:
        for note in fig.notes:
            print(f"note ({label}): {note}")
    if args.json:
        args.json.write_text(json.dumps([{"label": label, **asdict(fig)} for label, fig in columns],
                                        indent=2))
    return 1 if any(fig.notes for _, fig in columns) else 0


if __name__ == "__main__":
    sys.exit(main())
