"""Where a PostgreSQL index lives, connecting to it, and its schema migrations (yoyo-migrations).

A location is a libpq URL, ``postgresql://USER@HOST:PORT/DB[?PARAMS]`` (or ``postgres://``), passed to libpq as
it is (multi-host URLs and ``target_session_attrs`` included) but for one parameter of ours:
``bastion_schema=NAME``, the schema that holds the index (default ``public``), which is taken out of the URL and
set as the ``search_path`` of every connection. Several indexes (tests, archives) can thus share one database.

Migrations are the ``*.sql`` files of ``migrations/postgresql/`` beside this module, applied in the order of their
names by yoyo-migrations, which records them in the schema's ``_yoyo_migration`` table. :func:`migrate`
guarantees:

* An index whose schema has every migration is only read: opening it writes nothing.
* Migrations run under a session advisory lock of the schema (:data:`MIGRATE_LOCK`): nodes opening one index at
  once wait for the first to finish, then find the schema up to date. Each migration runs in one transaction.
* A schema holding a migration these files do not name (made by a newer Bastion) is refused with an
  :class:`~bastion.errors.IndexFailure`, before anything is written.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from bastion.errors import IndexFailure

log = logging.getLogger("bastion.index")

#: The URL parameter naming the index's schema (never passed to libpq).
SCHEMA_PARAM = "bastion_schema"
#: The migrations, by path relative to this module (they ship as package data).
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations" / "postgresql"
#: Where yoyo records the migrations applied to a schema.
MIGRATION_TABLE = "_yoyo_migration"
#: The first key of the advisory locks of an index (the second is ``hashtext(schema)``): migrations, and the
#: change log (writers share it from their first ``seq`` to their commit; :mod:`bastion.index.postgresql`).
MIGRATE_LOCK, LOG_LOCK = 0x42530001, 0x42530002
#: How long opening waits for a server that does not answer.
CONNECT_TIMEOUT_S = 10

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass(frozen=True)
class Location:
    """A PostgreSQL index location, parsed."""

    conninfo: str  # the URL as libpq gets it
    schema: str
    where: str  # host:port/database, for messages (no password)


def parse_location(location: str) -> Location:
    """The libpq URL, schema and description of ``location``; IndexFailure if it is not a valid one."""
    base, sep, query = location.partition("?")
    kept: list[str] = []
    schema = "public"
    for part in query.split("&") if sep else []:
        key, _, value = part.partition("=")
        if unquote(key) == SCHEMA_PARAM:
            schema = unquote(value)
        elif part:
            kept.append(part)
    if not _SCHEMA_NAME.fullmatch(schema):
        raise IndexFailure(f"PostgreSQL index: {SCHEMA_PARAM}={schema!r} is not a schema name "
                           "(lower-case letters, digits and _, not starting with a digit)")
    conninfo = base + ("?" + "&".join(kept) if kept else "")
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        raise IndexFailure(f"PostgreSQL index: not a valid libpq URL ({one_line(exc)})") from exc
    return Location(conninfo, schema, _describe(params))


def _describe(params: dict[str, Any]) -> str:
    hosts = str(params.get("host") or params.get("hostaddr") or "localhost").split(",")
    ports = str(params.get("port") or "5432").split(",")
    ports += [ports[-1]] * (len(hosts) - len(ports))
    return ",".join(f"{h}:{p}" for h, p in zip(hosts, ports, strict=False)) + f"/{params.get('dbname', '')}"


def one_line(error: BaseException) -> str:
    """A database error's message on one line (libpq's span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def application_name(schema: str) -> str:
    """The application name of the connections of the index in ``schema`` (what :func:`nodes_connected` counts)."""
    return f"bastion-index:{schema}"[:63]


def connect_kwargs(location: Location) -> dict[str, Any]:
    """Connection parameters that the URL does not set itself: a connect timeout and an application name naming
    the index's schema."""
    given = conninfo_to_dict(location.conninfo)
    extra: dict[str, Any] = {"autocommit": True}
    if "connect_timeout" not in given:
        extra["connect_timeout"] = CONNECT_TIMEOUT_S
    if "application_name" not in given:
        extra["application_name"] = application_name(location.schema)
    return extra


def other_connections(conn: psycopg.Connection[Any], location: Location) -> int:
    """How many other connections to the index in ``location``'s schema are open (servers, commands of any node):
    those whose application name is :func:`application_name`'s, on any server of the same database."""
    row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                       "AND application_name = %s AND pid <> pg_backend_pid()",
                       (application_name(location.schema),)).fetchone()
    return int(row[0]) if row else 0


def set_search_path(conn: psycopg.Connection[Any], schema: str) -> None:
    """Make ``schema`` the only schema that names resolve in on ``conn`` (an autocommit connection)."""
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))


def connect(location: Location) -> psycopg.Connection[Any]:
    """An autocommit connection to the index's database, its search path set; IndexFailure, on one line naming
    the server and libpq's reason, if it cannot be had within :data:`CONNECT_TIMEOUT_S`."""
    try:
        conn = psycopg.connect(location.conninfo, **connect_kwargs(location))
    except psycopg.Error as exc:
        raise IndexFailure(f"PostgreSQL index at {location.where}: cannot connect: {one_line(exc)}") from exc
    try:
        set_search_path(conn, location.schema)
    except psycopg.Error as exc:
        conn.close()
        raise IndexFailure(f"PostgreSQL index at {location.where}: {one_line(exc)}") from exc
    return conn


def lock_key(schema: str) -> sql.Composable:
    """The second key of the index's advisory locks."""
    return sql.SQL("hashtext({})").format(sql.Literal(schema))


@functools.cache
def _migrations() -> Any:
    """The migrations shipped with this code (a yoyo ``MigrationList``), read once."""
    from yoyo import read_migrations  # type: ignore[import-untyped]

    return read_migrations(str(MIGRATIONS_DIR))


def known_migrations() -> list[str]:
    """The ids of the migrations shipped with this code, in the order they apply."""
    return [m.id for m in _migrations()]


def applied_migrations(conn: psycopg.Connection[Any]) -> set[str] | None:
    """The ids of the migrations applied to the schema on ``conn``'s search path; None where it has none."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (MIGRATION_TABLE,)).fetchone()
    if not row or not row[0]:
        return None
    return {r[0] for r in conn.execute(sql.SQL("SELECT migration_id FROM {}").format(sql.Identifier(MIGRATION_TABLE)))}


def _refuse_newer(applied: set[str], location: Location) -> None:
    unknown = sorted(applied - set(known_migrations()))
    if unknown:
        raise IndexFailure(f"PostgreSQL index at {location.where} (schema {location.schema}) has migrations this "
                           f"Bastion does not know ({', '.join(unknown)}): it was upgraded by a newer Bastion; "
                           "run that version")


def migrate(conn: psycopg.Connection[Any], location: Location) -> None:
    """Create the index's schema or bring it up to date (see the module docstring); ``conn`` is an autocommit
    connection from :func:`connect`."""
    applied = applied_migrations(conn)
    if applied is not None:
        _refuse_newer(applied, location)
        if set(known_migrations()) <= applied:
            return
    key = lock_key(location.schema)
    conn.execute(sql.SQL("SELECT pg_advisory_lock({}, {})").format(sql.Literal(MIGRATE_LOCK), key))
    try:
        if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (location.schema,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(location.schema)))
        _refuse_newer(applied_migrations(conn) or set(), location)
        _apply(location)
    finally:
        conn.execute(sql.SQL("SELECT pg_advisory_unlock({}, {})").format(sql.Literal(MIGRATE_LOCK), key))


def _apply(location: Location) -> None:
    """Apply the migrations the schema lacks, through yoyo (its connections are libpq's URL as it is)."""
    from yoyo.backends import PostgresqlPsycopgBackend  # type: ignore[import-untyped]
    from yoyo.connections import DatabaseURI  # type: ignore[import-untyped]

    logging.getLogger("yoyo").setLevel(logging.WARNING)  # a line per statement at INFO; ours says what was done
    args = {"conninfo": location.conninfo, "schema": location.schema, **connect_kwargs(location)}
    del args["autocommit"]  # yoyo's own: its connections are autocommit and it begins its transactions
    uri = DatabaseURI("postgresql+psycopg", None, None, None, None, None, args)
    backend = PostgresqlPsycopgBackend(uri, MIGRATION_TABLE)
    try:
        backend.init_database()
        missing = backend.to_apply(_migrations())
        backend.apply_migrations(missing)
    finally:
        backend.connection.close()
    log.info("PostgreSQL index at %s, schema %s: applied %s", location.where, location.schema,
             ", ".join(m.id for m in missing) or "nothing")


def read_log_floor(location: Location) -> int:
    """The highest ``seq`` the index's change log has handed out (0 where the schema has no index yet), read
    without changing anything."""
    conn = connect(location)
    try:
        row = conn.execute("SELECT to_regclass('changes_seq') IS NOT NULL, to_regclass('meta') IS NOT NULL").fetchone()
        if not row or not row[0]:
            return 0
        last, called = conn.execute("SELECT last_value, is_called FROM changes_seq").fetchone() or (1, False)
        floor = int(last) if called else int(last) - 1
        if row[1]:
            start = conn.execute("SELECT value FROM meta WHERE key = 'log_start'").fetchone()
            floor = max(floor, int(start[0]) if start else 0)
        return max(floor, 0)
    except psycopg.Error as exc:
        raise IndexFailure(f"PostgreSQL index at {location.where}: {one_line(exc)}") from exc
    finally:
        conn.close()


#: How long a caller waits for a pooled connection before the index or jobs call fails (IndexFailure).
POOL_TIMEOUT_S = 10.0


def migrated_pool(where: Location, name: str, max_size: int, application: str | None = None, min_size: int = 1,
                  **options: Any) -> ConnectionPool[psycopg.Connection[Any]]:
    """The schema in ``where`` created or migrated (:func:`migrate`, on a connection of its own), then an open pool
    of connections (``min_size`` to ``max_size``) whose search path is that schema; ``name`` prefixes its name;
    ``application``: the connections' application name, where it is not the index's (:func:`application_name`,
    which :func:`other_connections` counts). Raises what :func:`connect` does, and the migration's psycopg.Error."""
    conn = connect(where)
    try:
        migrate(conn, where)
    finally:
        conn.close()
    schema = where.schema

    def configure(conn: psycopg.Connection[Any]) -> None:
        set_search_path(conn, schema)

    kwargs = connect_kwargs(where) | ({"application_name": application[:63]} if application else {})
    return ConnectionPool(where.conninfo, kwargs=kwargs, min_size=min_size, max_size=max_size, open=True,
                          configure=configure, timeout=POOL_TIMEOUT_S, name=f"{name}-{uuid.uuid4().hex[:8]}",
                          **options)


#: Runs one statement (``?`` placeholders) with its parameters in a transaction; the rows it returns, if any.
Run = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]


@contextlib.contextmanager
def transaction(pool: ConnectionPool[psycopg.Connection[Any]], failure: Callable[[psycopg.Error], Exception]
                ) -> Iterator[Run]:
    """One transaction on a connection of ``pool``, as a :data:`Run` (the statements written with SQLite's ``?``
    placeholders, as the SQLite twin of a store runs them); a psycopg error is raised as ``failure(error)``."""
    try:
        with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            def run(statement: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
                cur.execute(statement.replace("?", "%s"), params)
                return cur.fetchall() if cur.description else []

            yield run
    except psycopg.Error as exc:
        raise failure(exc) from exc
