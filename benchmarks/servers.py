"""Start and stop the servers under benchmark: Orthanc (the reference) and Bastion.

Each server runs in its own fresh temporary directory on free ports, in its own process group, with
``TCP_NODELAY=1`` in its environment (DCMTK's network layer, used by Orthanc, enables Nagle otherwise). The
context managers wait until the server answers over HTTP and accepts DICOM connections, sample the resident
memory of the server's process group every 50 ms, and kill the whole group on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ORTHANC_BINARY = "/usr/sbin/Orthanc"
ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
BASTION_BINARY = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "bastion")
HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 60.0
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

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
    name: str, aet: str, argv_for: ArgvFactory, ready_path: str, base_dir: Path | None
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
        env = {**os.environ, "TCP_NODELAY": "1"}
        with open(workdir / "server.log", "wb") as log:
            process = subprocess.Popen(
                argv, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
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
def orthanc(dicomweb: bool = False, base_dir: Path | None = None) -> Iterator[Server]:
    """Run Debian's Orthanc with an empty storage, optionally with the DICOMweb plugin."""

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
        if dicomweb:
            config["Plugins"] = [ORTHANC_DICOMWEB_PLUGIN]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        (workdir / "config.json").write_text(json.dumps(config, indent=2))
        return [ORTHANC_BINARY, str(workdir / "config.json")]

    with _run_server("orthanc", "ORTHANC", argv_for, "/system", base_dir) as server:
        yield server


@contextmanager
def bastion(extra_args: Sequence[str] = (), base_dir: Path | None = None) -> Iterator[Server]:
    """Run ``bastion serve`` on an empty data directory; ``extra_args`` (e.g. ``--workers 2``) are appended."""

    def argv_for(workdir: Path, dicom_port: int, http_port: int) -> list[str]:
        return [
            BASTION_BINARY,
            "serve",
            "--data",
            str(workdir / "data"),
            "--host",
            HOST,
            "--aet",
            "BASTION",
            "--dicom-port",
            str(dicom_port),
            "--http-port",
            str(http_port),
            *extra_args,
        ]

    with _run_server("bastion", "BASTION", argv_for, "/health", base_dir) as server:
        yield server


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
    if server.name == "orthanc":
        return int(server.get_json("/statistics")["CountInstances"])
    stats = server.get_json("/api/statistics")
    if not isinstance(stats, dict):
        return None
    for key in ("CountInstances", "instances", "count_instances"):
        if isinstance(stats.get(key), int):
            return int(stats[key])
    return None
