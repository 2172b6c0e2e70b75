"""The filesystem blob store's write-ahead journal (bastion.blobs.journal): what it promises after a crash.

A process that dies without closing its store leaves its journal segments behind. Files whose
writes had not reached the disk when the power went are simulated by damaging them after the
process is gone; opening the store again must put every journaled object back byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bastion.blobs import filesystem
from bastion.blobs.filesystem import FileBlobStore
from bastion.blobs.journal import HEADER_SIZE, Journal, read_segment, sync_filesystem

pytestmark = pytest.mark.timeout(60)


def _payload(i: int, size: int = 5000) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (size // 32) + i.to_bytes(4, "little")


def _store_and_die(root: Path, count: int, *, delete: list[int] = (), size: int = 5000,  # type: ignore[assignment]
                   fail_file: list[int] = ()) -> None:  # type: ignore[assignment]
    """In a child process: store ``count`` objects (deleting some again) and exit without closing.

    The file writes of the objects in ``fail_file`` fail (as on a full disk).
    """
    code = (
        "import errno, os, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2] / 'src')!r})\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "from bastion.blobs import journal\n"
        "from bastion.blobs import filesystem\n"
        "from bastion.errors import BastionError\n"
        "journal.CHECKPOINT_INTERVAL_S = 600  # no checkpoint in between: every record stays\n"
        "from test_blob_journal import _payload\n"
        f"failing = {[f'd/{i}.dcm' for i in fail_file]!r}\n"
        "real_write = filesystem.FileWriter._write_file\n"
        "def write_file(self, final, buf, **kw):\n"
        "    if any(final.endswith(k) for k in failing):\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return real_write(self, final, buf, **kw)\n"
        "filesystem.FileWriter._write_file = write_file\n"
        "real_c = filesystem.CWRITE\n"
        "class Full:\n"
        "    def wait(self):\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "if real_c is not None:  # the C writes (the writer thread's, and from 128 KB) fail for them too\n"
        "  class FailingC:\n"
        "    Buffer = real_c.Buffer\n"
        "    barrier = staticmethod(real_c.barrier)\n"
        "    ordered_idle = staticmethod(real_c.ordered_idle)\n"
        "    submit_sync = staticmethod(real_c.submit_sync)\n"
        "    @staticmethod\n"
        "    def create_file(path, *args):\n"
        "        if any(path.endswith(k) for k in failing):\n"
        "            raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "        return real_c.create_file(path, *args)\n"
        "    @staticmethod\n"
        "    def submit(path, data, *args, **kwargs):\n"
        "        if any(path.endswith(k) for k in failing):\n"
        "            return Full()\n"
        "        return real_c.submit(path, data, *args, **kwargs)\n"
        "else:\n"
        "  FailingC = None\n"
        f"s = filesystem.FileBlobStore({str(root)!r}, cwrite=FailingC)\n"
        f"for i in range({count}):\n"
        "    try:\n"
        f"        s.put(f'd/{{i}}.dcm', _payload(i, {size}))\n"
        "    except BastionError:  # StorageFull\n"
        "        assert f'd/{i}.dcm' in failing\n"
        f"for i in {list(delete)!r}:\n"
        "    s.delete(f'd/{i}.dcm')\n"
        "os._exit(0)\n"  # no close(): the journal stays, as after kill -9 or a power failure
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _segments(root: Path) -> list[Path]:
    return sorted((root / ".journal").glob("*.wal"))


def test_objects_lost_after_a_crash_are_rewritten_from_the_journal(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    _store_and_die(root, 40)
    records = [r for seg in _segments(root) for r in read_segment(str(seg))]
    assert len(records) == 40  # within one checkpoint interval: all still journaled
    # The power went before the page cache reached the disk: files empty, cut short, gone, or wrong.
    (root / "d/0.dcm").write_bytes(b"")
    (root / "d/1.dcm").write_bytes(_payload(1)[:1000])
    (root / "d/2.dcm").unlink()
    (root / "d/3.dcm").write_bytes(b"x" * len(_payload(3)))
    reopened = FileBlobStore(str(root))
    assert reopened.replayed == 4
    for i in range(40):
        assert reopened.get(f"d/{i}.dcm") == _payload(i)
    assert _segments(root) == []  # replayed once, then removed
    assert FileBlobStore(str(root)).replayed == 0


def test_a_torn_record_ends_the_replay(tmp_path: Path) -> None:
    """A record whose write did not complete was never acknowledged: it and what follows do not count."""
    root = tmp_path / "blobs"
    _store_and_die(root, 10)
    (seg,) = [s for s in _segments(root) if list(read_segment(str(s)))]
    records = list(read_segment(str(seg)))
    assert [r.key for r in records] == [f"d/{i}.dcm" for i in range(10)]
    # Flip a byte inside the data of record 6 (records are laid out back to back after the header).
    offset = HEADER_SIZE
    for r in records[:6]:
        offset += 4 + 8 + 1 + 2 + 8 + 32 + 4 + len(r.key) + len(r.data)
    offset += 4 + 8 + 1 + 2 + 8 + 32 + 4 + len(records[6].key) + 100
    with open(seg, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert [r.key for r in read_segment(str(seg))] == [f"d/{i}.dcm" for i in range(6)]
    for i in range(10):
        (root / f"d/{i}.dcm").write_bytes(b"")
    reopened = FileBlobStore(str(root))
    assert reopened.replayed == 6
    assert [reopened.size(f"d/{i}.dcm") for i in range(10)] == [len(_payload(0))] * 6 + [0] * 4


def test_a_deleted_object_is_not_brought_back(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    _store_and_die(root, 5, delete=[2])
    reopened = FileBlobStore(str(root))
    assert not reopened.exists("d/2.dcm")
    assert sorted(reopened.keys()) == [f"d/{i}.dcm" for i in (0, 1, 3, 4)]


def test_a_live_process_keeps_its_journal(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    live = FileBlobStore(str(root))
    live.put("d/a.dcm", b"alive")
    segments = _segments(root)
    assert len(segments) == 2
    other = FileBlobStore(str(root))  # e.g. a CLI command beside the server
    assert other.replayed == 0 and _segments(root) == segments
    live.close()
    assert _segments(root) == []  # a clean stop checkpoints and removes its journal
    assert other.get("d/a.dcm") == b"alive"


def test_spool_leftovers_of_dead_processes_are_cleared_and_live_ones_kept(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    FileBlobStore(str(root)).close()
    spool = root / ".spool"
    dead = subprocess.Popen(["true"])
    dead.wait()
    (spool / f"{dead.pid}-0123").write_bytes(b"partial")
    (spool / "leftover-of-an-older-version").write_bytes(b"partial")
    live = f"{os.getppid()}-4567"  # pytest's parent process: alive
    (spool / live).write_bytes(b"being received")
    stale = spool / f"{os.getppid()}-89ab"  # a live pid, but a day old: the pid was reused
    stale.write_bytes(b"left by an earlier process with the same pid")
    os.utime(stale, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    FileBlobStore(str(root))
    assert os.listdir(spool) == [live]


def test_rotation_and_group_commit_under_concurrent_writers(tmp_path: Path) -> None:
    """Tiny segments force many rotations and checkpoints while four threads store at once."""
    root = tmp_path / "blobs"
    store = FileBlobStore(str(root))
    store._journal = Journal(str(root / ".journal"), lambda: sync_filesystem(str(root)),
                             segment_size=HEADER_SIZE + 64 * 1024, max_segment_size=HEADER_SIZE + 256 * 1024,
                             interval_s=0.05)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(150):
                store.put(f"t{t}/{i}.dcm", _payload(t * 1000 + i, 1000 + 97 * (i % 40)))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    journal = store._journal
    assert journal.checkpoints >= 3
    assert max(seg.size for seg in journal._segments) > HEADER_SIZE + 64 * 1024  # grew under load
    for t in range(4):
        for i in range(150):
            assert store.get(f"t{t}/{i}.dcm") == _payload(t * 1000 + i, 1000 + 97 * (i % 40))
    store.close()
    assert _segments(root) == []


def test_objects_too_large_for_the_journal_are_fsynced_directly(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    store = FileBlobStore(str(root))
    big = os.urandom(9 * 1024 * 1024)  # past the in-memory buffer: streamed through a spool file
    store.put("d/big.dcm", big)
    records = [r for seg in _segments(root) for r in read_segment(str(seg))]
    assert [r.key for r in records] == []
    assert store.get("d/big.dcm") == big
    store.close()


def test_objects_of_128_kb_or_more_are_durable_without_the_journal(tmp_path: Path) -> None:
    """They are fsync'd in place (file, then directory) before commit returns, so the journal holds nothing of
    them; one whose file could not be written leaves nothing behind."""
    root = tmp_path / "blobs"
    size = 300 * 1024
    _store_and_die(root, 12, size=size, fail_file=[4, 9])
    assert [r for seg in _segments(root) for r in read_segment(str(seg))] == []
    reopened = FileBlobStore(str(root))
    assert reopened.replayed == 0
    for i in range(12):
        if i in (4, 9):
            assert not reopened.exists(f"d/{i}.dcm"), f"object {i} failed to store but is there"
        else:
            assert reopened.get(f"d/{i}.dcm") == _payload(i, size)
    assert os.listdir(root / ".spool") == []


def test_records_written_before_a_rotation_are_durable_when_waited_for(tmp_path: Path) -> None:
    """``write`` then ``wait`` later (the ingest pipeline runs its index statements in between): a checkpoint
    that rotates the segments meanwhile makes the waiting records durable, and their tickets still resolve."""
    root = tmp_path / "blobs"
    root.mkdir()
    journal = Journal(str(root / ".journal"), lambda: sync_filesystem(str(root)), interval_s=0.05)
    try:
        tickets = [journal.write(f"d/{i}.dcm", bytes(32), [_payload(i)], len(_payload(i))) for i in range(5)]
        assert tickets == sorted(tickets) and len(set(tickets)) == 5
        deadline = time.monotonic() + 10
        while journal.checkpoints == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert journal.checkpoints >= 1  # rotated past the records before anyone waited for them
        later = journal.write("d/late.dcm", bytes(32), [b"x" * 100], 100)
        for ticket in [*tickets, later]:
            journal.wait(ticket)
        journal.wait(later)  # asking again is fine
        assert journal._synced >= later
    finally:
        journal.close()


@pytest.mark.skipif(filesystem.CWRITE is None, reason="the compiled writer is not loaded")
@pytest.mark.parametrize("ordered_busy", [False, True])
def test_a_journaled_file_is_handed_over_or_created_before_its_record_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ordered_busy: bool) -> None:
    """The checkpoint that voids a record waits for every file the ordered ``_cwrite`` thread was given before it
    (``barrier``), then runs the ``syncfs`` that must cover the record's file: so the file must be handed over, or
    created, before the record is written. The ordered thread creates it; if that thread is busy with another
    store's file (an import's jobs), the store's own thread creates it."""
    real = filesystem.CWRITE
    order: list[tuple[str, object]] = []

    class Recording:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def submit(self, path: str, data: object, **options: bool) -> object:
            order.append(("file", "handed over"))
            return real.submit(path, data, **options)

        def create_file(self, path: str, *args: object) -> None:
            order.append(("created here", os.path.basename(path)))
            real.create_file(path, *args)

        def ordered_idle(self) -> bool:
            return not ordered_busy and bool(real.ordered_idle())

    journal_write = Journal.write

    def write(self: Journal, key: str, *args: object, **options: object) -> int:
        order.append(("record", key))
        return journal_write(self, key, *args, **options)

    monkeypatch.setattr(Journal, "write", write)
    store = FileBlobStore(str(tmp_path / "blobs"), cwrite=Recording())
    try:
        w = store.writer()
        w.write(_payload(3))
        w.start_commit("d/3.dcm")()
        first = ("created here", "3.dcm") if ordered_busy else ("file", "handed over")
        assert order == [first, ("record", "d/3.dcm")]
        assert store.get("d/3.dcm") == _payload(3)
    finally:
        store.close()


def test_a_failed_outside_flush_fails_every_record_it_covered(tmp_path: Path) -> None:
    """``pending_sync``/``synced``: after a failed ``fdatasync`` a later one may succeed without the data (the
    kernel forgets the error), so a record the failed flush covered never counts as durable."""
    root = tmp_path / "blobs"
    root.mkdir()
    journal = Journal(str(root / ".journal"), lambda: sync_filesystem(str(root)), interval_s=600)
    try:
        first = journal.write("d/1.dcm", bytes(32), [_payload(1)], len(_payload(1)), writeback=False)
        second = journal.write("d/2.dcm", bytes(32), [_payload(2)], len(_payload(2)), writeback=False)
        prepared = journal.pending_sync(first)
        assert prepared is not None and prepared[1] >= second  # one flush covers both
        with pytest.raises(OSError, match="lost"):
            journal.synced(first, prepared[1], OSError(5, "lost"))
        with pytest.raises(OSError, match="lost"):  # the second's own flush "succeeded" later
            journal.synced(second, prepared[1], None)
        with pytest.raises(OSError, match="lost"):
            journal.wait(second)
        third = journal.write("d/3.dcm", bytes(32), [_payload(3)], len(_payload(3)), writeback=False)
        again = journal.pending_sync(third)
        assert again is not None
        journal.synced(third, again[1], None)  # written after the failure: it counts
        assert journal.pending_sync(third) is None
        journal.wait(third)
    finally:
        journal.close()


def test_a_store_whose_journal_flush_fails_is_not_stored(tmp_path: Path) -> None:
    """The flush a ``_cwrite`` thread runs fails (EIO): the commit raises and the object's file is removed."""
    from bastion.blobs import filesystem
    from bastion.errors import StorageError

    real = filesystem.CWRITE
    if real is None:
        pytest.skip("the journal's flush in a thread needs _cwrite")

    class Failed:
        def done(self) -> bool:
            return True

        def wait(self) -> None:
            raise OSError(5, "Input/output error")

    class FailingFlush:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        @staticmethod
        def submit_sync(fd: int, parallel: bool = False, notify: bool = False) -> Failed:
            return Failed()

    store = FileBlobStore(str(tmp_path / "blobs"), cwrite=FailingFlush())
    try:
        with pytest.raises(StorageError):
            store.put("d/1.dcm", _payload(1))
        assert not store.exists("d/1.dcm")
        store.cwrite = real
        store.put("d/1.dcm", _payload(1))  # sent again: the failure covered only what was written before it
        assert store.get("d/1.dcm") == _payload(1)
    finally:
        store.close()


def test_a_segment_being_created_is_never_taken_by_another_process_opening_the_store(tmp_path: Path) -> None:
    """Another process opening the store removes the ``.tmp-`` files of segments whose creator died; one
    still being created (opened, not yet locked) must not be taken from its creator (a race that once left a
    worker without its journal until restart)."""
    journal_dir = tmp_path / ".journal"
    journal_dir.mkdir()
    stop = tmp_path / "stop"
    cleaner = subprocess.Popen([sys.executable, "-c", (
        "import os, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2] / 'src')!r})\n"
        "from bastion.blobs.journal import orphaned_segments\n"
        f"while not os.path.exists({str(stop)!r}):\n"
        f"    for _path, fd in orphaned_segments({str(journal_dir)!r}):\n"
        "        os.close(fd)\n"
    )])
    try:
        for _ in range(1500):
            journal = Journal(str(journal_dir), lambda: None, segment_size=2 * HEADER_SIZE)
            journal.close()
    finally:
        stop.touch()
        cleaner.wait(30)
    assert cleaner.returncode == 0
    assert sorted(os.listdir(journal_dir)) == []


def test_a_delete_journaled_in_another_segment_stays_deleted_whatever_the_segment_names(tmp_path: Path) -> None:
    """An object's record in one segment and its tombstone in the next (the first not yet checkpointed when
    the process died): replay must not bring the object back, whichever segment it reads first."""
    root = tmp_path / "blobs"
    journal_dir = root / ".journal"
    code = (
        "import os, sys, threading\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2] / 'src')!r})\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "from bastion.blobs.journal import HEADER_SIZE, TOMBSTONE, Journal\n"
        "from bastion.model.digest import of_bytes as digest_bytes\n"
        "from test_blob_journal import _payload\n"
        "never = threading.Event()\n"
        f"j = Journal({str(journal_dir)!r}, lambda: never.wait(), segment_size=HEADER_SIZE + 64 * 1024)\n"
        "x, y = _payload(1, 40_000), _payload(2, 40_000)\n"
        "j.append('d/x.dcm', digest_bytes(x), [x], len(x))\n"
        "j.append('d/y.dcm', digest_bytes(y), [y], len(y))  # does not fit: the other segment takes it\n"
        "j.append('d/x.dcm', bytes(32), [], 0, kind=TOMBSTONE)\n"
        "os._exit(0)\n"  # the first segment's checkpoint never finished: both segments count
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    segments = _segments(root)
    assert len(segments) == 2
    kinds = {seg: [(r.key, r.kind) for r in read_segment(str(seg))] for seg in segments}
    tombstoned = next(seg for seg, records in kinds.items() if ("d/x.dcm", 1) in records)
    other = next(seg for seg in segments if seg != tombstoned)
    assert ("d/x.dcm", 0) in kinds[other]
    for first, second in ((tombstoned, other), (other, tombstoned)):  # both orders of the random names
        case = tmp_path / f"case-{first == tombstoned}"
        shutil.copytree(root, case)
        (case / ".journal" / first.name).rename(case / ".journal" / "0.wal")
        (case / ".journal" / second.name).rename(case / ".journal" / "f.wal")
        reopened = FileBlobStore(str(case))
        assert not (case / "d/x.dcm").exists()
        assert reopened.get("d/y.dcm") == _payload(2, 40_000)
        assert _segments(case) == []


def test_a_delete_stays_deleted_when_the_segment_holding_its_record_could_not_be_replayed(tmp_path: Path) -> None:
    """An object's record in one segment, its tombstone in another, and the first segment's replay fails (here a
    file stands where a directory of another of its objects must go; a full disk or an I/O error alike): the
    tombstone's segment must not be removed before the record's has been applied, or the next replay, the
    obstacle gone, brings the deleted object back."""
    root = tmp_path / "blobs"
    journal_dir = root / ".journal"
    code = (
        "import os, sys, threading\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2] / 'src')!r})\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "from bastion.blobs.journal import HEADER_SIZE, TOMBSTONE, Journal\n"
        "from bastion.model.digest import of_bytes as digest_bytes\n"
        "from test_blob_journal import _payload\n"
        "never = threading.Event()\n"
        f"j = Journal({str(journal_dir)!r}, lambda: never.wait(), segment_size=HEADER_SIZE + 64 * 1024)\n"
        "x, z, y = _payload(1, 40_000), _payload(3, 1000), _payload(2, 40_000)\n"
        "j.append('d/x.dcm', digest_bytes(x), [x], len(x))\n"
        "j.append('e/z.dcm', digest_bytes(z), [z], len(z))\n"
        "j.append('d/y.dcm', digest_bytes(y), [y], len(y))  # does not fit: the other segment takes it\n"
        "j.append('d/x.dcm', bytes(32), [], 0, kind=TOMBSTONE)\n"
        "os._exit(0)\n"  # the first segment's checkpoint never finished: both segments count
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert len(_segments(root)) == 2
    (root / "e").write_bytes(b"in the way of e/z.dcm")

    FileBlobStore(str(root))  # the segment of x and z cannot be replayed
    assert not (root / "d/x.dcm").exists()

    (root / "e").unlink()
    reopened = FileBlobStore(str(root))
    assert not (root / "d/x.dcm").exists()  # still deleted
    assert reopened.get("e/z.dcm") == _payload(3, 1000)
    assert reopened.get("d/y.dcm") == _payload(2, 40_000)
    assert _segments(root) == []


def test_a_failed_journal_flush_is_reported_even_when_the_file_of_its_store_failed_too(
        tmp_path: Path) -> None:
    """Two stores' records in the journal; the later store's flush (covering both) fails (EIO) and so does the
    creation of its file (a full disk). The earlier store's own flush, run after, "succeeds" (the kernel forgot
    the error): the earlier store must not be acknowledged, as its record may not be on the disk."""
    import errno

    from bastion.blobs import filesystem
    from bastion.errors import StorageError, StorageFull

    real = filesystem.CWRITE
    if real is None:
        pytest.skip("the journal's flush in a thread needs _cwrite")

    class Outcome:
        def __init__(self, error: OSError | None) -> None:
            self.error = error

        def done(self) -> bool:
            return True

        def wait(self) -> None:
            if self.error is not None:
                raise self.error

    flushes = iter([Outcome(None), Outcome(OSError(errno.EIO, "Input/output error"))])

    class FailingDisk:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        @staticmethod
        def ordered_idle() -> bool:
            return True

        @staticmethod
        def submit(path: str, data: object, **kwargs: object) -> object:
            if path.endswith("d/2.dcm"):
                return Outcome(OSError(errno.ENOSPC, "No space left on device"))
            return real.submit(path, data, **kwargs)

        @staticmethod
        def submit_sync(fd: int, parallel: bool = False, notify: bool = False) -> Outcome:
            return next(flushes)  # the earlier store's succeeds, the later one's (covering both) fails

    store = FileBlobStore(str(tmp_path / "blobs"), cwrite=FailingDisk())
    try:
        earlier = store.writer()
        earlier.write(_payload(1))
        first = earlier.start_commit("d/1.dcm")
        later = store.writer()
        later.write(_payload(2))
        second = later.start_commit("d/2.dcm")
        with pytest.raises((StorageError, StorageFull)):
            second()
        with pytest.raises(StorageError, match="Input/output"):
            first()
    finally:
        store.close()
