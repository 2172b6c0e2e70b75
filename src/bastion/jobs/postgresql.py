"""Jobs in the PostgreSQL database and schema of the index (``postgresql://...?bastion_schema=NAME``).

The tables ``jobs`` and ``job_progress`` are made by the index's migrations
(``index/migrations/postgresql/0002_jobs.sql``), applied here as the index applies them, so that either may be
opened first. Leases are times of the database's clock (``now()``), so nodes whose clocks disagree still agree
on whose lease ran out. A job is claimed with ``FOR UPDATE SKIP LOCKED``: claimers never wait for each other and
never get the same job.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any

import psycopg
from psycopg import Connection
from psycopg_pool import ConnectionPool

from bastion.errors import IndexFailure
from bastion.index.pg_schema import (
    Location,
    migrated_pool,
    one_line,
    parse_location,
    transaction,
)
from bastion.jobs.base import LEASE_SECONDS
from bastion.jobs.sql import Dialect, Run, SqlJobs

#: The connections one process keeps for its jobs (a handler's statements, the runner's, lease renewals).
POOL_MAX = 4


def _as_datetime(value: Any) -> datetime:
    assert isinstance(value, datetime)
    return value


POSTGRESQL = Dialect(now="now()", seconds="(? * interval '1 second')", json="CAST(? AS jsonb)",
                     lock=" FOR UPDATE", skip_locked=" FOR UPDATE SKIP LOCKED", to_datetime=_as_datetime)


class PostgresJobs(SqlJobs):
    """:class:`~bastion.jobs.base.Jobs` in the index's PostgreSQL schema."""

    def __init__(self, location: str, lease_seconds: float = LEASE_SECONDS) -> None:
        super().__init__(POSTGRESQL, lease_seconds)
        self._where: Location = parse_location(location)
        try:
            self._pool: ConnectionPool[Connection[Any]] = migrated_pool(
                self._where, "bastion-jobs", POOL_MAX, check=ConnectionPool.check_connection)
        except psycopg.Error as exc:
            raise self._failure(exc) from exc

    def _failure(self, exc: psycopg.Error) -> IndexFailure:
        return IndexFailure(f"jobs in PostgreSQL at {self._where.where}: {one_line(exc)}")

    def _transaction(self) -> contextlib.AbstractContextManager[Run]:
        return transaction(self._pool, self._failure)

    def close(self) -> None:
        self._pool.close()
