"""A PostgreSQL schema of its own for a test: :func:`pg_url` makes one in the test database and drops it after.

The database is ``BASTION_TEST_POSTGRESQL`` (default ``postgresql://postgres@127.0.0.1:5432/test``, the local
server with trust authentication). Where it cannot be reached the test is skipped, and fails under ``CI=true``
(:func:`conftest.unavailable`).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from conftest import unavailable
from psycopg import sql

from bastion.blobs.landing import LandingStore
from bastion.blobs.s3 import S3BlobStore
from bastion.index.pg_schema import migrated_pool, parse_location

#: The database the tests' schemas are made in.
POSTGRESQL = os.environ.get("BASTION_TEST_POSTGRESQL", "postgresql://postgres@127.0.0.1:5432/test")


def admin() -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit connection to the test database (the test is skipped, or fails in CI, if there is none)."""
    try:
        return psycopg.connect(POSTGRESQL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL at {POSTGRESQL} unreachable: {' '.join(str(exc).split())}")


def with_schema(url: str, schema: str) -> str:
    """``url`` naming the index's schema ``schema`` (``bastion_schema``)."""
    return f"{url}{'&' if '?' in url else '?'}bastion_schema={schema}"


@contextlib.contextmanager
def pg_url() -> Iterator[str]:
    """The location of an index in a new, empty schema of the test database; the schema is dropped after."""
    name = f"t_{uuid.uuid4().hex[:20]}"
    with admin() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield with_schema(POSTGRESQL, name)
    finally:
        with admin() as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def pg_location() -> Iterator[str]:
    """:func:`pg_url` as a fixture."""
    with pg_url() as url:
        yield url


def landing_store(store: S3BlobStore, location: str, *, max_bytes: int = 1024 * 1024,
                  total_bytes: int = 1 << 30) -> LandingStore:
    """``store`` with the landing (:mod:`bastion.blobs.landing`) in the index schema at ``location`` in front."""
    where = parse_location(location)
    return LandingStore(store, migrated_pool(where, "test-landing", 4, application="test-landing"),
                        max_bytes=max_bytes, total_bytes=total_bytes)
