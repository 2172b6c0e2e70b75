"""Which index and blob store the suite's servers and archives run on: ``BASTION_TEST_BACKEND``.

``embedded`` (the default): SQLite and a directory under each server's data directory. ``postgresql+s3``: a
PostgreSQL schema of its own (in the database ``BASTION_TEST_POSTGRESQL``, default the local ``test``) and a
prefix of its own in the session's SeaweedFS bucket (``s3test``), both named after the data directory, so a
server restarted on its data directory finds its archive again, and a test's second node on another data
directory can be pointed at the first's (:func:`locations`).

A test that inspects the embedded backends' own files (the blob directory, the SQLite file, the journal) says so
with :data:`embedded_only`: on the other leg it is skipped, because there is nothing of the kind to inspect.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

BACKEND = os.environ.get("BASTION_TEST_BACKEND", "embedded")
if BACKEND not in ("embedded", "postgresql+s3"):
    raise RuntimeError(f"BASTION_TEST_BACKEND={BACKEND!r}: expected 'embedded' or 'postgresql+s3'")
REMOTE = BACKEND == "postgresql+s3"
#: The database the remote leg's schemas are made in.
POSTGRESQL = os.environ.get("BASTION_TEST_POSTGRESQL", "postgresql://postgres@127.0.0.1:5432/test")

#: Marks a test of the embedded backends' files (see the module docstring).
embedded_only = pytest.mark.skipif(REMOTE, reason="inspects the embedded index's or blob directory's files")

_lock = threading.Lock()
_seaweed: list[Any] = []  # [the session's Seaweed (s3test.acquire)] once the first remote archive opens
_schemas: set[str] = set()


def _name(data: Path) -> str:
    return "t_" + hashlib.sha256(str(Path(data).resolve()).encode()).hexdigest()[:20]


def locations(data: Path) -> dict[str, str]:
    """The ``index`` and ``blobs`` settings of the archive whose data directory is ``data`` ({} when embedded)."""
    return remote_locations(data) if REMOTE else {}


def remote_locations(data: Path) -> dict[str, str]:
    """PostgreSQL and S3 locations for the archive whose data directory is ``data``, whatever the leg (for the
    tests of several nodes, which need them on either)."""
    import s3test

    name = _name(data)
    with _lock:
        if not _seaweed:
            _seaweed.append(s3test.acquire())
            os.environ.setdefault("AWS_ACCESS_KEY_ID", _seaweed[0].access_key)
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", _seaweed[0].secret_key)
        if name not in _schemas:
            import psycopg

            with psycopg.connect(POSTGRESQL, autocommit=True) as conn:
                conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{name}"')
            _schemas.add(name)
        seaweed = _seaweed[0]
    separator = "&" if "?" in POSTGRESQL else "?"
    return {"index": f"{POSTGRESQL}{separator}bastion_schema={name}", "blobs": seaweed.location(prefix=name)}


def environment(data: Path) -> dict[str, str]:
    """:func:`locations` as ``BASTION_*`` variables, with the S3 credentials, for a server's environment."""
    return remote_environment(data) if REMOTE else {}


def environment_for_command(data: Path) -> dict[str, str]:
    """:func:`environment` for a server or CLI command on the archive in ``data``, unless ``data`` holds an
    embedded archive already (a test that opened one there with settings of its own): {} then."""
    return environment(data) if REMOTE and not (Path(data) / "index.sqlite3").exists() else {}


def remote_environment(data: Path) -> dict[str, str]:
    """:func:`remote_locations` as ``BASTION_*`` variables, with the S3 credentials."""
    found = remote_locations(data)
    return {"BASTION_INDEX": found["index"], "BASTION_BLOBS": found["blobs"],
            "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"]}


def mirrored_objects(data: Path, name_prefix: str = "") -> list[Path]:
    """The objects stored in the S3 prefix of the archive in ``data``, and in its landing in PostgreSQL
    (:mod:`bastion.blobs.landing`), those whose name starts with ``name_prefix``, each copied to a file of the same
    key under ``<data>-s3-mirror``, for a test that reads the stored bytes (a copy: changing it changes nothing
    stored). Names starting with ``.`` are left out."""
    name = _name(data)
    with _lock:
        seaweed = _seaweed[0]
    client = seaweed.client()
    mirror = Path(f"{data}-s3-mirror")
    shutil.rmtree(mirror, ignore_errors=True)
    found = {}
    for key, data_bytes in _landed(name):  # before the bucket: an object moved meanwhile is then in the bucket
        if key.rsplit("/", 1)[-1].startswith(name_prefix):
            found[key] = data_bytes
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=seaweed.bucket, Prefix=f"{name}/"):
        for item in page.get("Contents", []):
            key = item["Key"][len(name) + 1:]
            if any(part.startswith(".") for part in key.split("/")) or not key.rsplit("/", 1)[-1].startswith(name_prefix):
                continue
            found[key] = None
            target = mirror / key
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(seaweed.bucket, item["Key"], str(target))
    for key, landed in found.items():
        if landed is not None:
            target = mirror / key
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(landed)
    return sorted(mirror / key for key in found)


def _landed(schema: str) -> list[tuple[str, bytes]]:
    """The keys and bytes of the objects in the landing of the index in ``schema`` (none before it has one)."""
    import psycopg

    with psycopg.connect(POSTGRESQL, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass(%s)", (f'"{schema}".blob_landing',)).fetchone() == (None,):
            return []
        return [(key, bytes(data)) for key, data in conn.execute(f'SELECT key, data FROM "{schema}".blob_landing')]


def unfinished_uploads(data: Path) -> list[str]:
    """The multipart uploads begun in the archive's S3 prefix and neither completed nor aborted: what S3 holds of
    an object being received (the filesystem store's spool files)."""
    name = _name(data)
    with _lock:
        seaweed = _seaweed[0]
    answer = seaweed.client().list_multipart_uploads(Bucket=seaweed.bucket, Prefix=f"{name}/")
    return [upload["Key"] for upload in answer.get("Uploads", [])]


def tear_down() -> None:
    """Drop the schemas made and stop SeaweedFS (end of the session)."""
    with _lock:
        if _schemas:
            import psycopg

            with contextlib.suppress(psycopg.Error), psycopg.connect(POSTGRESQL, autocommit=True) as conn:
                for name in _schemas:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
            _schemas.clear()
        if _seaweed:
            import s3test

            s3test.release()
            _seaweed.clear()
