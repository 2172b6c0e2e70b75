"""The files of a SQLite index, and the atomic swap of ``bastion index rebuild``.

An index at ``path`` is the database file itself and, beside it, SQLite's write-ahead log and shared-memory
index (``-wal``, ``-shm``: WAL mode), the lock file the index's writers ``flock`` (``-writer.lock``) and the
change log's durable mark (``-seqmark``, :mod:`bastion.index.seqmark`). No module outside the SQLite index
names these files: the layers above ask :func:`rebuild_into`.

Guarantees of :func:`rebuild_into`:

* At every moment ``path`` holds either the old index or the new one, whole: the new database is made under
  another name and renamed over the old one, and its directory is ``fsync``'d after.
* The new index never meets the old one's write-ahead log: the old log is checkpointed into its database and
  removed, and the new database has none (it was closed and checkpointed) when it is renamed into place.
* The change log's mark never goes down: the new index's mark, raised to at least the old index's floor
  (:func:`bastion.index.base.log_floor`), replaces the old mark before the database is swapped. (That the new
  log's entries come after that floor is the build's to arrange: it is given the index, not the log's history.)
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

    ``build`` is given the new, empty index (open) and fills it; once it returns, the new index is closed and
    replaces the one at ``path`` (which need not exist) as the module docstring guarantees. What an interrupted
    rebuild left beside ``path`` is removed first. The caller makes sure no process uses the index meanwhile
    (``bastion.archive.exclusive``): a process holding the old file open would go on using it.
    """
    from bastion.index.sqlite import SqliteIndex
    from bastion.index.sqlite_log import log_floor

    if path == ":memory:":
        raise ValueError("an in-memory index is not rebuilt into a file")
    new = path + REBUILD_SUFFIX
    _remove_files(new, INDEX_FILE_SUFFIXES)
    index = SqliteIndex(new)
    try:
        result = build(index)
    except BaseException:
        index.close()
        _remove_files(new, INDEX_FILE_SUFFIXES)
        raise
    index.close()
    _settle_wal(new)
    _remove_files(new, (WRITER_LOCK_SUFFIX,))  # the live index keeps its own
    SeqMark(new).raise_to(log_floor(path))
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
