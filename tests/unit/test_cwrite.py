"""The blob store's file write in C (``bastion.blobs._cwrite``): what it leaves on disk, and what it leaves when
it fails. The contract tests (tests/contract/test_blobs.py) run every blob store test through it as well."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.blobs import filesystem

CWRITE = filesystem.CWRITE
needs_cwrite = pytest.mark.skipif(CWRITE is None and bool(os.environ.get("BASTION_PURE_PYTHON")),
                                  reason="BASTION_PURE_PYTHON: the extension is not loaded on purpose")
pytestmark = needs_cwrite


def test_the_extension_is_built() -> None:
    """CI builds it (``make install``): a missing compiler must fail loudly, not make Bastion quietly slower."""
    assert CWRITE is not None


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 8191, 128 * 1024, 512 * 1024 + 1234, (1 << 20) + 1,
                                  3 * (1 << 20) + 7])
@pytest.mark.parametrize(("sync", "direct"), [(False, False), (True, False), (True, True)])
def test_files_hold_exactly_what_was_written(tmp_path: Path, size: int, sync: bool, direct: bool) -> None:
    assert CWRITE is not None
    first, second = os.urandom(size), os.urandom(size)
    CWRITE.create_file(str(tmp_path / "a"), bytearray(first), sync, sync, direct)
    CWRITE.create_file(str(tmp_path / "b"), second, sync, sync, direct)  # the thread's buffer is reused
    assert (tmp_path / "a").read_bytes() == first and (tmp_path / "b").read_bytes() == second


def test_an_existing_file_is_left_alone(tmp_path: Path) -> None:
    assert CWRITE is not None
    (tmp_path / "x").write_bytes(b"older")
    with pytest.raises(FileExistsError):
        CWRITE.create_file(str(tmp_path / "x"), b"newer" * 10_000, True, True, True)
    assert (tmp_path / "x").read_bytes() == b"older"


def test_a_missing_directory_is_an_os_error_naming_the_path(tmp_path: Path) -> None:
    assert CWRITE is not None
    with pytest.raises(FileNotFoundError) as info:
        CWRITE.create_file(str(tmp_path / "no" / "such"), b"x", True, True, True)
    assert info.value.filename == str(tmp_path / "no" / "such")


_FAILING_WRITE = """
import os, resource, signal, sys
from bastion.blobs import filesystem
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    filesystem.CWRITE.create_file(sys.argv[1], os.urandom(int(sys.argv[2])), True, True, sys.argv[3] == "1")
except OSError as exc:
    print(type(exc).__name__, exc.errno)
else:
    print("written")
"""


@pytest.mark.parametrize("direct", [False, True])
def test_a_write_that_fails_midway_leaves_no_file(tmp_path: Path, direct: bool) -> None:
    """A file size limit makes the write fail after the file was created (EFBIG), as a full disk would."""
    target = tmp_path / "cut.dcm"
    out = subprocess.run([sys.executable, "-c", _FAILING_WRITE, str(target), "600000", "1" if direct else "0"],
                         capture_output=True, text=True, timeout=60, check=True).stdout.split()
    # EFBIG; with O_DIRECT the write is cut to the limit, which is not a whole block: EINVAL
    assert out[0] == "OSError" and int(out[1]) in (errno.EFBIG, errno.EINVAL)
    assert not target.exists()


# -- the writer thread (submit / barrier): small journaled objects' files, written while the index works -------

def test_submitted_files_hold_what_was_given_even_if_the_buffer_changes_after(tmp_path: Path) -> None:
    assert CWRITE is not None
    datas = [os.urandom(n) for n in (0, 1, 9438, 128 * 1024 - 1)]
    buffers = [bytearray(d) for d in datas]
    pendings = [CWRITE.submit(str(tmp_path / f"{i}.dcm"), buf) for i, buf in enumerate(buffers)]
    for buf in buffers:  # the caller's buffer is free at once: the thread writes a copy
        buf[:] = b"overwritten"
    for pending in pendings:
        pending.wait()
        assert pending.done()
        pending.wait()  # again: the same answer
    assert [(tmp_path / f"{i}.dcm").read_bytes() for i in range(len(datas))] == datas


def test_a_submitted_write_reports_its_error_on_wait_and_leaves_what_existed(tmp_path: Path) -> None:
    assert CWRITE is not None
    (tmp_path / "x").write_bytes(b"older")
    exists = CWRITE.submit(str(tmp_path / "x"), b"newer")
    missing = CWRITE.submit(str(tmp_path / "no" / "such"), b"x")
    with pytest.raises(FileExistsError):
        exists.wait()
    with pytest.raises(FileNotFoundError) as info:
        missing.wait()
    assert info.value.filename == str(tmp_path / "no" / "such")
    assert (tmp_path / "x").read_bytes() == b"older"


def test_barrier_returns_once_every_file_submitted_before_it_is_written(tmp_path: Path) -> None:
    """The journal's checkpoint relies on it: its syncfs must cover the files of the records it voids.
    Pendings dropped without a wait are written all the same."""
    assert CWRITE is not None
    data = os.urandom(64 * 1024)
    for i in range(300):
        CWRITE.submit(str(tmp_path / f"{i}.dcm"), data)  # dropped at once
    CWRITE.barrier()
    assert all((tmp_path / f"{i}.dcm").stat().st_size == len(data) for i in range(300))


_FORKED = """
import os, sys
from bastion.blobs import filesystem
C = filesystem.CWRITE
C.submit(sys.argv[1] + "/parent", b"p").wait()  # the parent's thread is running when it forks
pid = os.fork()
if pid == 0:
    C.submit(sys.argv[1] + "/child", b"c").wait()  # the child starts a thread of its own
    C.barrier()
    os._exit(0)
_, status = os.waitpid(pid, 0)
C.submit(sys.argv[1] + "/parent-after", b"q").wait()
print(os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_writes_with_a_thread_of_its_own(tmp_path: Path) -> None:
    """The server's supervisor forks its workers; a thread does not survive a fork."""
    out = subprocess.run([sys.executable, "-c", _FORKED, str(tmp_path)], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["0"]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {
        "parent": b"p", "child": b"c", "parent-after": b"q"}


@pytest.mark.parametrize("size", [0, 4095, 4096, 128 * 1024, 512 * 1024 + 1234, 3 * (1 << 20) + 7])
def test_durable_submits_run_in_parallel_threads_and_hold_what_was_given(tmp_path: Path, size: int) -> None:
    """Files flushed on their own (from 128 KB: ``sync``, ``sync_dir``, ``direct``), several at once."""
    assert CWRITE is not None
    datas = [os.urandom(size) for _ in range(6)]
    pendings = [CWRITE.submit(str(tmp_path / f"{i}.dcm"), bytearray(d), sync=True, sync_dir=True,
                              direct=True) for i, d in enumerate(datas)]
    for pending in pendings:
        pending.wait()
    assert [(tmp_path / f"{i}.dcm").read_bytes() for i in range(len(datas))] == datas
    with pytest.raises(FileExistsError):
        CWRITE.submit(str(tmp_path / "0.dcm"), b"newer", sync=True, sync_dir=True, direct=True).wait()
    assert (tmp_path / "0.dcm").read_bytes() == datas[0]


def test_a_flush_job_reports_its_error(tmp_path: Path) -> None:
    assert CWRITE is not None
    with open(tmp_path / "f", "wb") as fh:
        CWRITE.submit_sync(fh.fileno()).wait()  # a file: flushed
    with pytest.raises(OSError) as info:
        CWRITE.submit_sync(-1).wait()
    assert info.value.errno == errno.EBADF


def test_drain_returns_once_no_job_of_either_queue_is_left(tmp_path: Path) -> None:
    """The blob store calls it before its journal closes the segments that flushes name."""
    assert CWRITE is not None
    data = os.urandom(256 * 1024)
    with open(tmp_path / "segment", "wb") as segment:
        for i in range(8):  # dropped at once, both queues
            CWRITE.submit(str(tmp_path / f"{i}.dcm"), data, sync=True, sync_dir=True, direct=True)
            CWRITE.submit(str(tmp_path / f"small-{i}.dcm"), data[:9000])
            CWRITE.submit_sync(segment.fileno(), parallel=True)
        CWRITE.drain()
    assert all((tmp_path / f"{i}.dcm").read_bytes() == data for i in range(8))
    assert all((tmp_path / f"small-{i}.dcm").stat().st_size == 9000 for i in range(8))



def test_a_failed_flush_reports_its_error(tmp_path: Path) -> None:
    assert CWRITE is not None
    with open(tmp_path / "segment", "wb") as segment:
        segment.write(b"x")
        CWRITE.submit_sync(segment.fileno(), parallel=True).wait()
    with pytest.raises(OSError) as info:
        CWRITE.submit_sync(-1, parallel=True).wait()
    assert info.value.errno == errno.EBADF


def test_durable_files_in_several_directories_are_written_and_their_directories_synced(tmp_path: Path) -> None:
    """A durable file's directory is fsync'd by another thread while its data is written and flushed, once for
    all the files of a directory queued together: files in different directories, submitted at once, each end
    up whole (and a directory that is gone by then fails only its own file)."""
    assert CWRITE is not None
    dirs = [tmp_path / f"d{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
    datas = {d / f"{i}.dcm": os.urandom(200_000 + i) for d in dirs for i in range(4)}
    pendings = [CWRITE.submit(str(path), data, sync=True, sync_dir=True, direct=True)
                for path, data in datas.items()]
    for pending in pendings:
        pending.wait()
    assert all(path.read_bytes() == data for path, data in datas.items())
    with pytest.raises(FileNotFoundError):
        CWRITE.submit(str(tmp_path / "missing" / "x.dcm"), b"x" * 5000, sync=True, sync_dir=True, direct=True).wait()


def test_a_buffer_holds_what_was_appended_and_cannot_grow_under_a_view() -> None:
    assert CWRITE is not None
    buf = CWRITE.Buffer(16)
    data = os.urandom(300_000)
    for off in range(0, len(data), 70_000):  # past its capacity several times
        buf += data[off: off + 70_000]
    assert len(buf) == len(data) and bytes(buf) == data
    view = memoryview(buf)
    assert view.readonly
    with pytest.raises(BufferError):  # more than any memory the pool keeps (16 MB): it must grow
        buf.extend(b"x" * (17 << 20))
    view.release()
    buf.extend(b"tail")
    assert bytes(buf)[-4:] == b"tail" and len(CWRITE.Buffer()) == 0


@pytest.mark.parametrize("size", [0, 10, 200_000, 530_000])
def test_a_submitted_buffer_is_written_from_its_own_memory_even_once_it_is_gone(tmp_path: Path, size: int) -> None:
    """submit() takes a share of a Buffer's memory instead of copying it: the job still writes the right bytes
    when the Buffer is dropped at once, and the memory, given back, serves the next Buffer."""
    assert CWRITE is not None
    data = [os.urandom(size) for _ in range(6)]
    jobs = []
    for i, payload in enumerate(data):
        buf = CWRITE.Buffer(size)
        buf += payload
        jobs.append(CWRITE.submit(str(tmp_path / str(i)), buf, sync=True, sync_dir=True, direct=True))
        del buf
    for job in jobs:
        job.wait()
    assert [(tmp_path / str(i)).read_bytes() for i in range(len(data))] == data


@pytest.mark.parametrize("size", [0, 10, 200_000])
def test_a_submitted_buffer_is_frozen_and_its_file_holds_what_was_submitted(tmp_path: Path, size: int) -> None:
    """The job shares the Buffer's memory, so submit() freezes it: every later write raises, reads still work,
    and the file holds exactly the bytes submitted."""
    assert CWRITE is not None
    payload = os.urandom(size)
    buf = CWRITE.Buffer(size)
    buf += payload
    assert not buf.frozen
    job = CWRITE.submit(str(tmp_path / "x.dcm"), buf, sync=True, sync_dir=True, direct=True)
    assert buf.frozen
    with pytest.raises(BufferError):
        buf += b"more"
    with pytest.raises(BufferError):
        buf.extend(b"more")
    with pytest.raises(BufferError):
        buf.extend(b"")  # not even nothing
    with pytest.raises(BufferError):
        buf.__init__(1 << 20)  # re-initialising would drop or grow its memory
    with pytest.raises((BufferError, TypeError)):  # no writable view either (it never had one)
        io.BytesIO(b"overwrite").readinto(buf)
    with memoryview(buf) as view:  # reading is what the blob store still does (journal record, fallbacks)
        assert view.readonly and bytes(view) == payload
    assert len(buf) == size
    job.wait()
    assert (tmp_path / "x.dcm").read_bytes() == payload
    again = CWRITE.submit(str(tmp_path / "y.dcm"), buf)  # a frozen Buffer may be written out again
    again.wait()
    assert (tmp_path / "y.dcm").read_bytes() == payload


def test_a_buffer_given_to_create_file_stays_writable(tmp_path: Path) -> None:
    """create_file writes before it returns: nothing shares the Buffer afterwards."""
    assert CWRITE is not None
    buf = CWRITE.Buffer()
    buf += b"head"
    CWRITE.create_file(str(tmp_path / "x"), buf, False, False, False)
    buf += b"tail"
    assert not buf.frozen and bytes(buf) == b"headtail"
    assert (tmp_path / "x").read_bytes() == b"head"


_FORK = """
import os, sys
from bastion.blobs.filesystem import CWRITE


def write(name):
    CWRITE.submit(os.path.join(sys.argv[1], name), name.encode()).wait()


write("parent-0")  # starts the parent's ordered thread
pid = os.fork()
if pid == 0:  # the child has none of its parent's threads: its first submit starts its own
    for i in range(3):
        write(f"child-{i}")
    os._exit(0)
_, status = os.waitpid(pid, 0)
write("parent-1")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_writes_with_threads_of_its_own(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-c", _FORK, str(tmp_path)], capture_output=True, text=True, timeout=60,
                   check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child-0", "child-1", "child-2", "parent-0", "parent-1"]
    assert (tmp_path / "child-2").read_bytes() == b"child-2"
