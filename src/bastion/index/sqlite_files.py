"""The files of a SQLite index, and the atomic swap of ``bastion index rebuild``.

An index at ``path`` is the database file itself and, beside it, SQLite's write-ahead log and shared-memory
index (``-wal``, ``-shm``: WAL mode), the lock file the index's writers ``flock`` (``-writer.lock``) and the
change log's durable mark (``-seqmark``, :mod:`bastion.index.seqmark`). No module outside the SQLite index
names these files: the layers above ask :func:`rebuild_into`, or its two steps apart (the online rebuild of a
running server): :func:`build_beside`, while the live index serves, then :func:`swap_in`, while no process has it
open.

Guarantees of :func:`rebuild_into` (and of :func:`swap_in` after :func:`build_beside`):

* At every moment ``path`` holds either the old index or the new one, whole: the new database is made under
  another name and renamed over the old one, and its directory is ``fsync``'d after.
* The new index never meets the old one's write-ahead log: the old log is checkpointed into its database and
  removed, and the new database has none (it was closed and checkpointed) when it is renamed into place.
* The change log's mark never goes down: the new index's mark, raised to at least the old index's floor
  (:func:`bastion.index.base.log_floor`), replaces the old mark before the database is swapped.
* No ``seq`` is handed out twice: the build starts the new log after the old one's floor as it was then; if the
  live index handed out more since (an online rebuild), the new log's entries are moved up past the floor at the
  swap (:func:`bastion.index.sqlite_log.move_log_after`), keeping their order.
* If the build fails, the live index is left as it was and the partial one is removed.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

from bastion.index.base import Index
from bastion.index.seqmark import SUFFIX as SEQMARK_SUFFIX
from bastion.index.seqmark import SeqMark
from bastion.index.sqlite_damage import forget_damage, noted_damage

T = TypeVar("T")

#: SQLite's files beside a database in WAL mode: the write-ahead log and its shared-memory index.
WAL_SUFFIXES = ("-wal", "-shm")
#: The lock file the index's writers ``flock`` (every process that writes the index opens it).
WRITER_LOCK_SUFFIX = "-writer.lock"
#: Where :func:`rebuild_into` builds the new index, beside the live one (the same filesystem: the rename is atomic).
REBUILD_SUFFIX = ".rebuild"
#: Every file an index at ``path`` may have, as suffixes of ``path`` (``""``: the database itself).
INDEX_FILE_SUFFIXES = ("", *WAL_SUFFIXES, WRITER_LOCK_SUFFIX, SEQMARK_SUFFIX)


def rebuild_into(path: str, build: Callable[[Index], T]) -> T:
    """Build a new index beside the SQLite index file ``path`` with ``build`` and swap it in: ``build``'s result.

    :func:`build_beside`, then :func:`swap_in`. The caller makes sure no process uses the index meanwhile
    (``bastion.archive.exclusive``): a process holding the old file open would go on using it.
    """
    result = build_beside(path, build)
    swap_in(path)
    return result


def build_beside(path: str, build: Callable[[Index], T]) -> T:
    """Build a new index beside the SQLite index file ``path`` (at ``path`` + :data:`REBUILD_SUFFIX`) with
    ``build``: its result. The live index is not touched and may serve meanwhile.

    ``build`` is given the new, empty index (open) and fills it; once it returns, the new index is closed, its
    write-ahead log copied into it and removed: the file alone is the whole new index, ready for :func:`swap_in`.
    What an interrupted build left beside ``path`` is removed first; if ``build`` fails, what it made is removed.
    """
    from bastion.index.sqlite import SqliteIndex

    if path == ":memory:":
        raise ValueError("an in-memory index is not rebuilt into a file")
    new = path + REBUILD_SUFFIX
    discard_beside(path)
    index = SqliteIndex(new)
    try:
        result = build(index)
    except BaseException:
        index.close()
        discard_beside(path)
        raise
    index.close()
    _settle_wal(new)
    _remove_files(new, (WRITER_LOCK_SUFFIX,))  # the live index keeps its own
    return result


def built_beside(path: str) -> bool:
    """True if a new index built by :func:`build_beside` waits beside ``path`` for :func:`swap_in`."""
    return os.path.exists(path + REBUILD_SUFFIX)


def discard_beside(path: str) -> None:
    """Remove a new index (whole or partial) beside ``path``: a build that will not be swapped in."""
    _remove_files(path + REBUILD_SUFFIX, INDEX_FILE_SUFFIXES)


def swap_in(path: str, finish: Callable[[Index], T] | None = None) -> T | None:
    """Swap the index that :func:`build_beside` made in for the one at ``path``, as the module docstring
    guarantees; ``finish``'s result (None without it). No process may have the index at ``path`` open: one that
    did would go on using the old file.

    ``finish``, if given, is given the new index (open) before the swap, to record what was stored after it was
    built (crash-recovery style); if it fails, nothing is swapped (the new index stays beside ``path``). Raises
    FileNotFoundError if no new index waits beside ``path``.
    """
    from bastion.index.sqlite import SqliteIndex
    from bastion.index.sqlite_log import log_floor, move_log_after

    new = path + REBUILD_SUFFIX
    if not os.path.exists(new):
        raise FileNotFoundError(f"no rebuilt index waits at {new}")
    result = None
    if finish is not None:
        index = SqliteIndex(new)
        try:
            result = finish(index)
        finally:
            index.close()
        _remove_files(new, (WRITER_LOCK_SUFFIX,))
    _settle_wal(new)  # nothing, after build_beside alone
    floor = log_floor(path)
    conn = sqlite3.connect(f"file:{os.path.abspath(new)}?mode=rw", uri=True, timeout=60, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        move_log_after(conn, floor)
        conn.execute("COMMIT")
    finally:
        conn.close()
    moved_floor = log_floor(new)  # (it reads the file: before the write-ahead log is settled and removed)
    _settle_wal(new)
    SeqMark(new).raise_to(max(floor, moved_floor))
    _settle_wal(path)
    os.replace(new + SEQMARK_SUFFIX, path + SEQMARK_SUFFIX)
    os.replace(new, path)
    _fsync_directory(os.path.dirname(os.path.abspath(path)))
    return result


#: What a SQLite index file that cannot be used is renamed to, followed by the UTC time (:func:`set_aside_if_corrupt`).
CORRUPT_SUFFIX = ".corrupt-"


def set_aside_if_corrupt(path: str) -> str | None:
    """If the index file ``path`` cannot be opened or fails ``PRAGMA quick_check``: rename it, with its write-ahead
    log, to ``<path>.corrupt-<UTC time>`` (the new index must never meet that log) and return what was wrong and
    where it went; None for a missing or sound file (or one busy with another process: not a corruption).

    The change log's mark (``-seqmark``) and the writers' lock stay: the new index's log starts after the mark, so
    no ``seq`` is handed out twice. The caller is alone with the index (crash detection's lock held exclusively).
    """
    if not os.path.exists(path):
        return None
    noted = noted_damage(path)
    try:
        if noted is not None:  # a process met the damage while it was in use: quick_check may not find it
            raise sqlite3.DatabaseError(f"found damaged while in use: {noted}")
        conn = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=rw", uri=True, timeout=10)
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
        problem = None if rows == [("ok",)] else "; ".join(str(r[0]) for r in rows[:3])
    except sqlite3.Error as exc:
        if isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc)):
            return None
        problem = str(exc)
    if problem is None:
        return None
    aside = path + CORRUPT_SUFFIX + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    os.replace(path, aside)
    for suffix in WAL_SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            os.replace(path + suffix, aside + suffix)
    forget_damage(path)
    _fsync_directory(os.path.dirname(os.path.abspath(path)))
    return f"{problem}: moved aside to {aside}"


def _settle_wal(path: str) -> None:
    """Copy whatever the write-ahead log of the database ``path`` holds into it, then remove the log and its
    shared-memory index: the database file alone is then the whole index. A database SQLite cannot open (a
    reason to rebuild it) loses its log."""
    if os.path.exists(path):
        try:
            conn = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=rw", uri=True, timeout=60)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                conn.close()
        except sqlite3.Error:
            pass
    _remove_files(path, WAL_SUFFIXES)


def _remove_files(path: str, suffixes: tuple[str, ...]) -> None:
    for suffix in suffixes:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
