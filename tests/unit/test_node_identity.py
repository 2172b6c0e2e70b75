"""A node's identity (generated once and kept, or configured and checked), its run marker, its blob keys and
its ingest stamps, which never go backwards across restarts whatever the clock does."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from bastion.archive import NODE_ID_FILE, RUNNING_MARKER, Archive, RunMarker, node_identity
from bastion.blobs.journal import segment_name, segment_owner
from bastion.ingest.stamps import RESERVE_NS, IngestStamps, raise_ceiling, read_ceiling
from bastion.model.records import object_key, parse_object_key
from bastion.settings import SettingsError, load_settings

pytestmark = pytest.mark.timeout(60)


def test_a_node_id_is_generated_once_and_kept(tmp_path: Path) -> None:
    settings = load_settings(None, env={}, data=tmp_path / "data")
    archive = Archive.open(settings)
    first = archive.node_id
    archive.close()
    assert re.fullmatch(r"[0-9a-f]{12}", first)
    assert (settings.data / NODE_ID_FILE).read_text().strip() == first
    archive = Archive.open(settings)
    try:
        assert archive.node_id == first
        assert not [n for n in os.listdir(settings.data) if n.startswith(f".{NODE_ID_FILE}.tmp-")]
    finally:
        archive.close()
    other = load_settings(None, env={}, data=tmp_path / "other")
    assert node_identity(other) != first  # another data directory, another node


def test_a_configured_node_id_is_used_as_given(tmp_path: Path) -> None:
    settings = load_settings(None, env={"BASTION_NODE_ID": "ward-3-a"}, data=tmp_path / "data")
    archive = Archive.open(settings)
    try:
        assert archive.node_id == "ward-3-a"
        assert archive.ingest.node_id == "ward-3-a"
        assert archive.blobs.stores[0].node_id == "ward-3-a"  # type: ignore[attr-defined]
    finally:
        archive.close()


@pytest.mark.parametrize("bad", ["node_1", "x" * 33, "nœud", "a b", "../up", "a/b"])
def test_an_invalid_configured_node_id_is_refused(tmp_path: Path, bad: str) -> None:
    settings = load_settings(None, env={}, data=tmp_path / "data", node_id=bad)
    with pytest.raises(SettingsError, match=r"setting node_id: .* is not a node id \(1-32 characters A-Z a-z 0-9 -\)"):
        Archive.open(settings)
    assert not (tmp_path / "data" / "blobs").exists()  # refused before anything was opened


def test_a_damaged_kept_node_id_is_refused(tmp_path: Path) -> None:
    settings = load_settings(None, env={}, data=tmp_path / "data")
    settings.data.mkdir()
    (settings.data / NODE_ID_FILE).write_text("not/a node\n")
    with pytest.raises(SettingsError, match="not a node id"):
        node_identity(settings)


def test_blob_keys_name_their_node_and_keys_without_one_still_parse() -> None:
    digest = "b3-" + "0" * 64
    stamp = f"{time.time_ns():020d}"
    new = object_key("1.2.840.1", stamp, digest, "node-7-b")
    old = object_key("1.2.840.1", stamp, digest)
    sha256 = object_key("1.2.840.1", stamp, "f" * 64)
    assert new.endswith(f"/1.2.840.1_{stamp}_node-7-b_{digest}.dcm")
    assert parse_object_key(new) == {"partition": new[:13], "sop": "1.2.840.1", "stamp": stamp, "node": "node-7-b",
                                     "digest": digest}
    assert parse_object_key(old) == {**parse_object_key(new), "node": ""}  # type: ignore[dict-item]
    assert parse_object_key(sha256) is not None and parse_object_key(sha256)["node"] == ""  # type: ignore[index]
    longest = object_key("1." * 63 + "12", stamp, digest, "n" * 32)
    assert parse_object_key(longest) is not None and len(longest.rsplit("/", 1)[1]) <= 255


def test_journal_segment_names_carry_their_node() -> None:
    for node in ("node-a", "7", "a-b-c"):
        assert segment_owner(segment_name(node)) == node
        assert segment_owner(segment_name(node, "", ".tmp-")) == node
    assert segment_owner(segment_name("")) == segment_owner("0123456789abcdef0123456789abcdef.wal") == ""


# -- run marker ---------------------------------------------------------------------------------------------
def _marker_after(tmp_path: Path, shared_text: str, node: str, own_text: str | None) -> bool:
    path = tmp_path / RUNNING_MARKER
    path.write_text(shared_text)
    own = tmp_path / f"{RUNNING_MARKER}-{node}"
    if own_text is None:
        own.unlink(missing_ok=True)
    else:
        own.write_text(own_text)
    marker = RunMarker(str(path), node)
    try:
        return marker.acquire()
    finally:
        marker.release()


def test_each_node_keeps_its_own_crash_state(tmp_path: Path) -> None:
    # Another node's unclean end is not this node's; this node's own file or a marker naming it is.
    assert not _marker_after(tmp_path, "running node-b 4242", "node-a", "clean")
    assert _marker_after(tmp_path, "running node-b 4242", "node-b", "clean")
    assert _marker_after(tmp_path, "clean", "node-a", "running node-a 4242")
    # A marker from before node ids (or a hand-written one) speaks for every node; none at all is a clean start.
    assert _marker_after(tmp_path, "running 4242", "node-a", None)
    assert _marker_after(tmp_path, "crashed", "node-a", "clean")
    assert not _marker_after(tmp_path, "clean", "node-a", None)
    assert not _marker_after(tmp_path, "", "node-a", None)
    # Both files say clean after the last opener leaves, and name the node while it runs.
    marker = RunMarker(str(tmp_path / RUNNING_MARKER), "node-a")
    marker.acquire()
    assert (tmp_path / RUNNING_MARKER).read_text() == f"running node-a {os.getpid()}"
    assert (tmp_path / f"{RUNNING_MARKER}-node-a").read_text() == f"running node-a {os.getpid()}"
    marker.release()
    assert (tmp_path / RUNNING_MARKER).read_text() == (tmp_path / f"{RUNNING_MARKER}-node-a").read_text() == "clean"


# -- ingest stamps ------------------------------------------------------------------------------------------
class SteppedClock:
    """A clock that a test sets: nanoseconds since the epoch."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def test_stamps_never_go_backwards_across_restarts(tmp_path: Path) -> None:
    ceiling = str(tmp_path / "stamp-ceiling")
    clock = SteppedClock(time.time_ns())
    first = IngestStamps(clock=clock, ceiling_file=ceiling)
    issued = [first.next() for _ in range(3)]
    clock.now -= 3600 * 1_000_000_000  # within the run: one more than the last
    issued.append(first.next())
    # Restarts with the clock an hour back, then a day back: each stamp above all before it.
    for back in (3600, 86400):
        restarted = IngestStamps(clock=SteppedClock(time.time_ns() - back * 1_000_000_000), ceiling_file=ceiling)
        issued += [restarted.next(), restarted.next()]
    assert issued == sorted(issued) and len(set(issued)) == len(issued)
    assert all(len(s) == 20 for s in issued)
    assert read_ceiling(ceiling) > int(issued[-1])


def test_the_floor_alone_keeps_stamps_above_those_an_index_holds() -> None:
    newest = time.time_ns()
    stamps = IngestStamps(clock=SteppedClock(newest - 3600 * 1_000_000_000), floor=newest)
    assert int(stamps.next()) == newest + 1


def test_the_ceiling_is_written_rarely_and_only_raised(tmp_path: Path) -> None:
    ceiling = str(tmp_path / "stamp-ceiling")
    clock = SteppedClock(time.time_ns())
    stamps = IngestStamps(clock=clock, ceiling_file=ceiling)
    values = []
    for _ in range(2000):  # two minutes of stamps, 60 ms apart
        clock.now += 60_000_000
        stamp = int(stamps.next())
        value = read_ceiling(ceiling)
        assert value > stamp  # written before the stamp was handed out
        if not values or value != values[-1]:
            values.append(value)  # every write raises it
    assert len(values) <= 2000 * 60_000_000 // RESERVE_NS + 1
    assert values == sorted(values)
    # Another process of the node asking for less leaves it where it is.
    assert raise_ceiling(ceiling, values[-1] - RESERVE_NS) == values[-1] == read_ceiling(ceiling)


_STAMPING_PROCESS = """
import sys
sys.path.insert(0, sys.argv[1])
from bastion.ingest.stamps import IngestStamps
clock = int(sys.argv[3])
stamps = IngestStamps(clock=lambda: clock, ceiling_file=sys.argv[2])
print("ready", flush=True)
for line in sys.stdin:
    print(stamps.next(), flush=True)
"""


def test_the_processes_of_a_node_never_issue_the_same_stamp_nor_one_below_another_s(tmp_path: Path) -> None:
    """Two worker processes of one node, started after a restart with the clock behind the ceiling (it went
    back, or the restart came within the reserve): the stamps they issue, in the order issued, rise strictly."""
    import subprocess
    import sys

    ceiling = str(tmp_path / "stamp-ceiling")
    now = time.time_ns()
    raise_ceiling(ceiling, now)  # the last run's ceiling
    src = str(Path(__file__).resolve().parents[2] / "src")
    workers = [subprocess.Popen([sys.executable, "-c", _STAMPING_PROCESS, src, ceiling, str(now - 10**9)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        issued = []
        for n in range(6):  # taking turns, as two associations' stores do
            worker = workers[n % 2]
            assert worker.stdin is not None and worker.stdout is not None
            worker.stdin.write("next\n")
            worker.stdin.flush()
            issued.append(int(worker.stdout.readline()))
    finally:
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.close()
            worker.wait(30)
    assert issued == sorted(issued) and len(set(issued)) == len(issued)
    assert all(stamp > now for stamp in issued)
    assert read_ceiling(ceiling) > issued[-1]
