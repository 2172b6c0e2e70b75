"""Filesystem blob store: one file per object, durable before commit returns.

An object buffered in memory and smaller than :data:`JOURNAL_MAX_BYTES` is made durable by the store's
write-ahead journal (:mod:`bastion.blobs.journal`): its file is written without a flush and the object is
appended to the journal with one ``fdatasync``. A larger buffered object (up to :data:`MEMORY_LIMIT`) is
written in place (with ``O_DIRECT`` where possible) and made durable by ``fdatasync`` of its file and ``fsync`` of
its directory; one past that is streamed through a spool file, fsync'd and renamed into place. The flush of a
buffered object overlaps the ingest pipeline's index transaction (:meth:`FileWriter.start_commit`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

from bastion.blobs.base import BlobStore
from bastion.blobs.file_writer import FileWriter
from bastion.blobs.fileio import holds, os_error, sync_all
from bastion.blobs.journal import (
    OBJECT,
    TOMBSTONE,
    Journal,
    fsync_dir,
    orphaned_segments,
    read_segment,
    record_size,
    sync_filesystem,
)
from bastion.errors import NotFound, StorageError
from bastion.model.compiled import load_extension
from bastion.model.records import is_node_id

log = logging.getLogger("bastion.blobs")

#: Threads per process that write buffered objects and wait for their flush while the index transaction runs,
#: where ``_cwrite`` is not built (its own threads do it otherwise: ``DURABLE_THREADS`` in ``_cwrite.c``).
COMMIT_THREADS = 4


#: The file write in C without the GIL (``_cwrite.c``), or None where the Python one runs.
CWRITE = load_extension("bastion.blobs._cwrite")


class FileBlobStore(BlobStore):
    """Objects as files under ``root``; the key is the relative path.

    ``node_id`` names the node this store belongs to when several share ``root``: its spool files and journal
    segments carry it, and opening the store clears or replays only its own (and those named in the single-node
    form, without a node id, which come from an archive that had one node). ``""``: that single-node form.
    """

    def __init__(self, root: str, *, journal: bool = True, node_id: str = "", cwrite: Any = "compiled") -> None:
        """``cwrite``: the compiled writer, None for the Python one; ``"compiled"`` (the default): :data:`CWRITE`,
        which is None where it is not built."""
        if node_id and not is_node_id(node_id):
            raise ValueError(f"invalid node id {node_id!r}")
        self.node_id = node_id
        self.cwrite = CWRITE if cwrite == "compiled" else cwrite
        self.location = self.root = os.path.abspath(root)
        #: The capacity a new writer's buffer starts with: about the size of the last object committed from one.
        self.buffer_hint = 64 * 1024
        self.spool_dir = os.path.join(self.root, ".spool")
        self.journal_dir = os.path.join(self.root, ".journal")
        os.makedirs(self.spool_dir, exist_ok=True)
        self._known_dirs: set[str] = {self.root}
        where = os.stat(self.root)
        self._device = where.st_dev  # the filesystem the store is on (see revive)
        self._root_inode = where.st_ino  # the directory this process writes into (made again: another inode)
        # The journal needs fdatasync and pwritev (Linux; not macOS): elsewhere objects are fsync'd one by one.
        self._use_journal = journal and hasattr(os, "fdatasync") and hasattr(os, "pwritev")
        self._journal: Journal | None = None
        self._journal_failed_pid = 0
        self._pools: dict[str, ThreadPoolExecutor] = {}  # committer(), made on first use
        self._pools_pid = 0
        self._lazy_lock = threading.Lock()  # the journal is made on first use (or prepare), once
        # Journals of this node's processes that are gone hold objects whose files may not have reached the disk.
        self.replayed = self.replay_journal()
        # Spool files left by this node's processes that are gone are never visible objects; clear them. (They
        # are named after their node and process, so a command opening the store beside a live server spares its
        # files, and a node never takes another's: whether that one's process lives is not known on this host.)
        # A day-old file goes whatever its name says (a process id can be reused, e.g. 1 in a container).
        for name in os.listdir(self.spool_dir):
            path = os.path.join(self.spool_dir, name)
            node, pid = _spool_owner(name)
            with contextlib.suppress(OSError):
                if ((node in ("", node_id) and not _process_alive(pid))
                        or time.time() - os.stat(path).st_mtime > 86400):
                    os.unlink(path)

    def spool_path(self) -> str:
        """A new spool file's path, named after this node and process: ``<node>-<pid>-<uuid>``
        (``<pid>-<uuid>`` without a node id)."""
        name = f"{os.getpid()}-{uuid.uuid4().hex}"
        return os.path.join(self.spool_dir, f"{self.node_id}-{name}" if self.node_id else name)

    def journal_for(self, key: str, size: int) -> Journal | None:
        """This process's journal if an object of ``size`` bytes goes through it, else None."""
        if not self._use_journal:
            return None
        journal = self._journal
        pid = os.getpid()
        if journal is None or journal.pid != pid:  # none yet, or inherited across fork: not ours
            with self._lazy_lock:
                journal = self._journal
                if journal is None or journal.pid != pid:
                    if self._journal_failed_pid == pid:
                        return None
                    try:
                        journal = self._journal = Journal(self.journal_dir, self._checkpoint, node_id=self.node_id)
                    except OSError as exc:
                        self._journal_failed_pid = pid
                        log.warning("blob journal unavailable (%s): objects are fsync'd one by one", exc)
                        return None
        return journal if record_size(key, size) <= journal.capacity() else None

    def _checkpoint(self) -> None:
        """Make every file of the journal's records durable: the files still being written first."""
        if self.cwrite is not None:
            self.cwrite.barrier()
        sync_filesystem(self.root)

    def revive(self) -> bool:
        """Make the store's directory again, empty, if it was lost (deleted, or a disk replaced by an empty one of
        the same mount), with a new journal: the repair (:mod:`bastion.blobs.repair`) then fills it. Not when the
        directory is now on another filesystem than when the store was opened (a disk that is not mounted: its
        copies would go to the disk below). Returns whether the store's directory is there (again)."""
        try:
            root = os.stat(self.root)
        except OSError:
            root = None
        if (root is not None and root.st_dev == self._device and root.st_ino == self._root_inode
                and os.path.isdir(self.spool_dir)):
            return True
        # Gone, or made again (by this node's other process, the repair's): this process's journal and the
        # directories it knows went with the old one.
        here = self.root if root is not None else os.path.dirname(self.root)
        try:
            if os.stat(here).st_dev != self._device:
                log.error("blob store %s: its directory is not on the filesystem it was on (a disk not mounted?): "
                          "left out until that is put right", self.root)
                return False
            with self._lazy_lock:
                journal, self._journal = self._journal, None
                if journal is not None and journal.pid == os.getpid():
                    if self.cwrite is not None:
                        self.cwrite.drain()
                    with contextlib.suppress(OSError):
                        journal.close()  # its segments went with the directory; the objects they held are copies
                os.makedirs(self.spool_dir, exist_ok=True)
                self._known_dirs = {self.root}
                self._root_inode = os.stat(self.root).st_ino
        except OSError as exc:
            log.error("blob store %s: cannot make its directory again: %s", self.root, exc)
            return False
        log.warning("blob store %s: its directory was gone and was made again (empty): the repair copies the "
                    "objects back into it", self.root)
        return True

    def committer(self) -> ThreadPoolExecutor:
        """This process's commit threads: they write buffered objects and wait for the disk while the
        committing thread goes on (with the index transaction, in the ingest pipeline)."""
        return self._pool("bastion-blob-commit", COMMIT_THREADS)

    def _pool(self, name: str, threads: int) -> ThreadPoolExecutor:
        if self._pools_pid != os.getpid():  # threads do not survive a fork
            with self._lazy_lock:
                if self._pools_pid != os.getpid():
                    self._pools, self._pools_pid = {}, os.getpid()
        pool = self._pools.get(name)
        if pool is None:
            with self._lazy_lock:
                pool = self._pools.get(name)
                if pool is None:
                    pool = self._pools[name] = ThreadPoolExecutor(threads, thread_name_prefix=name)
        return pool

    def forget(self, key: str) -> None:
        """Record in the journal that ``key`` must not be replayed (deleted, or its commit failed after its record)."""
        journal = self._journal
        if journal is not None and journal.pid == os.getpid():
            try:
                journal.append(key, bytes(32), [], 0, kind=TOMBSTONE)
            except (OSError, ValueError) as exc:
                log.warning("blob journal: cannot record that %s is gone: %s", key, exc)

    def prepare(self) -> None:
        """Create this process's journal segments now, so that its first store does not wait for their zero-filling."""
        self.journal_for("", 0)

    def replay_journal(self) -> int:
        """Rewrite, from the journals of this node's processes that are gone, objects whose files are missing or
        incomplete.

        Returns how many files were rewritten. Runs when the store is opened; safe beside live processes, and
        beside other nodes sharing the store: their segments are theirs to replay
        (:func:`bastion.blobs.journal.orphaned_segments`).
        Keys are written once (a new version gets a new key), so a tombstone in any segment replayed together
        is final: an object deleted after its record stays deleted even when the tombstone went to another
        segment than the record, whichever segment is read first. The segments are removed only once all of
        them are applied and the files are durable: if one cannot be, all stay for the next open.
        """
        segments = list(orphaned_segments(self.journal_dir, self.node_id))
        restored = 0
        try:
            deleted: set[str] = set()
            failed = False
            for path, _fd in segments:
                try:
                    deleted.update(r.key for r in read_segment(path) if r.kind == TOMBSTONE)
                except OSError as exc:
                    log.error("cannot read blob journal %s: %s", path, exc)
                    failed = True
            replayed = []
            for path, _fd in segments:
                try:
                    rewritten, count = self._replay_segment(path, deleted)
                except OSError as exc:
                    log.error("cannot replay blob journal %s: %s", path, exc)
                    failed = True
                    continue
                replayed.append(path)
                restored += rewritten
                (log.warning if rewritten else log.info)(
                    "blob journal %s replayed: %d key(s), %d file(s) rewritten", os.path.basename(path),
                    count, rewritten)
            if replayed:
                sync_filesystem(self.root)
            if failed:  # a tombstone of a segment removed now would no longer cover the records of one kept
                log.error("blob journal: every segment kept until all can be replayed (at the next open)")
            else:
                for path in replayed:
                    os.unlink(path)
        except OSError as exc:
            log.error("cannot finish the blob journal replay: %s", exc)
        finally:
            for _path, fd in segments:
                os.close(fd)
        return restored

    def _replay_segment(self, path: str, deleted: set[str]) -> tuple[int, int]:
        """Apply one segment: keys in ``deleted`` are removed, other objects rewritten where their file does not
        hold them. Returns (files rewritten, keys seen)."""
        # Within a segment the last record of a key decides (an object whose commit failed after its record
        # stays gone), so a first pass finds it and the second applies only that one.
        last = {record.key: n for n, record in enumerate(read_segment(path))}
        rewritten = 0
        for n, record in enumerate(read_segment(path)):
            if last.get(record.key) != n:
                continue
            try:
                final = self.path_of(record.key)
            except StorageError:
                continue
            if record.kind == TOMBSTONE or record.key in deleted:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(final)
            elif record.kind == OBJECT and not holds(final, record.data):
                self._write_durably(final, record.data)
                rewritten += 1
        return rewritten, len(last)

    def _write_durably(self, final: str, data: bytes) -> None:
        tmp = self.spool_path()
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            sync_all(fh.fileno())
        self.make_dirs(os.path.dirname(final))
        os.rename(tmp, final)
        fsync_dir(os.path.dirname(final))

    def path_of(self, key: str) -> str:
        """The file path of ``key``; refuses keys that would leave the store."""
        # No empty part (a leading, trailing or doubled "/") and no part starting with "." (so no "." or "..").
        if not key or key[0] in "/." or key[-1] == "/" or "//" in key or "/." in key:
            raise StorageError(f"invalid blob key {key!r}")
        return os.path.join(self.root, key)

    def make_dirs(self, path: str) -> None:
        """Create ``path`` and its parents, fsync'ing each parent that gained an entry."""
        if path in self._known_dirs:
            return
        parent = os.path.dirname(path)
        if parent != path and parent not in self._known_dirs:
            self.make_dirs(parent)
        try:
            os.mkdir(path)
            fsync_dir(parent)
        except FileExistsError:
            pass
        self._known_dirs.add(path)

    def writer(self) -> FileWriter:
        return FileWriter(self)

    def put_once(self, key: str, data: bytes) -> bool:
        """Written and flushed under a spool name, then linked to its key: ``link`` never replaces a file, so of
        writers racing the first to link wins; the directory is flushed before this returns True."""
        final = self.path_of(key)
        tmp = self.spool_path()
        try:
            self.make_dirs(os.path.dirname(final))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    sync_all(fd)
                finally:
                    os.close(fd)
                os.link(tmp, final)
                fsync_dir(os.path.dirname(final))
                return True
            except FileExistsError:
                return holds(final, data)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        except OSError as exc:
            raise os_error(exc, f"cannot commit {key}") from exc

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self.path_of(key), "rb")  # noqa: SIM115
        except FileNotFoundError as exc:
            raise NotFound(f"object {key} is missing from the blob store") from exc
        except OSError as exc:
            raise os_error(exc, f"cannot read {key}") from exc

    def size(self, key: str) -> int:
        try:
            return os.stat(self.path_of(key)).st_size
        except FileNotFoundError as exc:
            raise NotFound(f"object {key} is missing from the blob store") from exc

    def delete(self, key: str) -> None:
        try:
            os.unlink(self.path_of(key))
        except FileNotFoundError:
            pass
        self.forget(key)  # a replay after a crash must not bring the object back

    def set_aside(self, key: str) -> str | None:
        """Move the object to ``<root>/.quarantine/<key>`` (never served, listed or indexed from there)."""
        source = self.path_of(key)
        target = os.path.join(self.quarantine_dir, *key.split("/"))
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(source, target)
        except OSError as exc:
            raise os_error(exc, f"cannot set {key} aside") from exc
        return target

    @property
    def quarantine_dir(self) -> str:
        """Where :meth:`set_aside` keeps objects: ``<root>/.quarantine``."""
        return os.path.join(self.root, ".quarantine")

    def set_aside_count(self) -> int:
        return sum(len(files) for _, _, files in os.walk(self.quarantine_dir))

    def close(self) -> None:
        pools, self._pools = self._pools, {}
        if self._pools_pid == os.getpid():
            for pool in pools.values():
                pool.shutdown(wait=True)
        journal, self._journal = self._journal, None
        if journal is not None and journal.pid == os.getpid():
            if self.cwrite is not None:  # no flush of _cwrite's may still name a segment the journal closes
                self.cwrite.drain()
            try:
                journal.close()
            except OSError as exc:  # its segments stay and are replayed on the next open
                log.error("blob journal: final checkpoint failed: %s", exc)

    def keys(self, prefix: str = "") -> Iterator[str]:
        start = self.root if not prefix else os.path.join(self.root, *prefix.strip("/").split("/"))
        if not os.path.isdir(start):
            return
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, self.root)
            for name in filenames:
                if not name.startswith("."):
                    yield name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"

    def usage(self) -> tuple[int | None, int | None]:
        """Raises StorageError when the store's directory is gone or on another filesystem (see :meth:`revive`)."""
        if not os.path.isdir(self.spool_dir) or os.stat(self.root).st_dev != self._device:
            raise StorageError(f"the directory {self.root} is gone, or not on the filesystem it was on")
        du = shutil.disk_usage(self.root)
        return (du.used, du.free)


_UUID_HEX = re.compile(r"[0-9a-f]{32}")


def _spool_owner(name: str) -> tuple[str, str]:
    """``(node id, process id)`` that a spool file's name gives: ``<node>-<pid>-<uuid>``; for the single-node
    form ``<pid>-<uuid>``, or a name of neither form, ``("", <the text before the first "-">)``."""
    parts = name.rsplit("-", 2)  # a uuid's hex holds no "-"; a node id may
    if len(parts) == 3 and is_node_id(parts[0]) and parts[1].isdigit() and _UUID_HEX.fullmatch(parts[2]):
        return parts[0], parts[1]
    return "", name.split("-", 1)[0]


def _process_alive(pid: str) -> bool:
    """True if ``pid`` (a spool file's process id) names a running process on this host, this one included."""
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
