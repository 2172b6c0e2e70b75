"""Edge mode (:mod:`bastion.forward.edge`): an edge Bastion keeps taking and serving images while its upstream
Bastion is down, delivers them all once it is back (also across a kill -9 of upstream mid-forward), reconciles,
fetches a patient's priors, and commits (Storage Commitment) only what upstream holds."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BastionServer, Study, dataset_part, free_port, make_study, requires_dcmtk, run_bastion
from test_forward import wait_for
from test_storage_commitment import Reports, _associate, request

from bastion.dicomweb.multipart import parse_multipart

pytestmark = [requires_dcmtk, pytest.mark.timeout(180)]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


class Pair:
    """An upstream Bastion (``UPSTREAM``, knowing the edge as a remote AE) and an edge (``EDGE``) on ports fixed
    beforehand, so that each names the other; either may be started, stopped, killed and started again."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.up_ports = (free_port(), free_port())
        self.edge_ports = (free_port(), free_port())
        self.servers: list[BastionServer] = []

    def upstream(self) -> BastionServer:
        dicom, http = self.up_ports
        return self._start(BastionServer(self.root / "upstream", remotes=[f"EDGE@127.0.0.1:{self.edge_ports[0]}"],
                                         aet="UPSTREAM", dicom_port=dicom, http_port=http, fixed_ports=True))

    def edge(self) -> BastionServer:
        dicom, http = self.edge_ports
        return self._start(BastionServer(self.root / "edge", aet="EDGE", dicom_port=dicom, http_port=http,
                                         fixed_ports=True, settings=self.edge_settings))

    @property
    def edge_settings(self) -> dict[str, str]:
        return {"BASTION_UPSTREAM": f"UPSTREAM@127.0.0.1:{self.up_ports[0]}",
                "BASTION_UPSTREAM_API": f"http://127.0.0.1:{self.up_ports[1]}",
                "BASTION_COMMIT_AFTER_UPSTREAM": "true",
                "BASTION_FORWARD_MAX_ATTEMPTS": "1000", "BASTION_FORWARD_BACKOFF": "0.2",
                "BASTION_FORWARD_BACKOFF_MAX": "1"}

    def _start(self, server: BastionServer) -> BastionServer:
        self.servers.append(server)
        return server.start()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path)
    yield p
    p.stop()


def edge_report(edge: BastionServer) -> dict[str, Any]:
    report: dict[str, Any] = edge.get_json("/api/queues")["edge"]
    return report


def studies(root: Path, n: int, per_series: int, **kwargs: Any) -> list[Study]:
    return [make_study(root / f"study{i}", series=3, per_series=per_series, **kwargs) for i in range(n)]


def send(edge: BastionServer, batch: list[Study]) -> int:
    """Store ``batch`` on the edge with storescu: the first half as stored (Explicit VR Little Endian), the rest
    proposed in Implicit VR Little Endian only, so the edge holds two transfer syntaxes; the successes."""
    half = len(batch) // 2
    ok = 0
    for group, options in ((batch[:half], ()), (batch[half:], ("-xi",))):
        proc = edge.storescu(*(f for s in group for f in s.files), options=options)
        ok += proc.stdout.count("Received Store Response (Success)")
    return ok


def wado_count(server: BastionServer, study_uid: str) -> int:
    """How many instances WADO-RS returns for the study (0: none, 404)."""
    req = urllib.request.Request(server.url(f"/dicom-web/studies/{study_uid}"),
                                 headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    try:
        with urllib.request.urlopen(req, timeout=30) as rsp:
            boundary = rsp.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"')
            return len(parse_multipart(rsp.read(), boundary))
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return 0
        raise


def reconcile(edge: BastionServer) -> dict[str, Any]:
    """``bastion queue reconcile --json`` on the edge's data directory, with its settings."""
    config = edge.data.parent / "edge-reconcile.toml"
    config.write_text(f'aet = "{edge.aet}"\nupstream = "{edge.settings["BASTION_UPSTREAM"]}"\n'
                      f'upstream_api = "{edge.settings["BASTION_UPSTREAM_API"]}"\n')
    proc = run_bastion("queue", "reconcile", "--json", "--config", config, "--data", edge.data)
    assert proc.returncode in (0, 1), proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def assert_upstream_holds_the_edges_bytes(upstream: BastionServer, edge: BastionServer, batch: list[Study]) -> None:
    stats = upstream.stats()
    total = sum(len(s.files) for s in batch)
    assert (stats["instances"], stats["versions"]) == (total, 0), stats  # all, and no second version of any
    for study in batch:
        for sop in study.sop_uids:
            [mine] = edge.blobs_of(sop)
            [theirs] = upstream.blobs_of(sop)  # one object each: no duplicate kept
            assert dataset_part(theirs.read_bytes()) == dataset_part(mine.read_bytes()), sop


def test_the_edge_takes_and_serves_while_upstream_is_down_and_delivers_everything_once_it_is_back(
        pair: Pair, tmp_path: Path) -> None:
    edge = pair.edge()
    batch = studies(tmp_path / "in", 4, 5)  # 4 studies x 15 = 60 instances
    total = sum(len(s.files) for s in batch)
    assert send(edge, batch) == total
    for study in batch:
        assert wado_count(edge, study.study_uid) == len(study.files)
    waiting = wait_for("the backlog to upstream", lambda: (r := edge_report(edge))["backlog"] == total and r, edge)
    assert waiting["oldest_unsent_age_s"] is not None and waiting["held_upstream"] == 0

    # Storage commitment with commit_after_upstream: stored here, but not committed while upstream is down.
    first = batch[0]
    refs = [(CT_IMAGE_STORAGE, sop) for sop in first.sop_uids]
    reports = Reports()
    assoc = _associate(edge, reports=reports)
    try:
        tx, status = request(assoc, refs)
        assert status == 0x0000
        report = reports.next(tx)
        assert report.committed == {} and set(report.failed.values()) == {0x0110}, report.failed
    finally:
        assoc.release()

    upstream = pair.upstream()
    wait_for("everything delivered", lambda: edge_report(edge)["backlog"] == 0
             and upstream.stats()["instances"] == total, edge)
    assert_upstream_holds_the_edges_bytes(upstream, edge, batch)
    assert edge_report(edge)["held_upstream"] == total
    found = reconcile(edge)
    assert (found["checked"], found["held"], found["missing"], found["different"]) == (total, total, 0, 0), found
    # The reconciliation after the reconnection ran by itself too, and found nothing missing.
    auto = wait_for("the reconciliation after the reconnection", lambda: edge_report(edge)["last_reconcile"], edge)
    assert auto["missing"] == 0 and auto["different"] == 0, auto

    assoc = _associate(edge, reports=reports)
    try:
        tx, status = request(assoc, refs)
        report = reports.next(tx)
        assert set(report.committed) == set(first.sop_uids) and report.failed == {}, report.failed
    finally:
        assoc.release()


def test_upstream_killed_mid_forward_ends_up_with_everything_once(pair: Pair, tmp_path: Path) -> None:
    edge = pair.edge()
    batch = studies(tmp_path / "in", 4, 5)
    total = sum(len(s.files) for s in batch)
    assert send(edge, batch) == total
    upstream = pair.upstream()
    wait_for("the first instances upstream", lambda: upstream.stats()["instances"], edge)
    upstream.kill9()  # while the edge sends (a run held 11 of the 60 here)
    upstream = pair.upstream()  # the same data directory and ports
    wait_for("everything delivered after the kill", lambda: edge_report(edge)["backlog"] == 0
             and upstream.stats()["instances"] == total, edge)
    assert_upstream_holds_the_edges_bytes(upstream, edge, batch)
    found = reconcile(edge)
    assert (found["missing"], found["different"], found["checked"]) == (0, 0, total), found


def test_a_new_study_fetches_the_patients_priors_from_upstream(pair: Pair, tmp_path: Path) -> None:
    upstream = pair.upstream()
    priors = [make_study(tmp_path / f"prior{i}", series=1, per_series=2, patient_id="PATIENT-P",
                         study_date=f"20{20 + i}0101") for i in range(3)]
    other = make_study(tmp_path / "other", series=1, per_series=2, patient_id="PATIENT-Q")
    proc = upstream.storescu(*(f for s in [*priors, other] for f in s.files))
    assert proc.stdout.count("Received Store Response (Success)") == 8
    edge = pair.edge()
    new = make_study(tmp_path / "new", series=1, per_series=2, patient_id="PATIENT-P", study_date="20260101")
    assert send(edge, [new]) == 2

    def on_edge() -> set[str]:
        with urllib.request.urlopen(edge.url("/dicom-web/studies?PatientID=PATIENT-P"), timeout=10) as rsp:
            body = rsp.read()
        return {r["0020000D"]["Value"][0] for r in json.loads(body or b"[]")}

    wanted = {s.study_uid for s in [*priors, new]}
    wait_for("the three priors queryable on the edge", lambda: on_edge() == wanted, edge)
    for prior in priors:
        wait_for("every instance of the prior", lambda p=prior: wado_count(edge, p.study_uid) == 2, edge)
    report = wait_for("the priors counted held upstream",
                      lambda: (r := edge_report(edge))["backlog"] == 0 and r["held_upstream"] == 8 and r, edge)
    assert report["prefetched_studies"] == 3
    assert upstream.stats()["instances"] == 10 and upstream.stats()["versions"] == 0  # nothing sent back twice


def test_a_dicomweb_upstream_gets_stow_rs_and_gives_priors_by_wado_rs(pair: Pair, tmp_path: Path) -> None:
    upstream = pair.upstream()
    priors = [make_study(tmp_path / f"prior{i}", series=1, per_series=2, patient_id="PATIENT-W",
                         study_date=f"20{20 + i}0101") for i in range(2)]
    assert upstream.storescu(*(f for s in priors for f in s.files)).stdout.count("(Success)") == 4
    web = f"http://127.0.0.1:{pair.up_ports[1]}/dicom-web"
    edge = BastionServer(tmp_path / "edge-web", aet="EDGE", settings={**pair.edge_settings, "BASTION_UPSTREAM": web,
                                                                     "BASTION_UPSTREAM_API": ""})
    pair.servers.append(edge.start())
    new = make_study(tmp_path / "new", series=1, per_series=3, patient_id="PATIENT-W", study_date="20260101")
    assert send(edge, [new]) == 3
    for prior in priors:
        wait_for("a prior fetched by WADO-RS", lambda p=prior: wado_count(edge, p.study_uid) == 2, edge)
    report = wait_for("the new study delivered by STOW-RS, the priors not sent back",
                      lambda: (r := edge_report(edge))["backlog"] == 0 and r["held_upstream"] == 7 and r, edge)
    assert report["prefetched_studies"] == 2
    assert (upstream.stats()["instances"], upstream.stats()["versions"]) == (7, 0)
    edge.settings["BASTION_UPSTREAM_API"] = web.removesuffix("/dicom-web")
    found = reconcile(edge)
    assert (found["checked"], found["missing"], found["different"]) == (7, 0, 0), found
