"""Several blob stores, a copy of every object in each (issue 22 items 1-3): a real server with two file stores,
real damage (a deleted store directory, flipped bytes, a store that cannot be written), real DCMTK senders and
WADO-RS readers. Nothing whose digest does not match is ever served."""

from __future__ import annotations

import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import blake3
import pytest
from conftest import DEST_AET, BastionServer, StoreSCP, dataset_part, make_study, requires_dcmtk
from test_dimse_retrieve import movescu

pytestmark = [requires_dcmtk, pytest.mark.timeout(180)]

#: The repair and the scrub (tests/integration/test_repair.py) off: these tests look at the damage they make before
#: anything mends it.
NO_REPAIR = {"BASTION_REPAIR_INTERVAL": "0", "BASTION_SCRUB_RATE": "0"}


def _start(factory: Any, tmp_path: Path, *, required: int | None = None) -> tuple[BastionServer, Path, Path]:
    one, two = tmp_path / "store-one", tmp_path / "store-two"
    settings = {"BASTION_BLOBS": f"{one},{two}", **NO_REPAIR}
    if required is not None:
        settings["BASTION_COPIES_REQUIRED"] = str(required)
    return factory(settings=settings), one, two


def _objects(store: Path) -> dict[str, Path]:
    """The store's object files by SOP Instance UID (journal, spool and quarantine left out)."""
    return {p.name.split("_")[0]: p for p in store.rglob("*.dcm") if not any(part.startswith(".") for part in
                                                                               p.relative_to(store).parts)}


def _digest_ok(path: Path) -> bool:
    return path.name.rsplit("_", 1)[1] == f"b3-{blake3.blake3(path.read_bytes()).hexdigest()}.dcm"


def _wado(server: BastionServer, study: str, series: str, sop: str) -> tuple[int, bytes]:
    """WADO-RS of one instance: (HTTP status, the Part 10 bytes of its one part, or the error body)."""
    req = urllib.request.Request(server.url(f"/dicom-web/studies/{study}/series/{series}/instances/{sop}"),
                                 headers={"Accept": 'multipart/related; type="application/dicom"'})
    try:
        with urllib.request.urlopen(req, timeout=30) as rsp:
            body, ctype = rsp.read(), rsp.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    boundary = next(p.split("=", 1)[1].strip('"') for p in ctype.split(";") if p.strip().startswith("boundary="))
    part = body.split(b"--" + boundary.encode())[1]
    return 200, part.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")


def _flip(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _sent(server: BastionServer, tmp_path: Path, n: int = 2) -> Any:
    study = make_study(tmp_path / "study", series=1, per_series=n)
    proc = server.storescu(*study.files)
    assert proc.returncode == 0, proc.stdout
    return study


def test_every_object_is_stored_in_every_store(bastion_factory: Any, tmp_path: Path) -> None:
    server, one, two = _start(bastion_factory, tmp_path)
    study = _sent(server, tmp_path, 3)
    assert set(_objects(one)) == set(_objects(two)) == set(study.sop_uids)
    for sop in study.sop_uids:
        assert _objects(one)[sop].read_bytes() == _objects(two)[sop].read_bytes()
    report = server.stats()["copies"]
    assert report["required"] == 2 and [s["state"] for s in report["stores"]] == ["ok", "ok"]
    assert server.get_json("/health")["status"] == "ok"


def test_reads_fail_over_when_a_store_is_lost(bastion_factory: Any, tmp_path: Path) -> None:
    server, one, two = _start(bastion_factory, tmp_path)
    study = _sent(server, tmp_path, 3)
    series = next(iter(study.series))
    originals = {sop: path.read_bytes() for sop, path in _objects(two).items()}
    shutil.rmtree(one)  # the store that reads try first
    for sop in study.sop_uids:
        status, body = _wado(server, study.study_uid, series, sop)
        assert status == 200 and body == originals[sop]
    health = server.get_json("/health")
    assert health["status"] == "degraded" and str(one) in health["reason"]
    findings = server.stats()["copies"]["findings"]
    assert findings["outstanding"] >= 3 and {e["problem"] for e in findings["recent"]} == {"missing"}
    assert "is missing" in server.log()


def test_a_corrupt_copy_is_never_served(bastion_factory: Any, tmp_path: Path) -> None:
    server, one, two = _start(bastion_factory, tmp_path)
    study = _sent(server, tmp_path, 2)
    series = next(iter(study.series))
    first, second = study.sop_uids
    good = _objects(two)[first].read_bytes()
    _flip(_objects(one)[first])
    status, body = _wado(server, study.study_uid, series, first)
    assert status == 200 and body == good  # the other copy, whose digest matches
    corrupt = [e for e in server.stats()["copies"]["findings"]["recent"] if e["problem"] == "corrupt"]
    assert [e["store"] for e in corrupt] == [str(one)]
    deadline = time.monotonic() + 30  # appended to the change log in a thread of its own
    while not (logged := [c for c in server.get_json("/api/changes?limit=1000")["changes"]
                          if c["kind"] == "copy-wanting"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(c["sop_uid"], c["study_uid"], c["blob_key"]) for c in logged] == [
        (first, study.study_uid, str(_objects(one)[first].relative_to(one)))]

    # Both copies flipped: an error, never the bytes.
    _flip(_objects(one)[second])
    _flip(_objects(two)[second], offset=-50)
    status, body = _wado(server, study.study_uid, series, second)
    assert status == 503 and b"digest" in body


def test_a_resent_original_repairs_its_copies(bastion_factory: Any, tmp_path: Path) -> None:
    server, one, two = _start(bastion_factory, tmp_path)
    study = _sent(server, tmp_path, 2)
    first, second = study.sop_uids
    _flip(_objects(one)[first])
    _flip(_objects(two)[first])
    _objects(one)[second].unlink()
    proc = server.storescu(*study.files)  # the scanner sends the study again
    assert proc.returncode == 0, proc.stdout
    for store in (one, two):
        assert set(_objects(store)) == {first, second}  # the re-sent copies were not kept beside them
        assert all(_digest_ok(p) for p in _objects(store).values())
    repaired = [e for e in server.stats()["copies"]["findings"]["recent"] if e["repaired"]]
    assert len(repaired) == 3
    assert "made good from the re-sent object" in server.log()


def _break(store: Path) -> None:
    """Make a store unwritable: its directory replaced by a plain file (root ignores permissions)."""
    shutil.rmtree(store)
    store.write_text("not a directory")


def test_a_failed_store_is_skipped_while_enough_copies_are_made(bastion_factory: Any, tmp_path: Path) -> None:
    server, one, two = _start(bastion_factory, tmp_path, required=1)
    _break(two)
    study = _sent(server, tmp_path, 3)  # answered success: one durable copy was required
    assert set(_objects(one)) == set(study.sop_uids)
    findings = server.stats()["copies"]["findings"]
    assert {e["problem"] for e in findings["recent"]} == {"not written"}
    assert findings["outstanding_by_store"] == {str(two): 3}
    health = server.get_json("/health")
    assert health["status"] == "degraded" and str(two) in health["reason"]


def test_too_few_copies_fails_the_store_and_keeps_nothing(bastion_factory: Any, tmp_path: Path) -> None:
    server, one, two = _start(bastion_factory, tmp_path)  # both copies required
    _break(two)
    study = make_study(tmp_path / "study", series=1, per_series=2)
    proc = server.storescu(*study.files)
    assert "Received Store Response (Refused: OutOfResources)" in proc.stdout, proc.stdout  # 0xA701
    assert _objects(one) == {}  # the copy made in the good store was removed again
    assert server.get_json("/dicom-web/instances") == []
    health = server.get_json("/health")
    assert health["status"] == "degraded" and "unreachable" in health["reason"]


def test_c_move_sends_the_good_copy_and_fails_the_one_with_none(bastion_factory: Any, storescp: StoreSCP,
                                                                 tmp_path: Path) -> None:
    """C-MOVE reads through the same path as WADO: a corrupt copy is passed over, and an instance without a good
    copy is a failed sub-operation (0xB000: some failed), never corrupt bytes at the destination."""
    one, two = tmp_path / "store-one", tmp_path / "store-two"
    server = bastion_factory(settings={"BASTION_BLOBS": f"{one},{two}", **NO_REPAIR},
                             remotes=(f"{DEST_AET}@127.0.0.1:{storescp.port}",))
    study = _sent(server, tmp_path, 2)
    first, second = study.sop_uids
    good = _objects(two)[first].read_bytes()
    _flip(_objects(one)[first])
    _flip(_objects(one)[second])
    _flip(_objects(two)[second], offset=-50)
    storescp.clear()
    output, rsps = movescu(server, DEST_AET, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study.study_uid})
    final = rsps[-1]
    assert (final["completed"], final["failed"], final["status"]) == ("1", "1", "0xb000"), output
    received = storescp.received()
    assert list(received) == [first]
    assert dataset_part(received[first].read_bytes()) == dataset_part(good)


def test_a_store_that_cannot_be_opened_does_not_keep_the_archive_from_starting(bastion_factory: Any,
                                                                                tmp_path: Path) -> None:
    """A disk that failed while the server was down: the server starts on the other store, stores and serves, and
    says what is wrong (the store is tried again every 30 s, tests/integration/test_repair.py)."""
    one, two = tmp_path / "store-one", tmp_path / "store-two"
    two.write_text("not a directory")  # the store cannot be made or opened
    server = bastion_factory(settings={"BASTION_BLOBS": f"{one},{two}", "BASTION_COPIES_REQUIRED": "1", **NO_REPAIR})
    study = _sent(server, tmp_path, 2)
    assert set(_objects(one)) == set(study.sop_uids)
    series = next(iter(study.series))
    for sop in study.sop_uids:
        status, body = _wado(server, study.study_uid, series, sop)
        assert status == 200 and body == _objects(one)[sop].read_bytes()
    health = server.get_json("/health")
    assert health["status"] == "degraded" and f"{two}: unreachable" in health["reason"]
    assert "cannot be opened" in health["reason"]
    assert server.stats()["copies"]["findings"]["outstanding_by_store"] == {str(two): 2}
    assert f"blob store {two} cannot be opened, the others serve meanwhile" in server.log()
