"""Several nodes sharing one PostgreSQL index and one S3 bucket (issue 21), behind HAProxy configured as
``docs/deployment.md`` says: real DCMTK clients, real HAProxy, real PostgreSQL, real S3 (SeaweedFS)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from backends import remote_environment
from conftest import (
    DCMTK,
    ROOT,
    BastionServer,
    Study,
    dcmtk_env,
    free_port,
    make_study,
    requires_dcmtk,
    run_dcmtk,
    unavailable,
    wait_for_port,
)
from test_dimse_retrieve import move_responses, start_storescp

pytestmark = [pytest.mark.timeout(300), requires_dcmtk]

HAPROXY = "/usr/sbin/haproxy"


def deployment_guide_haproxy_config(**values: str | int) -> str:
    """The HAProxy configuration of ``docs/deployment.md`` with its ``${NAME}`` placeholders filled in."""
    guide = (ROOT / "docs" / "deployment.md").read_text()
    block = re.search(r"```haproxy\n(.*?)```", guide, re.S)
    assert block is not None, "docs/deployment.md has no haproxy configuration block"
    config = block.group(1)
    for name, value in values.items():
        config = config.replace("${" + name + "}", str(value))
    left = re.findall(r"\$\{\w+\}", config)
    assert not left, f"placeholders left unfilled: {left}"
    return config


class HAProxy:
    """HAProxy in the foreground with the guide's configuration, in front of two nodes."""

    def __init__(self, workdir: Path, a: BastionServer, b: BastionServer) -> None:
        self.dicom_port, self.http_port = free_port(), free_port()
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(deployment_guide_haproxy_config(
            BIND="127.0.0.1", DICOM_PORT=self.dicom_port, HTTP_PORT=self.http_port,
            NODE_A_HOST=a.host, NODE_A_DICOM=a.dicom_port, NODE_A_HTTP=a.http_port,
            NODE_B_HOST=b.host, NODE_B_DICOM=b.dicom_port, NODE_B_HTTP=b.http_port))
        self.log = workdir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HAProxy:
        check = subprocess.run([HAPROXY, "-c", "-f", str(self.config)], capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_for_port(self.dicom_port, proc=self.proc)
        wait_for_port(self.http_port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def two_nodes(tmp_path: Path, bastion_factory: Callable[..., BastionServer]) -> Iterator[tuple[BastionServer, ...]]:
    """Nodes ``node-a`` and ``node-b``: data directories of their own, one PostgreSQL schema and S3 prefix."""
    shared = remote_environment(tmp_path / "shared")
    a = bastion_factory(tmp_path / "a", settings=shared | {"BASTION_NODE_ID": "node-a"})
    b = bastion_factory(tmp_path / "b", settings=shared | {"BASTION_NODE_ID": "node-b"})
    yield a, b


@pytest.fixture
def proxy(tmp_path: Path, two_nodes: tuple[BastionServer, BastionServer]) -> Iterator[HAProxy]:
    if not shutil.which(HAPROXY):
        unavailable("HAProxy not installed (scripts/install-test-deps.sh)")
    started = HAProxy(tmp_path, *two_nodes).start()
    yield started
    started.stop()


def _acknowledged(output: str) -> list[str]:
    """The files a ``storescu -v`` run was answered success for (each "Sending file" line, then its response)."""
    done, sending = [], None
    for line in output.splitlines():
        if "Sending file: " in line:
            sending = line.split("Sending file: ", 1)[1].strip()
        elif "Received Store Response (Success)" in line and sending is not None:
            done.append(sending)
            sending = None
    return done


def _storescu(port: int, files: list[Path], aet: str) -> subprocess.CompletedProcess[str]:
    return run_dcmtk("storescu", "-v", "-aet", aet, "-aec", "BASTION", "127.0.0.1", str(port), *files, timeout=120)


def _qido(server: BastionServer, path: str) -> Any:
    return server.get_json(f"/dicom-web/{path}")


def _study_counts(answer: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Per study UID: (NumberOfStudyRelatedSeries, NumberOfStudyRelatedInstances)."""
    return {s["0020000D"]["Value"][0]: (s["00201206"]["Value"][0], s["00201208"]["Value"][0]) for s in answer}


def test_a_node_killed_mid_association_loses_no_acknowledged_instance(
        tmp_path: Path, two_nodes: tuple[BastionServer, BastionServer], proxy: HAProxy) -> None:
    """``storescu`` sends through HAProxy; the node holding an association is SIGKILLed while it runs. Every
    instance answered success is stored; the rest, sent again on new associations, land on the other node; both
    nodes then answer C-FIND and QIDO alike."""
    a, b = two_nodes
    study = make_study(tmp_path / "study", series=2, per_series=20, patient_id="PID-NODES")
    files = study.files
    acknowledged: set[str] = set()
    for batch, part in enumerate((files[:5], files[5:10])):  # round robin: both nodes take associations
        sent = _storescu(proxy.dicom_port, part, f"BATCH{batch}")
        assert sent.returncode == 0, sent.stdout
        acknowledged |= set(_acknowledged(sent.stdout))
    assert len(acknowledged) == 10

    # A long association, whose node is killed once some of its instances were answered.
    out = tmp_path / "long.log"
    with open(out, "w") as log:
        long = subprocess.Popen([DCMTK["storescu"], "-v", "-aet", "LONG", "-aec", "BASTION", "127.0.0.1",
                                 str(proxy.dicom_port), *map(str, files[10:])], stdout=log,
                                stderr=subprocess.STDOUT, text=True, env=dcmtk_env())
    deadline = time.monotonic() + 60
    while len(_acknowledged(out.read_text())) < 3 and long.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    holder = next((n for n in (a, b) if "association from LONG" in n.log()), None)
    assert holder is not None, "neither node logged the association"
    holder.kill9()
    long.wait(60)
    acknowledged |= set(_acknowledged(out.read_text()))
    survivor = b if holder is a else a

    # The sender sends what was not acknowledged again, on new associations, until every instance is.
    for attempt in range(20):
        missing = [f for f in files if str(f) not in acknowledged]
        if not missing:
            break
        sent = _storescu(proxy.dicom_port, missing, f"RETRY{attempt}")
        acknowledged |= set(_acknowledged(sent.stdout))
    assert acknowledged == {str(f) for f in files}

    # Every acknowledged instance is in the index, whichever node is asked.
    instances = _qido(survivor, f"studies/{study.study_uid}/instances")
    assert {i["00080018"]["Value"][0] for i in instances} == set(study.sop_uids)
    holder.start()  # the killed node comes back on its data directory and sees the same archive
    assert _study_counts(_qido(holder, "studies")) == _study_counts(_qido(survivor, "studies")) == {
        study.study_uid: (2, 40)}
    metadata = [json.dumps(_qido(n, f"studies/{study.study_uid}/series/{next(iter(study.series))}/metadata"),
                           sort_keys=True).replace(n.url(""), "BASE/") for n in (a, b)]  # BulkDataURIs name the node
    assert metadata[0] == metadata[1] and len(json.loads(metadata[0])) == 20
    found = [n.find({"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study.study_uid,
                     "SeriesInstanceUID": "", "NumberOfSeriesRelatedInstances": ""},
                    out=tmp_path / f"find-{n.data.name}")[1] for n in (a, b)]
    assert sorted((str(d.SeriesInstanceUID), int(d.NumberOfSeriesRelatedInstances)) for d in found[0]) == \
        sorted((str(d.SeriesInstanceUID), int(d.NumberOfSeriesRelatedInstances)) for d in found[1]) == \
        sorted((uid, 20) for uid in study.series)


def test_two_nodes_storing_one_study_at_once_make_one_patient_study_and_series_each(
        tmp_path: Path, two_nodes: tuple[BastionServer, BastionServer]) -> None:
    """2 nodes x 4 associations store interleaved instances of the same 10 studies (of 2 patients): no failure,
    one row per patient, study and series, and the counts QIDO answers are exact."""
    studies: list[Study] = [make_study(tmp_path / f"s{i}", series=2, per_series=4, patient_id=f"PID-{i % 2}",
                                       patient_name=f"Shared^Patient{i % 2}") for i in range(10)]
    files = [f for s in studies for f in s.files]
    senders = []
    for k in range(8):
        node = two_nodes[k % 2]
        share = files[k::8]
        senders.append((share, subprocess.Popen(
            [DCMTK["storescu"], "-v", "-aet", f"SENDER{k}", *node.addr(), *map(str, share)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())))
    for share, proc in senders:
        output, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, output
        assert sorted(_acknowledged(output)) == sorted(map(str, share)), output

    expected = {s.study_uid: (2, 8) for s in studies}
    for node in two_nodes:
        assert _study_counts(_qido(node, "studies")) == expected
        patients = node.find({"QueryRetrieveLevel": "PATIENT", "PatientID": "", "NumberOfPatientRelatedStudies": "",
                              "NumberOfPatientRelatedInstances": ""}, model="-P", out=tmp_path / "patients")[1]
        assert sorted((str(p.PatientID), int(p.NumberOfPatientRelatedStudies),
                       int(p.NumberOfPatientRelatedInstances)) for p in patients) == [("PID-0", 5, 40),
                                                                                      ("PID-1", 5, 40)]
        for s in studies:
            series = _qido(node, f"studies/{s.study_uid}/series")
            assert sorted((x["0020000E"]["Value"][0], x["00201209"]["Value"][0]) for x in series) == \
                sorted((uid, 4) for uid in s.series)


def _moved_uids(directory: Path) -> set[str]:
    """The SOP Instance UIDs a storescp has begun to write: its files are named ``<modality>.<SOP UID>``."""
    return {p.name.split(".", 1)[1] for p in directory.iterdir() if p.is_file() and "." in p.name}


def test_a_c_move_whose_node_is_killed_is_finished_by_the_other_node(
        tmp_path: Path, bastion_factory: Callable[..., BastionServer]) -> None:
    """A C-MOVE through HAProxy to a slow destination; the node running it is SIGKILLed once some instances
    arrived. The other node takes the job over when its lease runs out and finishes it: every instance reaches
    the destination at least once, and the same C-MOVE sent again is answered at once from the job, with every
    sub-operation completed (PS3.4 C.4.2.1.4)."""
    if not shutil.which(HAPROXY):
        unavailable("HAProxy not installed (scripts/install-test-deps.sh)")
    destination = start_storescp("DEST", tmp_path / "received", "--sleep-after", "1")  # a second per instance
    try:
        shared = remote_environment(tmp_path / "shared")
        remotes = [f"DEST@127.0.0.1:{destination.port}"]
        a = bastion_factory(tmp_path / "a", remotes=remotes, settings=shared | {"BASTION_NODE_ID": "node-a"})
        b = bastion_factory(tmp_path / "b", remotes=remotes, settings=shared | {"BASTION_NODE_ID": "node-b"})
        proxy = HAProxy(tmp_path, a, b).start()
        try:
            study = make_study(tmp_path / "study", series=1, per_series=15, patient_id="PID-MOVE")
            stored = a.storescu(*study.files)
            assert stored.stdout.count("Received Store Response (Success)") == 15, stored.stdout
            move = ["-S", "-aet", "MOVER", "-aec", "BASTION", "-aem", "DEST", "-k", "QueryRetrieveLevel=STUDY",
                    "-k", f"StudyInstanceUID={study.study_uid}", "127.0.0.1", str(proxy.dicom_port)]
            with open(tmp_path / "first-move.log", "w") as log:
                first = subprocess.Popen([DCMTK["movescu"], "-v", *move], stdout=log, stderr=subprocess.STDOUT,
                                         env=dcmtk_env())
            deadline = time.monotonic() + 60
            while len(_moved_uids(destination.directory)) < 3 and time.monotonic() < deadline:
                assert first.poll() is None, (tmp_path / "first-move.log").read_text()
                time.sleep(0.05)
            holder = next((n for n in (a, b) if "association from MOVER" in n.log()), None)
            assert holder is not None, "neither node logged the C-MOVE's association"
            holder.kill9()
            first.wait(60)
            survivor = b if holder is a else a
            wanted = set(study.sop_uids)
            assert _moved_uids(destination.directory) < wanted  # killed mid-move

            deadline = time.monotonic() + 180  # a lease, a runner's poll and 12 s of sending, with room to spare
            while not wanted <= _moved_uids(destination.directory) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert wanted <= _moved_uids(destination.directory), survivor.log()
            assert "taken over (its lease ran out)" in survivor.log()
            while "finished: 15 completed" not in survivor.log() and time.monotonic() < deadline:
                time.sleep(0.2)

            again = run_dcmtk("movescu", "-d", *move, timeout=120)
            answers = move_responses(again.stdout)
            assert len(answers) == 1, again.stdout  # the final response alone: nothing sent again
            assert (answers[0]["status"], answers[0]["completed"], answers[0]["failed"], answers[0]["warning"]) == \
                ("0x0000", "15", "0", "0"), again.stdout
        finally:
            proxy.stop()
    finally:
        destination.stop()
    assert set(destination.received()) == wanted  # every instance whole, some of them twice at most
