"""Forwarding (:mod:`bastion.forward`): ``[[forward]]`` rules, durable per-destination queues, retries, dead
letters and ``bastion queue``, against DCMTK's ``storescp`` and another Bastion."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import (
    BastionServer,
    StoreSCP,
    Study,
    dataset_part,
    free_port,
    make_study,
    relabel_sample,
    requires_dcmtk,
    run_bastion,
)
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from test_dimse_retrieve import start_storescp

from bastion.forward.queue import NewEntry
from bastion.forward.sqlite import SqliteForwardQueue

pytestmark = [requires_dcmtk, pytest.mark.timeout(120)]

#: Generous: every wait polls for a condition and returns as soon as it holds.
DEADLINE_S = 60.0
MPEG2_MAIN_PROFILE = "1.2.840.10008.1.2.4.100"
FAST_RETRIES = {"BASTION_FORWARD_BACKOFF": "0.2", "BASTION_FORWARD_BACKOFF_MAX": "1"}


def wait_for(what: str, check: Callable[[], Any], server: BastionServer | None = None) -> Any:
    """Poll ``check`` until it returns something true; fail with ``what`` after :data:`DEADLINE_S`."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = server.log()[-3000:] if server is not None else ""
            pytest.fail(f"timed out waiting for {what}; last: {value!r}\n{tail}")
        time.sleep(0.1)


def queue_of(server: BastionServer, name: str) -> dict[str, Any]:
    """The ``/api/queues`` entry of ``name``."""
    return next(q for q in server.get_json("/api/queues")["queues"] if q["name"] == name)


def write_config(path: Path, *rules: str) -> Path:
    path.write_text("\n".join(f"[[forward]]\n{rule}\n" for rule in rules))
    return path


def received_uids(scp: StoreSCP) -> set[str]:
    return set(scp.received()) if scp.directory.exists() else set()


def uids_of(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def test_a_ct_rule_forwards_only_ct_and_a_down_destination_dead_letters_until_retried(
        bastion_factory: Callable[..., BastionServer], tmp_path: Path) -> None:
    dest = StoreSCP("DEST", free_port(), tmp_path / "dest").start()
    later = StoreSCP("LATER", free_port(), tmp_path / "later")  # not started: down
    try:
        config = write_config(tmp_path / "forward.toml",
                              f'name = "ct-only"\nto = "DEST@127.0.0.1:{dest.port}"\nmatch = {{ Modality = "CT" }}',
                              f'name = "later"\nto = "LATER@127.0.0.1:{later.port}"\n'
                              'match = { Modality = "MR", CallingAETitle = "MOD*" }')
        server = bastion_factory(settings={"BASTION_CONFIG": str(config), "BASTION_FORWARD_MAX_ATTEMPTS": "3",
                                           **FAST_RETRIES})
        mixed = make_study(tmp_path / "mixed", series=2, per_series=3, modality=("CT", "MR"))
        other = make_study(tmp_path / "other", series=1, per_series=2, modality="MR")
        proc = server.storescu(*mixed.files, options=["-aet", "MODALITY1"])
        assert proc.stdout.count("Received Store Response (Success)") == 6, proc.stdout
        proc = server.storescu(*other.files, options=["-aet", "ELSEWHERE"])  # MR, but not from MOD*
        assert proc.stdout.count("Received Store Response (Success)") == 2, proc.stdout
        ct_files, mr_files = (mixed.series[uid] for uid in mixed.series)

        # Only CT arrives at DEST, byte for byte the dataset that was stored.
        wait_for("the CT series delivered", lambda: queue_of(server, "ct-only")["delivered"] == 3, server)
        assert received_uids(dest) == uids_of(ct_files)
        for original in ct_files:
            sop = str(pydicom.dcmread(original, stop_before_pixels=True).SOPInstanceUID)
            assert dataset_part(dest.received()[sop].read_bytes()) == dataset_part(original.read_bytes())
        ct = queue_of(server, "ct-only")
        assert (ct["pending"], ct["in_flight"], ct["dead"]) == (0, 0, 0), ct

        # LATER is down: its three MR instances from MOD* are retried, then dead letters with the error.
        down = wait_for("the MR instances dead-lettered", lambda: (q := queue_of(server, "later"))["dead"] == 3 and q,
                        server)
        assert (down["pending"], down["in_flight"], down["delivered"]) == (0, 0, 0), down
        assert "cannot connect" in down["last_error"], down
        listed = run_bastion("queue", "list", "--dead", "--data", server.data, "--config", config)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.count("dead: later ") == 3 and "cannot connect" in listed.stdout, listed.stdout

        # Back up: `bastion queue retry` delivers them.
        later.start()
        retried = run_bastion("queue", "retry", "--destination", "later", "--data", server.data)
        assert retried.returncode == 0 and "3 dead letter(s) pending again" in retried.stdout, retried
        wait_for("the MR instances delivered after the retry", lambda: queue_of(server, "later")["delivered"] == 3,
                 server)
        assert received_uids(later) == uids_of(mr_files)
        assert queue_of(server, "later")["dead"] == 0
    finally:
        dest.stop()
        later.stop()


def _instances(server: BastionServer) -> tuple[int, int, int]:
    """Current instances, superseded versions and the last change-log entry of ``server``."""
    s = server.stats()
    return s["instances"], s["versions"], s["last_change"]


def test_a_queue_survives_a_kill_and_a_re_sent_instance_is_a_duplicate_upstream(
        bastion_factory: Callable[..., BastionServer], tmp_path: Path) -> None:
    edge_data = tmp_path / "edge"
    down_port = free_port()  # nothing listens there yet: the upstream is down
    config = write_config(tmp_path / "edge.toml", f'name = "upstream"\nto = "UPSTREAM@127.0.0.1:{down_port}"')
    settings = {"BASTION_CONFIG": str(config), "BASTION_FORWARD_MAX_ATTEMPTS": "1000", **FAST_RETRIES}
    edge = bastion_factory(edge_data, settings=settings)
    study: Study = make_study(tmp_path / "study", series=2, per_series=10)
    proc = edge.storescu(*study.files)
    assert proc.stdout.count("Received Store Response (Success)") == 20, proc.stdout
    waiting = wait_for("20 instances queued, failing", lambda: (q := queue_of(edge, "upstream"))["pending"]
                       + q["in_flight"] == 20 and q["last_error"] and q, edge)
    assert waiting["delivered"] == 0 and waiting["dead"] == 0, waiting
    edge.kill9()  # mid-queue, with entries perhaps in flight

    upstream = bastion_factory(tmp_path / "upstream", settings={})
    upstream_aet = upstream.aet
    write_config(config, f'name = "upstream"\nto = "{upstream_aet}@127.0.0.1:{upstream.dicom_port}"')
    edge = bastion_factory(edge_data, settings=settings)  # the same queue, the upstream now reachable
    wait_for("the backlog delivered after the restart", lambda: queue_of(edge, "upstream")["delivered"] == 20, edge)
    instances, versions, last_change = _instances(upstream)
    assert (instances, versions) == (20, 0)
    for original in study.files:
        sop = str(pydicom.dcmread(original, stop_before_pixels=True).SOPInstanceUID)
        [stored] = upstream.blobs_of(sop)
        assert dataset_part(stored.read_bytes()) == dataset_part(original.read_bytes())

    # The crash window of at-least-once: sent, but stopped before the delivery was recorded. The restarted edge
    # sends all 20 again; the upstream answers success and records nothing new.
    edge.stop()
    queue = SqliteForwardQueue(edge_data / "forward.sqlite3")
    try:
        sop_uids = sorted(uids_of(study.files))
        queue.enqueue([NewEntry("upstream", sop, study.study_uid, i) for i, sop in enumerate(sop_uids)],
                      queue.cursor())
        assert len(queue.take("upstream", 100, 600)) == 20  # in flight when the edge stopped
    finally:
        queue.close()
    edge = bastion_factory(edge_data, settings=settings)
    wait_for("the 20 re-sent", lambda: queue_of(edge, "upstream")["delivered"] == 40, edge)
    assert queue_of(edge, "upstream")["dead"] == 0
    assert _instances(upstream) == (20, 0, last_change)  # duplicates: no new version, no change-log entry


def _stow(server: BastionServer, *files: Path) -> None:
    """Store ``files`` on ``server`` with one STOW-RS request."""
    boundary = "forward-test"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.read_bytes() + b"\r\n"
                    for f in files) + f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(server.url("/dicom-web/studies"), data=body, method="POST", headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    with urllib.request.urlopen(request, timeout=30) as rsp:
        assert rsp.status == 200


def test_stow_rs_and_a_receiver_of_uncompressed_syntaxes_only(bastion_factory: Callable[..., BastionServer],
                                                              tmp_path: Path) -> None:
    """One rule sends by STOW-RS to another Bastion (as stored); another to a storescp that accepts uncompressed
    syntaxes only: a compressed instance arrives decompressed, identity unchanged, and one whose syntax no codec
    here decodes (MPEG2) is a dead letter saying why."""
    upstream = bastion_factory(tmp_path / "upstream", settings={})
    plain = start_storescp("PLAIN", tmp_path / "plain")  # no +xa: uncompressed syntaxes only
    try:
        config = write_config(tmp_path / "edge.toml",
                              f'name = "web"\nto = "http://127.0.0.1:{upstream.http_port}/dicom-web"',
                              f'name = "plain"\nto = "PLAIN@127.0.0.1:{plain.port}"')
        edge = bastion_factory(tmp_path / "edge", settings={"BASTION_CONFIG": str(config),
                                                            "BASTION_FORWARD_MAX_ATTEMPTS": "2", **FAST_RETRIES})
        study_uid = generate_uid(prefix=None)
        rle = relabel_sample("MR_small_RLE.dcm", tmp_path / "in", study_uid=study_uid, patient_name="Fwd^Rle",
                             patient_id="FWD1")
        mpeg = relabel_sample("MR_small_RLE.dcm", tmp_path / "in2", study_uid=study_uid, patient_name="Fwd^Rle",
                              patient_id="FWD1", series_number=2)
        ds = pydicom.dcmread(mpeg)
        ds.file_meta.TransferSyntaxUID = MPEG2_MAIN_PROFILE  # a syntax pydicom has no decoder for
        ds.save_as(mpeg, enforce_file_format=True)
        _stow(edge, rle, mpeg)
        wait_for("both sent by STOW-RS", lambda: queue_of(edge, "web")["delivered"] == 2, edge)
        for original in (rle, mpeg):
            sop = str(pydicom.dcmread(original, stop_before_pixels=True).SOPInstanceUID)
            [stored] = upstream.blobs_of(sop)
            assert stored.read_bytes() == original.read_bytes()  # as stored on the edge, which kept the bytes

        plain_queue = wait_for("the RLE instance delivered and the MPEG2 one dead",
                               lambda: (q := queue_of(edge, "plain"))["delivered"] == 1 and q["dead"] == 1 and q,
                               edge)
        assert "cannot decode" in plain_queue["last_error"], plain_queue
        [received] = plain.files()
        got, sent = pydicom.dcmread(received), pydicom.dcmread(rle)
        assert got.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        assert got.SOPInstanceUID == sent.SOPInstanceUID and got.StudyInstanceUID == sent.StudyInstanceUID
        assert got.pixel_array.tobytes() == sent.pixel_array.tobytes()
    finally:
        plain.stop()
