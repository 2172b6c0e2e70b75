"""The fuzz harnesses of ``tests/*/test_fuzz_*.py`` at a large budget: inputs run, failures found, inputs/second.

Harnesses (each described in its test module):

* ``pdu``: the DICOM upper layer of a running ``bastion serve``, one connection per input
  (tests/integration/test_fuzz_dimse.py);
* ``header``: the ingest header scan's C and pure-Python twins and ``read_header``, in process
  (tests/unit/test_fuzz_parsers.py);
* ``multipart``: the multipart parser, in process, in random chunks (tests/unit/test_fuzz_parsers.py);
* ``stow-datasets``: STOW-RS of damaged sample datasets to a running server (tests/integration/test_fuzz_stow.py);
* ``stow-multipart``: STOW-RS with malformed multipart bodies to a running server (same module).

Unlike the tests, a failing input does not stop a harness: every input runs, failures are counted and the first
few printed. The properties checked after a run on a server (objects unchanged, blob store and index agree,
C-ECHO and /health answer, no traceback in the log) are printed as ``after: ok`` or the failure.

Usage: ``nice -n 10 python benchmarks/fuzz.py [--examples 10000] [harness ...]`` (CPU-heavy: nice it on a shared
machine). Needs DCMTK (echoscu, storescu) for the server harnesses.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for sub in ("tests", "tests/unit", "tests/integration", "benchmarks"):
    sys.path.insert(0, str(ROOT / sub))

import fuzzing  # noqa: E402
import test_fuzz_dimse as dimse  # noqa: E402
import test_fuzz_parsers as parsers  # noqa: E402
import test_fuzz_stow as stow  # noqa: E402
from conftest import BastionServer, make_study  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@dataclass
class Result:
    """What one harness did."""

    name: str
    inputs: int = 0
    failures: int = 0
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)
    after: str = "ok"


def run(name: str, strategy: st.SearchStrategy[Any], check: Callable[[Any], None], examples: int) -> Result:
    """Run ``check`` on ``examples`` inputs drawn from ``strategy`` (generation only: no shrinking, no database)."""
    result = Result(name)

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(value=strategy)
    def harness(value: Any) -> None:
        result.inputs += 1
        try:
            check(value)
        except Exception:
            result.failures += 1
            if len(result.examples) < 3:
                result.examples.append(f"{value!r}"[:400] + "\n" + traceback.format_exc(limit=3)[-1500:])

    start = time.perf_counter()
    harness()
    result.seconds = time.perf_counter() - start
    return result


def _after(result: Result, check: Callable[[], None]) -> None:
    try:
        check()
    except Exception:
        result.after = traceback.format_exc(limit=3)[-1500:]


def _server(work: Path, **overrides: str) -> BastionServer:
    srv = BastionServer(work / "data", settings=dict(overrides)).start()
    study = make_study(work / "study", series=1, per_series=3)
    if srv.storescu(*study.files).returncode != 0:
        raise RuntimeError("storescu could not store the baseline study")
    srv.study_uid = study.study_uid  # type: ignore[attr-defined]
    return srv


def pdu(examples: int, work: Path) -> Result:
    srv = _server(work, BASTION_DICOM_ARTIM_TIMEOUT="10", BASTION_DICOM_IDLE_TIMEOUT="10")
    try:
        before = fuzzing.snapshot(srv)
        result = run("pdu", dimse.scripts(), lambda s: dimse.check_script(srv.host, srv.dicom_port, s), examples)

        def after() -> None:
            later = fuzzing.snapshot(srv)
            assert not before.unchanged_in(later) and later.counts == before.counts, (before, later)
            assert srv.echo().returncode == 0 and srv.get_json("/health")["status"] == "ok"
            assert not fuzzing.first_traceback(srv.log()), fuzzing.first_traceback(srv.log())

        _after(result, after)
        return result
    finally:
        srv.stop()


def header(examples: int, work: Path) -> Result:
    return run("header", fuzzing.mutated(parsers.SEEDS), parsers.check_header, examples)


def multipart(examples: int, work: Path) -> Result:
    return run("multipart", parsers.multipart_inputs(), lambda v: parsers.check_multipart(*v), examples)


def stow_datasets(examples: int, work: Path) -> Result:
    srv = _server(work)
    try:
        before, sops_before = fuzzing.snapshot(srv), stow.stored_sops(srv)
        client = stow.Stow(srv)
        study = srv.study_uid  # type: ignore[attr-defined]
        result = run("stow-datasets", stow.dataset_requests(),
                     lambda v: stow.check_datasets(client, v[0], study if v[1] else None), examples)

        def after() -> None:
            stow.check_after(srv, before)
            assert stow.stored_sops(srv) - sops_before <= client.reported, "stored but not reported"

        _after(result, after)
        return result
    finally:
        srv.stop()


def stow_multipart(examples: int, work: Path) -> Result:
    srv = _server(work)
    try:
        before = fuzzing.snapshot(srv)
        client = stow.Stow(srv)
        result = run("stow-multipart", stow.multipart_requests(), lambda v: stow.check_multipart(client, *v),
                     examples)
        _after(result, lambda: stow.check_after(srv, before))
        return result
    finally:
        srv.stop()


HARNESSES: dict[str, Callable[[int, Path], Result]] = {
    "pdu": pdu, "header": header, "multipart": multipart, "stow-datasets": stow_datasets,
    "stow-multipart": stow_multipart,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=10_000, help="inputs per harness (default 10,000)")
    parser.add_argument("harness", nargs="*", help=f"harnesses to run (default: all of {', '.join(HARNESSES)})")
    args = parser.parse_args()
    names = args.harness or list(HARNESSES)
    unknown = [name for name in names if name not in HARNESSES]
    if unknown:
        parser.error(f"unknown harness {', '.join(unknown)}; choose from {', '.join(HARNESSES)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bastion-fuzz-") as tmp:
        for name in names:
            work = Path(tmp) / name
            work.mkdir()
            result = HARNESSES[name](args.examples, work)
            results.append(result)
            rate = result.inputs / result.seconds if result.seconds else 0.0
            print(f"{name:15s} inputs {result.inputs:7d}  failures {result.failures:4d}  "
                  f"{rate:8.1f} inputs/s  {result.seconds:7.1f} s  after: "
                  f"{'ok' if result.after == 'ok' else 'FAILED'}", flush=True)
            for example in result.examples:
                print("  failing input:", example.replace("\n", "\n    "), flush=True)
            if result.after != "ok":
                print("  after the run:", result.after.replace("\n", "\n    "), flush=True)
    return 0 if all(r.failures == 0 and r.after == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
