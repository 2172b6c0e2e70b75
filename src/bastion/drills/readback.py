"""What a drill reads back from the archive over DICOMweb, as a viewer would: a WADO-RS reader that compares every
byte served with what was sent (:class:`Reader`, :func:`retrieve`, :func:`check_all`) and QIDO-RS listings
(:func:`qido_all`, :func:`qido_snapshot`, :func:`indexed_sops`). Like :mod:`bastion.drills.harness`, it drives the
server from the outside only.
"""

from __future__ import annotations

import json
import random
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from bastion.drills.harness import WADO_ACCEPT, Instance, dataset_part, digest


# -- DICOMweb --------------------------------------------------------------------------------------------------
def http_get(url: str, accept: str | None = None, timeout: float = 20.0) -> tuple[int, dict[str, str], bytes]:
    """GET ``url``: status, headers (lower-case names) and body; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            return rsp.status, {k.lower(): v for k, v in rsp.headers.items()}, rsp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def first_part(content_type: str, body: bytes) -> bytes:
    """The content of the first part of a ``multipart/related`` body."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise ValueError(f"no boundary in {content_type!r}")
    delimiter = b"--" + m.group(1).encode()
    start = body.index(delimiter) + len(delimiter)
    head_end = body.index(b"\r\n\r\n", start) + 4
    end = body.index(b"\r\n" + delimiter, head_end)
    return body[head_end:end]


def retrieve(base_url: str, inst: Instance) -> tuple[str, bytes | None]:
    """WADO-RS retrieve of one instance as stored: ``("ok", part10)``, ``("corrupt", part10)`` when its dataset
    is not the one sent, or ``("failed", None)`` (an HTTP error, a connection refused or reset, a bad body)."""
    url = f"{base_url}/dicom-web/studies/{inst.study}/series/{inst.series}/instances/{inst.sop}"
    try:
        status, headers, body = http_get(url, WADO_ACCEPT)
        if status != 200:
            return "failed", None
        part10 = first_part(headers.get("content-type", ""), body)
    except (OSError, ValueError):
        return "failed", None
    try:
        same = digest(dataset_part(part10)) == inst.digest
    except (ValueError, IndexError):
        same = False
    return ("ok" if same else "corrupt"), part10


def qido_all(base_url: str, level: str, page: int = 1000, extra: str = "") -> list[dict[str, Any]]:
    """Every QIDO-RS match at ``level`` (``studies``, ``series`` or ``instances``), page after page."""
    out: list[dict[str, Any]] = []
    offset = 0
    while True:
        status, _, body = http_get(f"{base_url}/dicom-web/{level}?limit={page}&offset={offset}{extra}",
                                   "application/dicom+json")
        if status == 204 or not body.strip():
            return out
        if status != 200:
            raise RuntimeError(f"QIDO-RS /{level} answered {status}: {body[:200]!r}")
        items = json.loads(body)
        out.extend(items)
        if len(items) < page:
            return out
        offset += page


def uid_of(item: dict[str, Any], tag: str) -> str:
    value = item.get(tag, {}).get("Value") or [""]
    return str(value[0])


def indexed_sops(base_url: str) -> set[str]:
    """The SOP Instance UIDs QIDO-RS lists."""
    return {uid_of(item, "00080018") for item in qido_all(base_url, "instances")}


def qido_snapshot(base_url: str, studies: set[str] | None = None) -> dict[str, list[str]]:
    """Every study, series and instance QIDO-RS lists with all attributes (of ``studies`` only, if given; not
    the Retrieve URL, which names the server's address), each match as sorted JSON, sorted: two snapshots compare equal when the answers are identical, whatever their
    order."""
    snap: dict[str, list[str]] = {}
    for level in ("studies", "series", "instances"):
        items = qido_all(base_url, level, extra="&includefield=all")
        if studies is not None:
            items = [item for item in items if uid_of(item, "0020000D") in studies]
        items = [{tag: value for tag, value in item.items() if tag != "00081190"} for item in items]  # URL: port
        snap[level] = sorted(json.dumps(item, sort_keys=True) for item in items)
    return snap


class Reader:
    """Threads retrieving acknowledged instances (picked at random from ``pool()``) over WADO-RS, counting
    reads, failed reads (no answer, an error status) and corrupt reads (bytes other than those sent)."""

    def __init__(self, base_url: str, pool: Callable[[], Sequence[Instance]], threads: int = 1,
                 pause: float = 0.005) -> None:
        self.base_url = base_url
        self.pause = pause  # between two reads of a thread: a share of the CPU left to the server
        self.pool = pool
        self.reads = self.failed = self.corrupt = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True, name=f"drill-reader-{i}")
                         for i in range(threads)]

    def start(self) -> Reader:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _run(self) -> None:
        rng = random.Random()
        while not self._stop.is_set():
            pool = self.pool()
            if not pool:
                self._stop.wait(0.05)
                continue
            inst = rng.choice(pool)
            outcome, _ = retrieve(self.base_url, inst)
            self._stop.wait(self.pause)
            with self._lock:
                self.reads += 1
                if outcome == "failed":
                    self.failed += 1
                elif outcome == "corrupt":
                    self.corrupt += 1
                if outcome != "ok" and len(self.failures) < 20:
                    self.failures.append(f"{outcome}: {inst.sop}")


def check_all(base_url: str, instances: Iterable[Instance]) -> tuple[int, int, list[str]]:
    """Retrieve each of ``instances`` once: (failed reads, corrupt reads, a few examples)."""
    failed = corrupt = 0
    examples: list[str] = []
    for inst in instances:
        outcome, _ = retrieve(base_url, inst)
        if outcome == "failed":
            failed += 1
        elif outcome == "corrupt":
            corrupt += 1
        if outcome != "ok" and len(examples) < 5:
            examples.append(f"{outcome}: {inst.sop}")
    return failed, corrupt, examples
