"""What every drill is made of: a real ``bastion serve`` in its own process group on a throw-away data
directory and free loopback ports (:class:`ServerProcess`), small distinct instances (:func:`make_instances`), a
C-STORE loader that counts an instance only once its C-STORE was answered with success or a warning
(:class:`Loader`) and a look at the files of filesystem stores (:func:`store_files`); what is read back over
DICOMweb is :mod:`bastion.drills.readback`.

It drives the server from the outside only (processes, sockets, files), as an operator would: nothing here
imports the server's own layers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

AET = "BASTION"
CALLING_AET = "DRILL"
HOST = "127.0.0.1"
#: The sample every drill instance is made from (pydicom ships it): a 39 KB CT in Explicit VR Little Endian.
SAMPLE = "CT_small.dcm"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
#: What a WADO-RS retrieve asks for: the object as stored.
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: A blob key's file name: ``<SOP Instance UID>_<stamp>_<node>_<digest>.dcm``.
KEY_RE = re.compile(r"^(?P<sop>[0-9.]+)_(?P<stamp>[^_]+)_(?P<node>.+)_(?P<digest>(?:b3-)?[0-9a-f]{64})\.dcm$")


def digest(data: bytes) -> str:
    """The digest Bastion names a stored object by (``b3-`` + BLAKE3 hex)."""
    return "b3-" + blake3.blake3(data).hexdigest()


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]


def acknowledged_status(status: int) -> bool:
    """True for a C-STORE status that acknowledges the instance: success, or a warning (0x0001, 0x0107,
    0x0116, 0xB000-0xBFFF); a failure (0xA..., 0xC...) or no answer at all does not."""
    return status == 0x0000 or status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF


# -- instances -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Instance:
    """One generated instance: its UIDs, its Part 10 file (sent as it is) and the digest of its dataset."""

    study: str
    series: str
    sop: str
    path: Path = field(compare=False)
    digest: str = field(compare=False)  # of the dataset sent: the file's, after its File Meta group

    @property
    def encoded(self) -> bytes:
        """The dataset as sent (Explicit VR Little Endian)."""
        return dataset_part(self.path.read_bytes())


#: Instances a series, and series a study, of :func:`make_instances`.
PER_SERIES, SERIES_PER_STUDY = 10, 3
STUDY_SIZE = PER_SERIES * SERIES_PER_STUDY


def make_instances(count: int, directory: Path, per_series: int = PER_SERIES,
                   series_per_study: int = SERIES_PER_STUDY) -> list[Instance]:
    """``count`` distinct small CT instances made from pydicom's ``CT_small.dcm``, written into ``directory``:
    new Study, Series and SOP Instance UIDs (``per_series`` instances a series, ``series_per_study`` series a
    study), patient and instance number, and a few pixel bytes of their own. Only their files hold their bytes,
    so a drill of many instances needs disk, not memory."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    source = get_testdata_file(SAMPLE)
    if source is None:
        raise RuntimeError(f"pydicom's sample {SAMPLE} is not available")
    directory.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(source)
    pixels = bytearray(ds.PixelData)
    out: list[Instance] = []
    study = series = ""
    for i in range(count):
        if i % (per_series * series_per_study) == 0:
            study = generate_uid()
        if i % per_series == 0:
            series = generate_uid()
        sop = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.PatientID = f"DRILL{i // (per_series * series_per_study):05d}"
        ds.PatientName = f"Drill^Patient{i // (per_series * series_per_study):05d}"
        ds.StudyID = "1"
        ds.AccessionNumber = f"D{i // (per_series * series_per_study):07d}"
        ds.SeriesNumber = (i // per_series) % series_per_study + 1
        ds.InstanceNumber = i % per_series + 1
        pixels[:4] = i.to_bytes(4, "little")
        ds.PixelData = bytes(pixels)
        path = directory / f"{i:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(Instance(study, series, sop, path, digest(dataset_part(path.read_bytes()))))
    return out


def dataset_part(part10: bytes) -> bytes:
    """The dataset of a Part 10 file: what follows the File Meta group (group 0002, explicit VR LE)."""
    if part10[128:132] != b"DICM":
        raise ValueError("not a Part 10 file")
    pos = 132
    while True:
        group = int.from_bytes(part10[pos: pos + 2], "little")
        if group != 0x0002:
            return part10[pos:]
        vr = part10[pos + 4: pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV"):
            pos += 12 + int.from_bytes(part10[pos + 8: pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(part10[pos + 6: pos + 8], "little")


# -- the server ------------------------------------------------------------------------------------------------
@dataclass
class ServerProcess:
    """``bastion serve`` on ``data`` in its own process group (``start_new_session``), on ports fixed at the
    first start and kept across restarts, logging to ``<workdir>/server-<n>.log``."""

    workdir: Path
    data: Path
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    dicom_port: int = 0
    http_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        if not self.dicom_port:
            self.dicom_port, self.http_port = free_ports(2)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"server-{self.starts}.log"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "bastion.cli.main", "serve", "--data", str(self.data), "--host", HOST,
                "--aet", AET, "--dicom-port", str(self.dicom_port), "--http-port", str(self.http_port),
                *self.extra_args]

    def launch(self) -> float:
        """Start the server (without waiting); the monotonic time it was started at."""
        self.starts += 1
        # The settings come from the arguments and ``env`` alone (BASTION_PURE_PYTHON, a build choice, stays).
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_") or k == "BASTION_PURE_PYTHON"}
        env.update(self.env)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        return time.monotonic()

    def start(self, timeout: float = 60.0) -> float:
        """Start the server and wait until it serves (:meth:`wait_serving`); the seconds that took."""
        t0 = self.launch()
        return self.wait_serving(t0, timeout)

    def health(self) -> dict[str, Any] | None:
        """``GET /health`` as JSON, or ``None`` when nothing answers."""
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=2) as rsp:
                return dict(json.loads(rsp.read()))
        except urllib.error.HTTPError as exc:
            with contextlib.suppress(ValueError):
                return dict(json.loads(exc.read()))
            return {"status": f"HTTP {exc.code}"}
        except (OSError, ValueError):
            return None

    def wait_serving(self, since: float, timeout: float = 60.0, states: Iterable[str] = ("ok",)) -> float:
        """Wait until ``/health`` says one of ``states`` and a C-ECHO succeeds; seconds from ``since``."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"bastion serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            h = self.health()
            if h is not None and h.get("status") in wanted and c_echo(self.dicom_port):
                return time.monotonic() - since
            time.sleep(0.02)
        raise TimeoutError(f"bastion serve not serving {timeout:.0f} s after its start:\n{self.log_tail()}")

    def kill_group(self) -> None:
        """SIGKILL the server's whole process group at once (supervisor, workers, warmer) and reap it."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, grace: float = 40.0) -> None:
        """SIGTERM the process group (a clean shutdown), SIGKILL what is left after ``grace`` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def log_tail(self, lines: int = 25) -> str:
        path = self.log_path
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def bastion_command(*args: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    """Run a ``bastion`` command (e.g. ``verify --data D``) with settings from ``args`` alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_") or k == "BASTION_PURE_PYTHON"}
    return subprocess.run([sys.executable, "-m", "bastion.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, env=env)


# -- DIMSE -----------------------------------------------------------------------------------------------------
def _quiet_pynetdicom() -> None:
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def _ae(timeout: float = 10.0) -> Any:
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

    _quiet_pynetdicom()
    _config.STORE_SEND_CHUNKED_DATASET = True  # a file's dataset goes out as its bytes are, never decoded
    ae = AE(ae_title=CALLING_AET)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = 2
    ae.add_requested_context(CTImageStorage, [EXPLICIT_VR_LITTLE_ENDIAN])
    ae.add_requested_context(Verification)
    return ae


def c_echo(port: int) -> bool:
    """True if a C-ECHO to the server on ``port`` succeeds."""
    assoc = _ae(timeout=5.0).associate(HOST, port, ae_title=AET)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0
    finally:
        assoc.release()


class Loader:
    """C-STORE ``instances`` over ``threads`` parallel associations of ``per_association`` instances each.

    An instance is acknowledged only when its C-STORE was answered with a success or warning status. One
    that got no answer (the connection died) or a failure status goes back to the queue and is sent again on
    a new association, once the server accepts one, until :meth:`stop` or every instance is acknowledged.
    ``on_ack`` is called with each acknowledged instance.
    """

    def __init__(self, port: int, instances: Sequence[Instance], *, threads: int = 2, per_association: int = 10,
                 on_ack: Callable[[Instance], None] | None = None, retry: bool = True) -> None:
        self.port = port
        self.pending: list[Instance] = list(reversed(instances))
        self.threads = threads
        self.per_association = per_association
        self.on_ack = on_ack
        self.retry = retry
        self.acked: dict[str, Instance] = {}
        #: status -> C-STOREs answered so (acknowledged or not; -1: no answer, -2: no presentation context)
        self.statuses: dict[int, int] = {}
        self.failed: dict[str, int] = {}  # SOP Instance UID -> last failure status
        self.sent = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._run, name=f"drill-loader-{i}", daemon=True)
                         for i in range(threads)]

    def start(self) -> Loader:
        for t in self._workers:
            t.start()
        return self

    def stop(self) -> None:
        """Stop sending (each thread finishes the C-STORE it is in) and wait for the threads."""
        self._stop.set()
        self.join()

    def join(self, timeout: float | None = None) -> None:
        for t in self._workers:
            t.join(timeout)

    @property
    def done(self) -> bool:
        return not any(t.is_alive() for t in self._workers)

    def _take(self, n: int) -> list[Instance]:
        with self._lock:
            batch = [self.pending.pop() for _ in range(min(n, len(self.pending)))]
            self._in_flight += len(batch)
            return batch

    def _give_back(self, unsent: Sequence[Instance], taken: int) -> None:
        with self._lock:
            self._in_flight -= taken
            if self.retry:
                self.pending.extend(reversed(unsent))

    def _count(self, status: int) -> None:
        with self._lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1

    def _run(self) -> None:
        ae = _ae()
        while not self._stop.is_set():
            batch = self._take(self.per_association)
            if not batch:
                with self._lock:
                    if self._in_flight == 0 and not self.pending:
                        return
                time.sleep(0.05)
                continue
            assoc = ae.associate(HOST, self.port, ae_title=AET)
            if not assoc.is_established:
                self._give_back(batch, len(batch))
                if not self.retry:
                    return
                self._stop.wait(0.1)
                continue
            done = 0
            try:
                for inst in batch:
                    if self._stop.is_set() or not assoc.is_established:
                        break
                    try:
                        rsp = assoc.send_c_store(inst.path)
                        status = int(rsp.Status) if rsp and "Status" in rsp else -1
                    except (RuntimeError, OSError):  # the association went away between two C-STOREs
                        break
                    except ValueError:  # the server accepted no presentation context for it
                        status = -2
                    done += 1
                    self._count(status)
                    with self._lock:
                        self.sent += 1
                        if acknowledged_status(status):
                            self.acked[inst.sop] = inst
                            self.failed.pop(inst.sop, None)
                        else:
                            self.failed[inst.sop] = status
                            if self.retry:
                                self.pending.insert(0, inst)  # sent again last
                    if acknowledged_status(status) and self.on_ack is not None:
                        self.on_ack(inst)
                    if status == -1:  # no answer: the association died with the server
                        break
                    if status == -2:
                        self._stop.wait(0.1)
                        break
            finally:
                with contextlib.suppress(Exception):
                    if assoc.is_established:
                        assoc.release()
                    else:
                        assoc.abort()
                self._give_back(batch[done:], len(batch))


# -- filesystem stores -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredFile:
    path: Path
    sop: str
    digest: str


def store_files(root: Path) -> Iterator[StoredFile]:
    """The stored objects of the filesystem store at ``root``: every ``*.dcm`` named as a blob key, outside
    the store's own dot-directories (journal, spool, quarantine)."""
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            m = KEY_RE.match(name)
            if m:
                yield StoredFile(Path(dirpath) / name, m.group("sop"), m.group("digest"))


def stray_files(root: Path) -> list[Path]:
    """Files of the store at ``root`` outside its dot-directories that are not named as a blob key (a
    half-written object under a temporary name, say)."""
    out: list[Path] = []
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [Path(dirpath) / n for n in filenames if not KEY_RE.match(n)]
    return out


def file_digest(path: Path) -> str | None:
    """The digest of the file at ``path`` (``None`` if it cannot be read)."""
    try:
        return digest(path.read_bytes())
    except OSError:
        return None


def intact_copies(root: Path, sops: set[str]) -> set[str]:
    """Those of ``sops`` that have a file in the store at ``root`` whose bytes match the digest in its name."""
    found: set[str] = set()
    for f in store_files(root):
        if f.sop in sops and f.sop not in found and file_digest(f.path) == f.digest:
            found.add(f.sop)
    return found


def flip_byte(path: Path, rng: random.Random) -> int:
    """Flip every bit of one random byte of the file at ``path`` in place (its size unchanged); its offset."""
    size = path.stat().st_size
    offset = rng.randrange(size)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))
        fh.flush()
        os.fsync(fh.fileno())
    return offset
