"""A PostgreSQL primary with a synchronous streaming replica on loopback, made for a test and removed after.

``initdb`` and ``pg_basebackup -R`` as the ``postgres`` user under a temporary directory, each cluster on a free
port; ``synchronous_standby_names = '*'`` on the primary, since an asynchronous replica can lose commits that were
acknowledged (see shared/notes/interop-facts.md). :meth:`PgCluster.fail_over` stops the primary hard
(``immediate``) and promotes the replica; a libpq multi-host URL (:attr:`PgCluster.url`) with
``target_session_attrs=read-write`` finds whichever is primary.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import free_port, unavailable


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        unavailable(f"PostgreSQL server binaries ({name}) not installed")
    return found[-1]


def _as_postgres(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    command = list(args)
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stdout}{proc.stderr}")
    return proc


class PgCluster:
    """A primary and its synchronous replica (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.primary_dir, self.replica_dir = root / "primary", root / "replica"
        self.primary_port, self.replica_port = free_port(), free_port()

    @property
    def url(self) -> str:
        """A libpq multi-host URL naming both clusters; libpq connects to whichever accepts writes."""
        return (f"postgresql://postgres@127.0.0.1:{self.primary_port},127.0.0.1:{self.replica_port}/postgres"
                "?target_session_attrs=read-write&connect_timeout=3")

    def start(self) -> PgCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        _as_postgres(_bin("initdb"), "-D", str(self.primary_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                     "--no-sync")
        with open(self.primary_dir / "postgresql.conf", "a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {self.primary_port}\n"
                       f"unix_socket_directories = '{self.root}'\nwal_level = replica\nmax_wal_senders = 4\n"
                       "synchronous_standby_names = '*'\nsynchronous_commit = on\nfsync = on\n")
        with open(self.primary_dir / "pg_hba.conf", "a") as hba:
            hba.write("host replication postgres 127.0.0.1/32 trust\n")
        self._ctl(self.primary_dir, "start")
        _as_postgres(_bin("pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.primary_port), "-U", "postgres",
                     "-D", str(self.replica_dir), "-R", "-X", "stream", "--no-sync")
        with open(self.replica_dir / "postgresql.conf", "a") as conf:
            conf.write(f"port = {self.replica_port}\n")
        self._ctl(self.replica_dir, "start")
        self._wait_sync()
        return self

    def _ctl(self, data: Path, action: str, *extra: str) -> None:
        _as_postgres(_bin("pg_ctl"), "-D", str(data), "-l", str(data.parent / f"{data.name}.log"), "-w", action,
                     *extra)

    def _wait_sync(self, timeout: float = 60.0) -> None:
        """Until the primary sees its replica as synchronous (before that, commits would wait for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.primary_port), "-U", "postgres", "-Atc",
                                   "SELECT sync_state FROM pg_stat_replication"],
                                  capture_output=True, text=True, check=False)
            if proc.stdout.strip() == "sync":
                return
            time.sleep(0.2)
        raise TimeoutError("the replica never became synchronous")

    def fail_over(self) -> None:
        """Stop the primary at once (as a crash would) and promote the replica. The promoted server has no standby
        of its own yet, so it must stop waiting for one (``synchronous_standby_names``, which it took over from the
        primary): else every commit would wait for ever (what Patroni's synchronous mode does too)."""
        self._ctl(self.primary_dir, "stop", "-m", "immediate")
        self._ctl(self.replica_dir, "promote")
        for statement in ("ALTER SYSTEM SET synchronous_standby_names = ''", "SELECT pg_reload_conf()"):
            subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.replica_port), "-U", "postgres", "-Atqc",
                            statement], capture_output=True, text=True, check=True)

    def stop(self) -> None:
        for data in (self.replica_dir, self.primary_dir):
            if (data / "postmaster.pid").exists():
                with contextlib.suppress(RuntimeError):
                    self._ctl(data, "stop", "-m", "immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def pg_cluster() -> Iterator[PgCluster]:
    """A started :class:`PgCluster` in a new directory under the system's temporary directory (pytest's own are
    private to root, and the clusters run as ``postgres``)."""
    root = Path(tempfile.mkdtemp(prefix="bastion-pgcluster-"))
    root.chmod(0o755)
    cluster = PgCluster(root / "clusters")
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
