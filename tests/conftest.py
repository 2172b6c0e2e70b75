"""Shared fixtures: a running Bastion on free ports, a DCMTK storescp destination, DCMTK runners,
and a generator of small synthetic studies (built on ``benchmarks/corpus.py``).

Everything is a real process on real sockets; ports come from binding port 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pydicom
import pytest
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
BASTION = str(VENV_BIN / "bastion")
sys.path.insert(0, str(ROOT / "benchmarks"))

import backends  # noqa: E402  (tests/backends.py: BASTION_TEST_BACKEND, the index and blob store servers run on)
import corpus  # noqa: E402  (benchmarks/corpus.py: the one synthetic-instance generator)

# DCMTK by absolute path: the venv's bin/ holds pynetdicom's tools of the same names.
DCMTK = {name: f"/usr/bin/{name}" for name in
         ("storescu", "findscu", "movescu", "getscu", "echoscu", "storescp", "dcmsend")}
HAVE_DCMTK = all(os.access(p, os.X_OK) for p in DCMTK.values())

#: Skip DCMTK tests only on a developer machine without DCMTK; in CI it is installed and must run.
requires_dcmtk = pytest.mark.skipif(not HAVE_DCMTK and not os.environ.get("CI"),
                                    reason="DCMTK not installed (scripts/install-test-deps.sh)")

def unavailable(reason: str) -> NoReturn:
    """Skip on a developer machine that lacks a tool, a sample or a privilege; fail under ``CI=true``, where
    ``scripts/install-test-deps.sh`` installs everything and a skip would hide a missing install step."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (under CI=true this fails instead of skipping)")
    pytest.skip(reason)


#: The headless-browser checks: Node.js scripts in tests/browser driving Debian's Chromium.
BROWSER_DIR = ROOT / "tests" / "browser"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")


def browser_missing() -> str | None:
    """Why the browser checks cannot run here (``None`` when Chromium, Node.js and playwright-core are there)."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"Chromium not installed at {CHROMIUM}"
    if shutil.which("node") is None:
        return "Node.js (node) not on PATH"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "tests/browser/node_modules missing (npm ci in tests/browser)"
    return None


@pytest.fixture(scope="session")
def browser() -> None:
    """Skip a browser test on a developer machine without the browser tooling; in CI, fail instead."""
    missing = browser_missing()
    if missing:
        message = f"{missing}: run scripts/install-test-deps.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def start_browser_check(script: str, *args: str | os.PathLike[str]) -> subprocess.Popen[str]:
    """Start ``node tests/browser/<script> ARGS...`` (it prints one JSON line on stdout)."""
    return subprocess.Popen(["node", str(BROWSER_DIR / script), *map(str, args)], cwd=BROWSER_DIR,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def browser_check_result(proc: subprocess.Popen[str], timeout: float = 120.0) -> dict[str, Any]:
    """Wait for a check started by :func:`start_browser_check`; its JSON report plus ``exit_code``."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # lib.mjs prints what it has so far, naming the step it was in
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"browser check timed out after {timeout}s: {out[-3000:]} {err[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"no JSON line from the browser check (exit {proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}"
    report: dict[str, Any] = json.loads(lines[-1])
    report["exit_code"] = proc.returncode
    return report


SERVER_AET = "BASTION"
DEST_AET = "DEST"
DOWN_AET = "DOWN"


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[Any] | None = None) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


def dcmtk_env() -> dict[str, str]:
    """The environment for DCMTK tools: TCP_NODELAY=1 is mandatory (see shared/notes/interop-facts.md)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def run_dcmtk(tool: str, *args: str | os.PathLike[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool by absolute path with TCP_NODELAY=1; stdout and stderr merged into ``.stdout``."""
    return subprocess.run([DCMTK[tool], *map(str, args)], env=dcmtk_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)


def run_bastion(*args: str | os.PathLike[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run the ``bastion`` CLI; ``.stdout`` and ``.stderr`` kept apart. A command given ``--data DIR`` runs on the
    leg's backends (:func:`backends.environment_for_command`)."""
    words = list(map(str, args))
    env = dict(os.environ)
    if "--data" in words[:-1]:
        env |= backends.environment_for_command(Path(words[words.index("--data") + 1]))
    return subprocess.run([BASTION, *words], capture_output=True, text=True, timeout=timeout, check=False, env=env)


# -- Part 10 helpers ---------------------------------------------------------------------------------
def dataset_part(data: bytes) -> bytes:
    """The dataset bytes of a Part 10 file: everything after the File Meta group (PS3.10 7.1).

    Walks the group 0002 elements itself (explicit VR little endian), independent of Bastion's code.
    """
    assert data[128:132] == b"DICM", "not a Part 10 file"
    pos = 132
    while True:
        group, _elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            return data[pos:]
        vr = data[pos + 4: pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV"):
            pos += 12 + struct.unpack_from("<I", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]


def transfer_syntax_of(path: str | os.PathLike[str]) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


# -- synthetic studies -----------------------------------------------------------------------------
@dataclass
class Study:
    """A generated study: its files and identifying attributes."""

    study_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    modalities: tuple[str, ...]  # one per series
    series: dict[str, list[Path]] = field(default_factory=dict)  # series UID -> files

    @property
    def files(self) -> list[Path]:
        return [f for files in self.series.values() for f in files]

    @property
    def sop_uids(self) -> list[str]:
        return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in self.files]


def make_study(out: Path, *, series: int = 2, per_series: int = 3, patient_id: str | None = None,
               patient_name: str | None = None, study_date: str = "20210315",
               modality: str | Sequence[str] = "CT",
               description: str = "TEST STUDY", kind: str = "small", accession: str | None = None) -> Study:
    """Write a study of ``series`` x ``per_series`` instances under ``out`` (fresh UIDs every call).

    Instances come from :func:`corpus.make_instance` (valid CT, explicit VR little endian) with the
    identifying attributes replaced.
    """
    out.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid(prefix=None)
    pid = patient_id or f"PID{study_uid[-8:]}"
    name = patient_name or f"Test^Patient{study_uid[-4:]}"
    modalities = (modality,) * series if isinstance(modality, str) else tuple(modality)
    assert len(modalities) == series, "one modality per series"
    study = Study(study_uid, pid, name, study_date, modalities)
    kind_ = corpus.KINDS[kind]
    n = 0
    for s in range(series):
        series_uid = f"{study_uid}.{s + 1}"
        study.series[series_uid] = []
        for i in range(per_series):
            ds = corpus.make_instance(kind_, n, max(series * per_series, 1))
            sop = f"{series_uid}.{i + 1}"
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.SOPInstanceUID = sop
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.FrameOfReferenceUID = f"{series_uid}.0"
            ds.PatientID = pid
            ds.PatientName = name
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
            ds.Modality = modalities[s]
            ds.StudyDescription = description
            ds.AccessionNumber = accession or f"A{study_uid[-10:]}"
            ds.SeriesNumber = s + 1
            ds.InstanceNumber = i + 1
            path = out / f"{sop}.dcm"
            ds.save_as(path, enforce_file_format=True)
            study.series[series_uid].append(path)
            n += 1
    return study


def relabel_sample(name: str, out: Path, *, study_uid: str, patient_name: str, patient_id: str,
                   series_number: int = 1, description: str = "RELABELLED SAMPLE") -> Path:
    """Copy pydicom's sample ``name`` to ``out`` under new Study/Series/SOP UIDs and patient identity.

    Only header elements change: compressed Pixel Data stays encapsulated exactly as shipped, in the
    file's own transfer syntax. Skips the test when the sample is not available offline.
    """
    from pydicom.data import get_testdata_file

    source = get_testdata_file(name)
    if source is None:
        unavailable(f"pydicom sample {name} not available (pydicom-data missing?)")
    ds = pydicom.dcmread(source)
    series_uid = f"{study_uid}.{series_number}"
    sop = f"{series_uid}.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    if "FrameOfReferenceUID" in ds:
        ds.FrameOfReferenceUID = f"{study_uid}.0"
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.StudyDescription, ds.SeriesNumber, ds.InstanceNumber = description, series_number, 1
    ds.AccessionNumber = f"R{study_uid[-10:]}"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{sop}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_phantom(size: int, z: float, index: int) -> Any:
    """A CT-like slice (stored values, intercept -1024) that looks like a body and changes along z.

    An elliptical water body in air with two lungs, a bone "spine", a sphere (radius 40 mm, centred at
    z = 0) whose disc grows and shrinks from slice to slice, and a bar rotating with the slice index, so
    both a rendered image and scrolling through the series are easy to tell apart by eye or by pixels.
    """
    import numpy as np

    yy, xx = (np.mgrid[0:size, 0:size] - size / 2) / (size / 2)  # -1 .. 1
    hu = np.full((size, size), -1000.0)
    hu[(xx / 0.85) ** 2 + (yy / 0.62) ** 2 < 1] = 40.0  # soft tissue
    for cx in (-0.38, 0.38):
        hu[((xx - cx) / 0.26) ** 2 + ((yy + 0.05) / 0.36) ** 2 < 1] = -820.0  # lungs
    hu[xx ** 2 + (yy - 0.42) ** 2 < 0.09 ** 2] = 900.0  # spine
    r_mm = max(0.0, 40.0 ** 2 - z ** 2) ** 0.5
    r = r_mm / (size * 0.75)  # PixelSpacing 1.5 mm, half-width size/2 pixels
    hu[xx ** 2 + (yy + 0.25) ** 2 < r ** 2] = 300.0  # the sphere
    angle = index * np.pi / 10
    along = xx * np.cos(angle) + yy * np.sin(angle)
    across = -xx * np.sin(angle) + yy * np.cos(angle)
    hu[(np.abs(along) < 0.3) & (np.abs(across) < 0.025)] = 1500.0  # rotating bar
    noise = np.random.default_rng(index).normal(0.0, 8.0, size=(size, size))
    return np.clip(hu + 1024.0 + noise, 0, 65535).astype(np.uint16)


def make_ct_series(out: Path, *, slices: int = 20, size: int = 256, patient_name: str = "Viewer^CT",
                   patient_id: str | None = None, description: str = "CT VIEWER CHECK") -> Study:
    """Write one axial CT series of ``slices`` ``size`` x ``size`` 16-bit slices with full geometry.

    Built on :func:`corpus.make_instance` (the common CT attributes), with consistent
    ImagePositionPatient / ImageOrientationPatient / PixelSpacing (1.5 mm) / SliceThickness and
    SpacingBetweenSlices (2.5 mm) / SliceLocation, HU rescale (slope 1, intercept -1024), a soft-tissue
    window and the :func:`ct_phantom` pattern, so a viewer can stack, window and reconstruct it.
    """
    out.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid(prefix=None)
    series_uid = f"{study_uid}.1"
    pid = patient_id or f"PID{study_uid[-8:]}"
    study = Study(study_uid, pid, patient_name, "20220607", ("CT",))
    study.series[series_uid] = []
    kind = corpus.Kind(code=3, size=size)
    spacing, thickness = 1.5, 2.5
    for i in range(slices):
        z = (i - (slices - 1) / 2) * thickness
        ds = corpus.make_instance(kind, i, slices)
        sop = f"{series_uid}.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, f"{study_uid}.0"
        ds.PatientID, ds.PatientName = pid, patient_name
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.study_date
        ds.StudyTime = ds.SeriesTime = "093000"
        ds.ContentTime = f"0930{i % 60:02d}"
        ds.PatientBirthDate, ds.PatientSex = "19600101", "O"
        ds.StudyDescription, ds.SeriesDescription = description, f"Axial {thickness} mm"
        ds.AccessionNumber = f"V{study_uid[-10:]}"
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, i + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-(size - 1) * spacing / 2, -(size - 1) * spacing / 2, z]
        ds.SliceLocation = z
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = ds.SpacingBetweenSlices = thickness
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "1", "-1024", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.Rows = ds.Columns = size
        ds.PixelData = ct_phantom(size, z, i).tobytes()
        path = out / f"{sop}.dcm"
        ds.save_as(path, enforce_file_format=True)
        study.series[series_uid].append(path)
    return study


# -- processes -------------------------------------------------------------------------------------
def _stop(proc: subprocess.Popen[Any], timeout: float = 10.0, group: bool = False) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; ``group``: also kill what is left of its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # worker processes the server may have left


@dataclass
class StoreSCP:
    """A DCMTK storescp acting as C-MOVE destination; ``options`` are added to its command (DICOM TLS: ``+tls``)."""

    aet: str
    port: int
    directory: Path
    proc: subprocess.Popen[Any] | None = None
    options: tuple[str, ...] = ()

    def start(self) -> StoreSCP:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory.parent / f"storescp-{self.port}.log", "w")  # noqa: SIM115
        # +xa: accept the stored (compressed) syntaxes too, so moved objects arrive as stored.
        self.proc = subprocess.Popen([DCMTK["storescp"], "-od", str(self.directory), "+B", "+xa",
                                      "-aet", self.aet, *self.options, str(self.port)],
                                     env=dcmtk_env(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for_port(self.port, proc=self.proc)
        return self

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.is_file())

    def clear(self) -> None:
        for p in self.files():
            p.unlink()

    def received(self) -> dict[str, Path]:
        """SOP Instance UID -> received file."""
        return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in self.files()}

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


@dataclass
class BastionServer:
    """A ``bastion serve`` subprocess on free ports."""

    data: Path
    remotes: Sequence[str] = ()
    aet: str = SERVER_AET
    host: str = "127.0.0.1"
    dicom_port: int = 0
    http_port: int = 0
    proc: subprocess.Popen[Any] | None = None
    log_path: Path | None = None
    #: Extra ``BASTION_*`` settings for this server (e.g. ``{"BASTION_DICOM_IDLE_TIMEOUT": "2"}``).
    settings: dict[str, str] = field(default_factory=dict)
    #: Start on ``dicom_port`` and ``http_port`` as given (two servers that name each other), not on new free ports.
    fixed_ports: bool = False

    def start(self, timeout: float = 30.0) -> BastionServer:
        if not self.fixed_ports:
            self.dicom_port, self.http_port = free_port(), free_port()
        self.log_path = self.data.parent / f"{self.data.name}-server-{self.dicom_port}.log"
        args = [BASTION, "serve", "--data", str(self.data), "--host", self.host, "--aet", self.aet,
                "--dicom-port", str(self.dicom_port), "--http-port", str(self.http_port)]
        for remote in self.remotes:
            args += ["--remote", remote]
        # The settings come from the flags and ``settings`` alone; BASTION_PURE_PYTHON (the pure-Python leg) stays.
        env = ({k: v for k, v in os.environ.items() if not k.startswith("BASTION_") or k == "BASTION_PURE_PYTHON"}
               | backends.environment_for_command(self.data) | self.settings)
        with open(self.log_path, "w") as log:
            # Own process group (session), so kill9() reaches any worker processes too.
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bastion serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=1) as rsp:
                    if rsp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"bastion did not become healthy:\n{self.log()}")

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.http_port}{path}"

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=10) as rsp:
            return json.loads(rsp.read())

    def stats(self) -> dict[str, Any]:
        """``GET /api/statistics``."""
        return dict(self.get_json("/api/statistics"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    @property
    def blob_dir(self) -> Path:
        """The filesystem blob store's directory (a test that looks into it is skipped on the remote leg)."""
        if backends.REMOTE:
            pytest.skip("inspects the filesystem blob store's files")
        return self.data / "blobs"

    def blob_files(self) -> list[Path]:
        """Every stored object's file (on the remote leg, a downloaded copy of each: :func:`backends.mirrored_objects`)."""
        if backends.REMOTE:
            return backends.mirrored_objects(self.data)
        return sorted(p for p in self.blob_dir.rglob("*") if p.is_file() and ".spool" not in p.parts)

    def spool_files(self) -> list[Path]:
        """Partly received objects left behind: spool files (the empty files made ahead of time do not count), or on
        the remote leg the S3 multipart uploads left unfinished."""
        if backends.REMOTE:
            return [Path(key) for key in backends.unfinished_uploads(self.data)]
        spool = self.blob_dir / ".spool"
        return sorted(p for p in spool.iterdir() if "-pool-" not in p.name) if spool.exists() else []

    def blobs_of(self, sop_uid: str) -> list[Path]:
        """The stored versions of one instance, oldest first (the key's stamp orders them)."""
        found = (backends.mirrored_objects(self.data, f"{sop_uid}_") if backends.REMOTE
                 else self.blob_dir.rglob(f"{sop_uid}_*.dcm"))
        return sorted(found, key=lambda p: p.name.split("_")[1])

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, group=True)

    def kill9(self) -> None:
        """``kill -9`` the server and every process of its group, at once."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    # DCMTK conveniences
    def addr(self) -> list[str]:
        return ["-aec", self.aet, self.host, str(self.dicom_port)]

    def echo(self) -> subprocess.CompletedProcess[str]:
        return run_dcmtk("echoscu", "-v", *self.addr(), timeout=20)

    def storescu(self, *files: str | os.PathLike[str], options: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        return run_dcmtk("storescu", "-v", *options, *self.addr(), *files, timeout=120)

    def dcmsend(self, *files: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
        return run_dcmtk("dcmsend", "-v", *self.addr(), *files, timeout=120)

    def find(self, keys: dict[str, str], *, model: str = "-S", out: Path) -> tuple[subprocess.CompletedProcess[str],
                                                                                    list[pydicom.Dataset]]:
        """findscu with ``-X -od out``; returns the process and the responses read back."""
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        args: list[str] = ["-v", model, "-X", "-od", str(out)]
        for k, v in keys.items():
            args += ["-k", f"{k}={v}" if v is not None else k]
        proc = run_dcmtk("findscu", *args, *self.addr(), timeout=60)
        responses = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
        return proc, responses


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Any]:
    """An archive opened in this process on a fresh data directory (on the leg's backends), closed after."""
    from bastion.archive import Archive
    from bastion.settings import load_settings

    opened = Archive.open(load_settings(None, env={}, data=tmp_path / "data", **backends.locations(tmp_path / "data")))
    yield opened
    opened.close()


@pytest.fixture(scope="session", autouse=True)
def _remote_backends() -> Iterator[None]:
    """On the ``postgresql+s3`` leg, the schemas and SeaweedFS the servers used are removed at the end."""
    yield
    backends.tear_down()


@pytest.fixture(scope="module")
def storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    """A DCMTK storescp destination (``-aet DEST``) on a free port, for the module."""
    if not HAVE_DCMTK:
        unavailable("DCMTK not installed")
    scp = StoreSCP(DEST_AET, free_port(), tmp_path_factory.mktemp("storescp") / "received").start()
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def bastion(tmp_path_factory: pytest.TempPathFactory, storescp: StoreSCP) -> Iterator[BastionServer]:
    """A Bastion server for the module, with ``DEST`` (the storescp) and ``DOWN`` (nothing listens) remotes."""
    server = BastionServer(tmp_path_factory.mktemp("bastion") / "data",
                           remotes=(f"{DEST_AET}@127.0.0.1:{storescp.port}",
                                    f"{DOWN_AET}@127.0.0.1:{free_port()}")).start()
    yield server
    server.stop()


@pytest.fixture
def bastion_factory(tmp_path: Path) -> Iterator[Any]:
    """Start extra servers (on a given data dir, e.g. to restart one); all are stopped at the end."""
    started: list[BastionServer] = []

    def start(data: Path | None = None, remotes: Sequence[str] = (),
              settings: dict[str, str] | None = None) -> BastionServer:
        server = BastionServer(data or tmp_path / f"data{len(started)}", remotes=remotes,
                               settings=dict(settings or {}))
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
