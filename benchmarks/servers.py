"""Start and stop the servers under benchmark: Orthanc (the reference) and Bastion.

Each server runs in its own fresh temporary directory on free ports, in its own process group, with
``TCP_NODELAY=1`` in its environment (DCMTK's network layer, used by Orthanc, enables Nagle otherwise). The
context managers wait until the server answers over HTTP and accepts DICOM connections, sample the resident
memory of the server's process group every 50 ms, and kill the whole group on exit.

On PostgreSQL (the local server of :data:`POSTGRESQL`, trust authentication): ``orthanc(postgresql=True)`` runs
Orthanc with Debian's ``orthanc-postgresql`` plugins, index and storage in a fresh database that is dropped
afterwards (:func:`pg_database`); :func:`bastion_pg` runs Bastion on a fresh schema (:func:`pg_schema`) and a
fresh prefix of a SeaweedFS bucket (:func:`seaweedfs`). :class:`CpuMeter` counts the CPU a server's process
group, SeaweedFS and the PostgreSQL backends serving a server use between two points.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ORTHANC_BINARY = "/usr/sbin/Orthanc"
ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
#: Debian's ``orthanc-postgresql`` (``apt-get install orthanc-postgresql``): index and storage plugins.
ORTHANC_POSTGRESQL_PLUGINS = ("/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so",
                              "/usr/share/orthanc/plugins/libOrthancPostgreSQLStorage.so")
#: The PostgreSQL database the benchmarks make their databases and schemas from (trust authentication).
POSTGRESQL = os.environ.get("BASTION_BENCH_POSTGRESQL", "postgresql://postgres@127.0.0.1:5432/test")
#: The bucket of the SeaweedFS a benchmark starts (:func:`seaweedfs`); each server gets a fresh prefix of it.
S3_BUCKET = "bastion-bench"
TESTS_DIR = Path(__file__).resolve().parents[1] / "tests"
BASTION_BINARY = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "bastion")
HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 60.0
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

ArgvFactory = Callable[[Path, int, int], list[str]]  # (workdir, dicom_port, http_port) -> argv


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct ports that are free on all interfaces (Orthanc cannot bind one address)."""
    with ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)
        ]
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]


def group_pids(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` (a scan of all of ``/proc``: about 4 ms of CPU here)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:  # the process exited meanwhile
            continue
        if int(fields[2]) == pgid:  # fields after "comm)": state ppid pgrp
            pids.append(int(entry.name))
    return pids


def rss_bytes(pids: list[int], anonymous: bool = False) -> int:
    """The summed resident set size of ``pids`` (those that have exited count 0); with ``anonymous``, only their
    anonymous memory (``RssAnon``: not the pages of files they map)."""
    total = 0
    for pid in pids:
        try:
            if anonymous:
                with open(f"/proc/{pid}/status", "rb") as status:
                    total += next((int(line.split()[1]) * 1024 for line in status if line.startswith(b"RssAnon:")), 0)
            else:
                with open(f"/proc/{pid}/statm", "rb") as statm:
                    total += int(statm.read().split()[1]) * PAGE_SIZE
        except (OSError, IndexError, ValueError):
            continue
    return total


class PeakRssSampler:
    """Background thread that records the peak RSS of a process group, sampling every 50 ms.

    It looks for the group's processes at every sample for the first seconds (while a server forks its
    workers), then once a second, and reads only theirs in between: scanning all of ``/proc`` every 50 ms took
    about 9 % of a core, which on a two-core machine came out of the server's share in the CPU-bound cells (four
    associations) more than in the others. A process started later that ends within one second is not counted
    (the servers measured here start theirs once, at the beginning).
    """

    RESCAN_S = 1.0
    STARTUP_S = 5.0

    def __init__(self, pgid: int, interval_s: float = 0.05) -> None:
        self.pgid = pgid
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pgid}", daemon=True)

    def _run(self) -> None:
        members: list[int] = []
        started = rescan_at = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= rescan_at:
                members = group_pids(self.pgid)
                rescan_at = now + (self.RESCAN_S if now - started >= self.STARTUP_S else 0.0)
            self.peak_bytes = max(self.peak_bytes, rss_bytes(members))
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> None:
        """Start sampling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling after one last sample."""
        self._stop.set()
        self._thread.join()


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """GET ``url``; return status and body (HTTP errors are returned, not raised)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@dataclass
class Server:
    """A running server: where to reach it, and its process group's peak RSS (final once stopped)."""

    name: str
    aet: str
    dicom_port: int
    http_port: int
    workdir: Path
    process: subprocess.Popen[bytes]
    sampler: PeakRssSampler = field(repr=False)
    #: The pids of the PostgreSQL backends serving this server's connections (None: it uses no PostgreSQL).
    pg_backends: Callable[[], list[int]] | None = field(default=None, repr=False)
    #: How many objects wait in Bastion's landing for the bucket (None: no landing).
    landed: Callable[[], int] | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        """Root URL of the HTTP interface."""
        return f"http://{HOST}:{self.http_port}"

    @property
    def peak_rss_bytes(self) -> int:
        """Highest summed RSS of the server process and its children seen so far."""
        return self.sampler.peak_bytes

    def get_json(self, path: str) -> Any:
        """GET ``path`` on the HTTP interface and decode JSON; ``None`` if the server answers 404."""
        status, body = http_get(self.base_url + path)
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError(f"{self.name}: GET {path} answered {status}: {body[:200]!r}")
        return json.loads(body)

    def log_tail(self, lines: int = 30) -> str:
        """Return the last lines of the server's combined stdout/stderr."""
        log = self.workdir / "server.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _wait_ready(server: Server, ready_path: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            http_ok = not ready_path or http_get(server.base_url + ready_path, timeout_s=1.0)[0] == 200
            if http_ok and _port_open(server.dicom_port):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{server.name} not ready after {STARTUP_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate the process group, then kill it if it has not exited within 15 s."""
    for sig, grace_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace_s)
            break
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def _run_server(
    name: str, aet: str, argv_for: ArgvFactory, ready_path: str, base_dir: Path | None,
    env: Mapping[str, str] | None = None,
) -> Iterator[Server]:
    """Run ``argv_for(workdir, dicom_port, http_port)`` in a fresh directory until the block exits.

    Without ``base_dir`` the directory is deleted when the block exits. With one, it is left inside ``base_dir``
    for the caller to delete once all its measurements are done: on an ext4 without a journal, as on the
    development VM, the kernel skips inodes freed in the last 60-300 s when it allocates new ones, so deleting
    one server's thousand files made the next server's file creations scan past them (perf, Bastion over one
    association right after such deletions: a third of the busy CPU in ``recently_deleted``; its kernel CPU per
    small instance was 1.07 ms then, 0.29 ms after five quiet minutes).
    """
    with contextlib.ExitStack() as stack:
        if base_dir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"bench-{name}-")))
        else:
            workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=base_dir))
        dicom_port, http_port = free_ports(2)
        argv = argv_for(workdir, dicom_port, http_port)
        with open(workdir / "server.log", "wb") as log:
            process = subprocess.Popen(
                argv, cwd=workdir, env={**os.environ, **(env or {}), "TCP_NODELAY": "1"}, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True
            )
        sampler = PeakRssSampler(process.pid)
        sampler.start()
        server = Server(name, aet, dicom_port, http_port, workdir, process, sampler)
        try:
            _wait_ready(server, ready_path)
            yield server
        finally:
            _stop(process)
            sampler.stop()


@contextmanager
def orthanc(dicomweb: bool = False, base_dir: Path | None = None, postgresql: bool = False) -> Iterator[Server]:
    """Run Debian's Orthanc with an empty storage, optionally with the DICOMweb plugin.

    With ``postgresql``, named ``orthanc-pg``: index and storage in a fresh PostgreSQL database (dropped
    afterwards) through the ``orthanc-postgresql`` plugins, configured as the package's README says
    (``EnableIndex`` and ``EnableStorage``, a ``ConnectionUri``; its other settings the package's defaults).
    """
    missing = [path for path in ORTHANC_POSTGRESQL_PLUGINS if postgresql and not Path(path).exists()]
    if missing:  # Orthanc would start without them, on SQLite and files: a comparison with the wrong peer
        raise SystemExit(f"orthanc-pg: {', '.join(missing)} missing: apt-get install orthanc-postgresql")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(pg_database("bench_orthanc")) if postgresql else ""
        database = urllib.parse.urlsplit(url).path.lstrip("/")
        name = "orthanc-pg" if postgresql else "orthanc"
        argv_for = _orthanc_argv(dicomweb, url)
        server = stack.enter_context(_run_server(name, "ORTHANC", argv_for, "/system", base_dir))
        if postgresql:
            server.pg_backends = lambda: pg_backend_pids("datname = %s", (database,))
        yield server


def _orthanc_argv(dicomweb: bool, postgresql_url: str) -> ArgvFactory:
    """The argv factory of :func:`orthanc` (its configuration file written into the server's directory)."""

    def argv_for(workdir: Path, dicom_port: int, http_port: int) -> list[str]:
        config: dict[str, Any] = {
            "Name": "bench-orthanc",
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": "ORTHANC",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "RemoteAccessAllowed": False,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
        }
        plugins = []
        if dicomweb:
            plugins.append(ORTHANC_DICOMWEB_PLUGIN)
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        if postgresql_url:
            plugins.extend(ORTHANC_POSTGRESQL_PLUGINS)
            config["PostgreSQL"] = {"EnableIndex": True, "EnableStorage": True, "ConnectionUri": postgresql_url}
        if plugins:
            config["Plugins"] = plugins
        (workdir / "config.json").write_text(json.dumps(config, indent=2))
        return [ORTHANC_BINARY, str(workdir / "config.json")]

    return argv_for


@contextmanager
def bastion(extra_args: Sequence[str] = (), base_dir: Path | None = None, env: Mapping[str, str] | None = None,
            name: str = "bastion", copies: int = 1, data: Path | None = None) -> Iterator[Server]:
    """Run ``bastion serve`` on an empty data directory, or on ``data`` (filled before); ``extra_args`` (e.g.
    ``--workers 2``) are appended, ``env`` added to its environment. ``copies`` > 1: that many blob stores
    (``<data>/blobs-1`` ...), a copy of every object in each."""

    def argv_for(workdir: Path, dicom_port: int, http_port: int) -> list[str]:
        return [
            BASTION_BINARY,
            "serve",
            "--data",
            str(data or workdir / "data"),
            "--host",
            HOST,
            "--aet",
            "BASTION",
            "--dicom-port",
            str(dicom_port),
            "--http-port",
            str(http_port),
            *(arg for n in range(1, copies + 1) for arg in ("--blobs", str(workdir / "data" / f"blobs-{n}"))
              if copies > 1),
            *extra_args,
        ]

    with _run_server(name, "BASTION", argv_for, "/health", base_dir, env) as server:
        yield server


@contextmanager
def bastion_shared(index_url: str, blobs: str, s3: S3 | None, extra_args: Sequence[str] = (),
                   base_dir: Path | None = None, node_id: str | None = None, landing_kb: int = 0,
                   name: str = "bastion-pg", landing_delay_s: float | None = None) -> Iterator[Server]:
    """Run ``bastion serve`` (named ``name``) on the PostgreSQL index ``index_url`` and the blob store ``blobs``
    (an ``s3://`` location of ``s3``, or a directory), as node ``node_id`` if given; ``landing_kb``: objects of up
    to that many KiB land in PostgreSQL first (``[landing] max_kb``, :mod:`bastion.blobs.landing`), and are moved
    into the bucket ``landing_delay_s`` later (None: Bastion's default)."""
    args = ["--index", index_url, "--blobs", blobs, *(["--node-id", node_id] if node_id else []), *extra_args]
    env = {**(s3.env if s3 else {}), **({"BASTION_LANDING_MAX_KB": str(landing_kb)} if landing_kb else {}),
           **({"BASTION_LANDING_DELAY_S": str(landing_delay_s)} if landing_delay_s is not None else {})}
    with bastion(args, base_dir, env, name) as server:
        apps = (_index_application(index_url), _index_application(index_url, "bastion-landing"))
        server.pg_backends = lambda: pg_backend_pids("application_name IN (%s, %s)", apps)
        if landing_kb:
            server.landed = lambda: landed_objects(index_url)
        yield server


@contextmanager
def bastion_pg(s3: S3, extra_args: Sequence[str] = (), base_dir: Path | None = None, landing_kb: int = 0,
               name: str = "bastion-pg", landing_delay_s: float | None = None) -> Iterator[Server]:
    """Bastion on a fresh PostgreSQL schema (:func:`pg_schema`, dropped afterwards) and a fresh prefix of
    ``s3``'s bucket (with the landing: see :func:`bastion_shared`)."""
    with pg_schema("bench_bastion") as url:
        with bastion_shared(url, s3.location(), s3, extra_args, base_dir, landing_kb=landing_kb, name=name,
                            landing_delay_s=landing_delay_s) as server:
            yield server


def landed_objects(index_url: str) -> int:
    """How many objects wait in the landing of the Bastion index at ``index_url`` (:mod:`bastion.blobs.landing`)."""
    from bastion.index.pg_schema import parse_location

    where = parse_location(index_url)
    with _admin_connect() as conn:
        row = conn.execute(f'SELECT count(*) FROM "{where.schema}".blob_landing').fetchone()
    return int(row[0]) if row else 0


@contextmanager
def dcmtk_storescp(base_dir: Path | None = None) -> Iterator[Server]:
    """DCMTK's own ``storescp`` (C++, writes files, no index, no fsync): the ceiling of the wire and client."""

    def argv_for(workdir: Path, dicom_port: int, http_port: int) -> list[str]:
        (workdir / "storage").mkdir()
        return ["/usr/bin/storescp", "-aet", "STORESCP", "-od", str(workdir / "storage"), str(dicom_port)]

    with _run_server("storescp", "STORESCP", argv_for, "", base_dir) as server:
        yield server


def instance_count(server: Server) -> int | None:
    """Number of instances the server holds, or ``None`` if it does not publish statistics."""
    if server.name == "storescp":
        return len(list((server.workdir / "storage").iterdir()))
    if server.name.startswith("orthanc"):
        return int(server.get_json("/statistics")["CountInstances"])
    stats = server.get_json("/api/statistics")
    if not isinstance(stats, dict):
        return None
    for key in ("CountInstances", "instances", "count_instances"):
        if isinstance(stats.get(key), int):
            return int(stats[key])
    return None


# -- PostgreSQL and S3 -------------------------------------------------------------------------------------------
def _admin_connect() -> Any:
    import psycopg

    return psycopg.connect(POSTGRESQL, autocommit=True, connect_timeout=10)


def _pg_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@contextmanager
def pg_database(prefix: str) -> Iterator[str]:
    """A new, empty database ``<prefix>_<random>`` on :data:`POSTGRESQL`'s server (its URL); dropped afterwards,
    whoever is still connected."""
    from psycopg import sql

    name = _pg_name(prefix)
    with _admin_connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urllib.parse.urlsplit(POSTGRESQL)._replace(path=f"/{name}").geturl()
    finally:
        with _admin_connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def with_schema(url: str, schema: str) -> str:
    """``url`` as a Bastion index location in schema ``schema``."""
    return f"{url}{'&' if '?' in url else '?'}bastion_schema={schema}"


@contextmanager
def pg_schema(prefix: str, keep: bool = False) -> Iterator[str]:
    """The Bastion index location of a schema ``<prefix>_<random>`` of :data:`POSTGRESQL` (Bastion creates it
    when it first opens the index); dropped afterwards unless ``keep``."""
    from psycopg import sql

    name = _pg_name(prefix)
    try:
        yield with_schema(POSTGRESQL, name)
    finally:
        if not keep:
            with _admin_connect() as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def _index_application(index_url: str, prefix: str = "") -> str:
    """The application name of the connections of the Bastion index at ``index_url`` (with ``prefix``: of those
    named ``<prefix>:<schema>``, the landing's)."""
    from bastion.index.pg_schema import application_name, parse_location

    schema = parse_location(index_url).schema
    return f"{prefix}:{schema}"[:63] if prefix else application_name(schema)


def pg_backend_pids(condition: str, params: Sequence[Any]) -> list[int]:
    """The pids of the PostgreSQL client backends matching ``condition`` (SQL on ``pg_stat_activity``), other
    than the one asking."""
    with _admin_connect() as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
                            f"AND pid <> pg_backend_pid() AND ({condition})", params).fetchall()
    return [int(row[0]) for row in rows]


@dataclass(frozen=True)
class S3:
    """A SeaweedFS started by :func:`seaweedfs`: its endpoint, credentials, bucket and process group."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    pgid: int

    @property
    def env(self) -> dict[str, str]:
        """The credentials, as a server's environment gives them."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def location(self, prefix: str | None = None) -> str:
        """The ``s3://`` location of ``prefix`` (default: a fresh one) in the bucket."""
        prefix = prefix or f"p-{uuid.uuid4().hex[:12]}"
        return f"s3://{self.bucket}/{prefix}?endpoint={self.endpoint}&region=us-east-1"


def _weed_pid(s3_port: int) -> int:
    """The pid of the ``weed`` process serving S3 on ``s3_port``."""
    flag = f"-s3.port={s3_port}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                argv = cmdline.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"weed") and flag in argv:
            return int(entry.name)
    raise RuntimeError(f"no weed process with {flag.decode()}")


@contextmanager
def seaweedfs() -> Iterator[S3]:
    """SeaweedFS ``weed mini`` on free loopback ports (the tests' :func:`s3test.seaweedfs`: its own process
    group, data in a temporary directory removed afterwards) with the bucket :data:`S3_BUCKET`."""
    if str(TESTS_DIR) not in sys.path:
        sys.path.append(str(TESTS_DIR))
    import s3test

    with s3test.seaweedfs(S3_BUCKET) as weed:
        port = urllib.parse.urlsplit(weed.endpoint).port
        assert port is not None
        yield S3(weed.endpoint, weed.access_key, weed.secret_key, S3_BUCKET, os.getpgid(_weed_pid(port)))


# -- CPU accounting ----------------------------------------------------------------------------------------------
def process_cpu_s(pid: int, children: bool = False) -> float:
    """User + system CPU seconds of ``pid`` so far (with ``children``, also of its children it has reaped);
    0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = fields[11:15] if children else fields[11:13]  # utime stime [cutime cstime] (fields 14-17)
    return sum(int(t) for t in ticks) / CLOCK_TICKS


def group_cpu_s(pgid: int) -> float:
    """CPU seconds used so far by process group ``pgid``: each member's own and its reaped children's. A member
    that exits and is reaped moves its time into its parent's, so the difference of two readings is exact as long
    as members are reaped by members (as a server's supervisor reaps its workers)."""
    return sum(process_cpu_s(pid, children=True) for pid in group_pids(pgid))


class CpuMeter:
    """CPU seconds by part from :meth:`start` on: parts that are process groups (``groups``: name -> pgids;
    exact, see :func:`group_cpu_s`) and parts that are sets of processes found anew at each reading
    (``processes``: name -> a function listing their pids, e.g. :func:`pg_backend_pids`; each one's own CPU,
    all of it for one that started after :meth:`start`, none of the last part of one that ended before a
    reading: :attr:`ended` counts those)."""

    def __init__(self, groups: Mapping[str, Iterable[int]],
                 processes: Mapping[str, Callable[[], Iterable[int]]] | None = None) -> None:
        self.groups = {name: list(pgids) for name, pgids in groups.items()}
        self.processes = dict(processes or {})
        self.ended: dict[str, int] = {}
        self._group_base: dict[str, float] = {}
        self._process_base: dict[str, dict[int, float]] = {}

    def group_total(self, name: str) -> float:
        """The CPU seconds of part ``name`` (a group part) so far."""
        return sum(group_cpu_s(pgid) for pgid in self.groups[name])

    def start(self) -> None:
        """Take the starting readings."""
        self._group_base = {name: self.group_total(name) for name in self.groups}
        self._process_base = {name: {pid: process_cpu_s(pid) for pid in set(lister())}
                              for name, lister in self.processes.items()}

    def read(self) -> dict[str, float]:
        """CPU seconds of each part since :meth:`start`."""
        used = {name: self.group_total(name) - base for name, base in self._group_base.items()}
        for name, lister in self.processes.items():
            base = self._process_base[name]
            pids = set(lister())
            used[name] = sum(process_cpu_s(pid) - base.get(pid, 0.0) for pid in pids)
            self.ended[name] = len(base.keys() - pids)
        return used

    def wait_idle(self, name: str, window_s: float = 1.0, below_s: float = 0.03, first_s: float = 2.0,
                  timeout_s: float = 120.0) -> float:
        """Wait until group part ``name`` used less than ``below_s`` CPU seconds over ``window_s``, at least
        ``first_s`` from now (a server may defer work, as Bastion's metadata warmer does while objects arrive),
        at most ``timeout_s``; the seconds waited."""
        t0 = time.monotonic()
        time.sleep(first_s)
        last = self.group_total(name)
        while time.monotonic() - t0 < timeout_s:
            time.sleep(window_s)
            now = self.group_total(name)
            if now - last < below_s:
                break
            last = now
        return time.monotonic() - t0


def cpu_meter(running: Sequence[Server], s3: S3 | None = None) -> CpuMeter:
    """A :class:`CpuMeter` of parts ``server`` (the process groups of ``running``), ``weed`` (``s3``'s, if given)
    and ``pg`` (the PostgreSQL backends serving ``running``, if any uses PostgreSQL)."""
    groups = {"server": [s.process.pid for s in running], **({"weed": [s3.pgid]} if s3 else {})}
    listers = [s.pg_backends for s in running if s.pg_backends is not None]

    def backends() -> set[int]:
        return {pid for lister in listers for pid in lister()}

    return CpuMeter(groups, {"pg": backends} if listers else None)


#: What the parts of :func:`cpu_meter` count, for a benchmark's output.
CPU_PARTS_NOTE = (
    "CPU per instance, from /proc (10 ms ticks): 'server' is the server's process group (Bastion: supervisor, "
    "workers, metadata warmer; Orthanc: its one process), during the send ('cpu') and until the group is idle "
    "again ('idle': with the work it deferred, such as Bastion's metadata warmer); 'weed' is SeaweedFS's process "
    "(Bastion's S3) and 'pg' the PostgreSQL client backends of the server's connections (pg_stat_activity pids: "
    "Orthanc's database, or Bastion's application name), both until idle. Not counted: PostgreSQL's walwriter, "
    "checkpointer and background writer (shared with whatever else uses the cluster) and the storescu clients.")
