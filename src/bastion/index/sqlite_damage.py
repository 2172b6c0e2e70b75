"""What a process noticed of a damaged SQLite index file, kept beside it (``<index>-damaged``) for the others.

SQLite reports a damaged database file as ``SQLITE_CORRUPT`` ("database disk image is malformed") or
``SQLITE_NOTADB`` when a statement meets the damage, which may be long after it happened and only in one of the
server's processes. The first process to meet it writes the note (:func:`note_damage`); every process then sees it
(:func:`noted_damage`): ``/health`` says ``degraded`` with the remedy, and the next start of ``bastion serve`` moves
the file aside and rebuilds the index from the stored objects (:func:`bastion.index.sqlite_files.set_aside_if_corrupt`),
even where ``PRAGMA quick_check`` would not find the damage (committed rows lost, not a broken b-tree).

A note names the inode of the file it is about: once the file is replaced (``bastion index rebuild``, moved aside
and made anew), the note no longer applies and is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time

#: What the note's file name adds to the index file's.
DAMAGE_SUFFIX = "-damaged"


def is_damage(error: BaseException) -> bool:
    """Whether ``error`` (an SQLite error, or what the C recorder raised with SQLite's message) says the database
    file itself is damaged: not busy, not full, not a bad statement."""
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)  # extended codes keep the primary low
    text = str(error)
    return "database disk image is malformed" in text or "file is not a database" in text


def note_damage(path: str, message: str) -> bool:
    """Note that the index file ``path`` is damaged (``message``: what SQLite said); False if it was noted
    already (or the file is gone)."""
    try:
        inode = os.stat(path).st_ino
    except FileNotFoundError:
        return False
    if noted_damage(path) is not None:
        return False
    note = json.dumps({"inode": inode, "message": message, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "pid": os.getpid()})
    tmp = f"{path}{DAMAGE_SUFFIX}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(note + "\n")
    os.replace(tmp, path + DAMAGE_SUFFIX)
    return True


def noted_damage(path: str) -> str | None:
    """What was noted of the damage of the index file ``path`` as it is now (``<message> (noted <time>)``), or
    None."""
    try:
        with open(path + DAMAGE_SUFFIX) as fh:
            note = json.loads(fh.read())
        if note["inode"] != os.stat(path).st_ino:
            return None
        return f"{note['message']} (noted {note['at']})"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def forget_damage(path: str) -> None:
    """Remove the note beside ``path`` (the file it was about was moved aside)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path + DAMAGE_SUFFIX)
