"""Nodes sharing one blob store: each owns its spool files, journal segments and crash recovery by node id.

The other node is a real process (a child) that keeps its uploads open, or a process of that node that died
and left its files; neither takes the liveness of another node's processes from this host, nor does it need
``flock`` to reach across hosts: ownership is read from the files' names.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BastionServer, make_study

from bastion.archive import RUNNING_MARKER, Archive
from bastion.blobs.filesystem import FileBlobStore
from bastion.model import digest
from bastion.model.levels import QueryLevel
from bastion.model.records import object_key, parse_object_key
from bastion.settings import load_settings

pytestmark = pytest.mark.timeout(120)

SRC = str(Path(__file__).resolve().parents[2] / "src")
BIG = 9 * 1024 * 1024  # past the writer's memory limit: streamed through a spool file


def _leave_leftovers(root: Path, node: str, key: str, data: bytes) -> None:
    """In a child process of node ``node``: start an upload (a spool file), journal ``data`` under ``key``
    without writing its file (as if the power had cut it short), and die without closing anything."""
    code = (
        "import os, sys\n"
        f"sys.path.insert(0, {SRC!r})\n"
        "from bastion.blobs.filesystem import FileBlobStore\n"
        "from bastion.blobs.journal import Journal\n"
        "from bastion.model.digest import of_bytes\n"
        f"store = FileBlobStore({str(root)!r}, node_id={node!r})\n"
        "w = store.writer()\n"
        f"w.write(b'x' * {BIG})\n"
        f"j = Journal(store.journal_dir, lambda: None, interval_s=600, node_id={node!r})\n"
        f"data = {data!r}\n"
        f"j.append({key!r}, of_bytes(data), [data], len(data))\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _spool(root: Path) -> list[str]:
    return sorted(os.listdir(root / ".spool"))


def _segments(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(root / ".journal") if n.endswith(".wal"))


def test_a_node_opening_the_store_never_takes_another_nodes_uploads_or_journal(tmp_path: Path) -> None:
    root = tmp_path / "shared-blobs"
    lost = {node: (f"2026/01/01/00/lost-{node or 'single'}.dcm", f"journaled by {node or 'single'}".encode() * 100)
            for node in ("node-a", "node-b", "")}
    for node in ("node-a", "node-b"):
        _leave_leftovers(root, node, *lost[node])
    left_by = {node: [n for n in _spool(root) if n.startswith(f"{node}-")] for node in ("node-a", "node-b")}
    assert all(len(names) == 1 for names in left_by.values()) and len(_spool(root)) == 2
    assert len(_segments(root)) == 4  # two per process

    # Node B, alive: an upload in flight (a spool file) and a live journal (an object committed through it).
    live = subprocess.Popen([sys.executable, "-c", (
        "import sys\n"
        f"sys.path.insert(0, {SRC!r})\n"
        "from bastion.blobs.filesystem import FileBlobStore\n"
        f"store = FileBlobStore({str(root)!r}, node_id='node-b')\n"
        "big = store.writer()\n"
        f"big.write(b'b' * {BIG})\n"
        "small = store.writer()\n"
        "small.write(b'small object of node b')\n"
        "small.commit('2026/01/01/00/small-b.dcm')\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "big.commit('2026/01/01/00/big-b.dcm')\n"
        "store.close()\n"
        "print('done', flush=True)\n"
    )], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout is not None and live.stdin is not None
        assert live.stdout.readline().strip() == "ready"
        # Node B's process replayed its own dead process's journal and cleared its spool file on opening.
        assert (root / lost["node-b"][0]).read_bytes() == lost["node-b"][1]
        assert left_by["node-b"][0] not in _spool(root)
        _leave_leftovers(root, "node-b", "2026/01/01/00/lost-b-again.dcm", b"again" * 100)  # another one
        _leave_leftovers(root, "", *lost[""])  # and one of an archive from before node ids
        # A process of node B whose spool file is two days old: it goes whoever opens the store, as before.
        stale = root / ".spool" / "node-b-1-0123456789abcdef0123456789abcdef"
        stale.write_bytes(b"stale")
        os.utime(stale, (time.time() - 2 * 86400,) * 2)
        in_flight = [n for n in _spool(root) if n.startswith(f"node-b-{live.pid}-")]
        assert len(in_flight) == 1
        b_segments = [n for n in _segments(root) if n.startswith("node-b-")]
        assert len(b_segments) == 4  # the live process's two and the dead one's two

        a = FileBlobStore(str(root), node_id="node-a")
        try:
            # Its own and the single-node archive's leftovers: replayed, removed.
            for node in ("node-a", ""):
                key, data = lost[node]
                assert a.get(key) == data
            assert a.replayed == 2
            assert not [n for n in _segments(root) if not n.startswith("node-b-")]
            # Node B's: none touched, live or dead (only the two-day-old spool file went).
            assert sorted(n for n in _segments(root)) == sorted(b_segments)
            assert not a.exists("2026/01/01/00/lost-b-again.dcm")
            spool = _spool(root)
            assert in_flight[0] in spool and not stale.exists()
            assert [n for n in spool if n.startswith("node-b-") and n not in in_flight]  # the dead B's upload
            assert not [n for n in spool if not n.startswith("node-b-")]  # A's and the single node's: cleared
        finally:
            a.close()

        live.stdin.write("go\n")
        live.stdin.flush()
        assert live.stdout.readline().strip() == "done"
        assert live.wait(60) == 0
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()
    assert (root / "2026/01/01/00/big-b.dcm").read_bytes() == b"b" * BIG  # its upload survived node A's open

    # Node B starts again: its dead process's journal and upload are its own to take up.
    b = FileBlobStore(str(root), node_id="node-b")
    try:
        assert b.get("2026/01/01/00/lost-b-again.dcm") == b"again" * 100
        assert _segments(root) == [] and _spool(root) == []
    finally:
        b.close()


def test_crash_recovery_takes_up_only_the_nodes_own_objects(tmp_path: Path) -> None:
    """Two archives (data directories, node ids) over one blob directory. Node A recovering from a crash
    neither indexes nor sets aside an object node B is still writing (its file not yet complete, under B's key);
    its own torn one it sets aside, as before."""
    shared = tmp_path / "shared-blobs"
    a_settings = load_settings(None, env={}, data=tmp_path / "a", blobs=str(shared), node_id="node-a")
    b_settings = load_settings(None, env={}, data=tmp_path / "b", blobs=str(shared), node_id="node-b")
    study = make_study(tmp_path / "study", series=1, per_series=3)
    a = Archive.open(a_settings)
    b = Archive.open(b_settings)
    try:
        stored_a = a.ingest.store_bytes(study.files[0].read_bytes(), "test")
        stored_b = b.ingest.store_bytes(study.files[1].read_bytes(), "test")
        assert parse_object_key(stored_a.record.blob_key)["node"] == "node-a"  # type: ignore[index]
        assert parse_object_key(stored_b.record.blob_key)["node"] == "node-b"  # type: ignore[index]
        # Node B is writing its next object: the file is there, its bytes not all yet.
        data = study.files[2].read_bytes()
        stamp = f"{time.time_ns():020d}"
        b_writing = object_key(study.sop_uids[2], stamp, digest.text(digest.of_bytes(data)), "node-b")
        a_torn = object_key(study.sop_uids[2], stamp, digest.text(digest.of_bytes(data)), "node-a")
        for key in (b_writing, a_torn):
            (shared / key).parent.mkdir(parents=True, exist_ok=True)
            (shared / key).write_bytes(data[: len(data) // 2])
        a.close()
        (a_settings.data / RUNNING_MARKER).write_text("crashed")
        a = Archive.open(a_settings)
        assert (shared / b_writing).read_bytes() == data[: len(data) // 2], "node A took up node B's object"
        assert not (shared / a_torn).exists()
        assert (shared / ".quarantine" / a_torn).exists()
        assert {r.sop_uid for r in a.retriever.select(QueryLevel.IMAGE, [])} == {study.sop_uids[0]}
    finally:
        a.close()
        b.close()


def test_a_server_names_its_node_in_its_log_and_statistics(tmp_path: Path) -> None:
    server = BastionServer(tmp_path / "data", settings={"BASTION_NODE_ID": "ward-3-a"}).start()
    try:
        assert server.stats()["node_id"] == "ward-3-a"
    finally:
        server.stop()
    assert re.search(r"Bastion \S+: node ward-3-a, DICOM", server.log()), server.log()
