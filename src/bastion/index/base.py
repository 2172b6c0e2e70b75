"""The Index interface: record stored objects, answer queries, keep the change log.

The change log
--------------
Every change to what is indexed appends one :class:`Change`: ``stored`` (a new current version),
``superseded`` (a current version replaced by newer bytes under the same SOP Instance UID) or ``deleted``
(an instance removed, :meth:`Index.delete_instance`). Consumers (the metadata warmer; replication and
forwarding later) follow it and remember a :class:`LogPosition`: the log's ``epoch`` and the ``seq`` of the
last entry they handled. The index guarantees:

* **A seq is never reused and never goes backwards**, across restarts, :meth:`Index.clear` and ``bastion index
  rebuild``: a new log continues after every seq the index handed out before (the rebuild starts the new
  index's log after the old one's, :meth:`Index.start_log_after`), and a durable high-water mark kept beside
  the index (:mod:`bastion.index.seqmark`) carries the floor across a power failure that lost the index's last
  commits (:meth:`Index.resume_log_after_crash`, run by crash recovery) and across an old index that can no
  longer be read. The mark is only a floor: the stored files stay the truth.
* **A log has an identity.** A new index, :meth:`Index.clear` and a rebuild start a new log with a new epoch:
  it describes the objects indexed from then on afresh (a rebuild records every stored object again, oldest
  first). :meth:`Index.changes_after` returns the entries after a position of the current log; for a position
  of a log that is gone (another epoch, or past the end of this one) it returns none, with ``reset`` set and
  the new log's start as the position to go on from. The consumer decides what a reset means to it: one whose
  work is idempotent (the metadata warmer) reads the new log from its start and skips what it already did.
  Within one epoch a consumer that resumes from its stored position after a restart sees every change after it
  once, in order, none skipped or repeated.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from bastion.index.reports import ReportQuery, ReportRow
from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition
from bastion.model.records import InstanceRecord, JsonDataset, StoredObject, StoreStatus

T = TypeVar("T")

#: The kinds of change-log entries: a new current version, a current version replaced by newer bytes, an
#: instance removed from the index; and the copies' findings (:mod:`bastion.blobs.copies`): a copy of a version
#: found missing, corrupt, unreadable or not written in one of the blob stores, and such a copy made good again
#: (which store, and what was wrong: ``/api/statistics``'s findings).
STORED, SUPERSEDED, DELETED = "stored", "superseded", "deleted"
COPY_WANTING, COPY_REPAIRED = "copy-wanting", "copy-repaired"
CHANGE_KINDS = (STORED, SUPERSEDED, DELETED, COPY_WANTING, COPY_REPAIRED)


@dataclass(frozen=True)
class Change:
    """One entry of the change log (``seq`` increases, never reused; see the module docstring)."""

    seq: int
    kind: str  # one of CHANGE_KINDS
    sop_uid: str
    series_uid: str
    study_uid: str
    blob_key: str
    at: str  # ISO 8601 UTC


@dataclass(frozen=True)
class LogPosition:
    """A place in the change log: the log's ``epoch`` and the ``seq`` of the last entry handled there.

    Written as ``<epoch>:<seq>`` (:meth:`parse` reads it back), so a consumer can keep it in a file.
    """

    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}:{self.seq}"

    @classmethod
    def parse(cls, text: str) -> LogPosition:
        """The position written as ``<epoch>:<seq>``; ValueError for anything else."""
        epoch, sep, seq = text.strip().rpartition(":")
        if not sep or not epoch or ":" in epoch:
            raise ValueError(f"not a change-log position: {text!r}")
        return cls(epoch, int(seq))


@dataclass(frozen=True)
class LogRead:
    """What :meth:`Index.changes_after` found after a position.

    ``changes``: the entries after it, oldest first. ``position``: where to go on from (the last entry returned,
    else the position asked for). ``reset``: the position belongs to a log that is gone (cleared, rebuilt, or it
    lies past this log's end); ``changes`` is then empty and ``position`` is the start of the current log.
    """

    changes: tuple[Change, ...]
    position: LogPosition
    reset: bool = False


@dataclass(frozen=True)
class Statistics:
    """Counts for the admin page and ``/api/statistics``."""

    patients: int
    studies: int
    series: int
    instances: int
    versions: int
    stored_bytes: int
    last_change: int
    stored_last_minute: int = 0


@dataclass(frozen=True)
class Version:
    """A stored version of an instance: current or superseded."""

    blob_key: str
    digest: str
    size: int
    current: bool


class Index(abc.ABC):
    """What the archive remembers about its blobs; rebuildable from them."""

    location: str
    closed: bool = False  # set by close(): background readers (e.g. the metadata warmer) then stop

    @abc.abstractmethod
    def record(self, obj: StoredObject, durable: Callable[[], None] | None = None,
               same_content: Callable[[str], bool] | None = None, *,
               keep_outdated: bool = True) -> tuple[StoreStatus, int | None]:
        """Record a stored version in one transaction (durable on return).

        ``durable``, if given, returns once the object's blob is durable (:meth:`BlobWriter.start_commit`): it is
        called before the transaction commits, so the index never holds an object whose bytes a crash could
        still lose, while the index's own work overlaps the flush. If it raises, nothing is recorded and the
        error propagates.

        A current version with the same digest makes the object a duplicate (nothing recorded). One whose digest
        is of another algorithm (SHA-256: stored before BLAKE3) is compared by ``same_content(that digest)``
        where it is given, and is superseded where it is not.

        A version older than the current one (:attr:`StoreStatus.OUTDATED`) is kept as a superseded version, or,
        with ``keep_outdated=False`` (the ingest, which then stores it again above the current one), not recorded.
        One kept as a superseded version already (the same blob key) is a duplicate: a replay of the blob store
        that meets a version the index holds records nothing (the rebuild at start, beside live stores).
        ``keep_outdated=False`` marks a new arrival: one into a deleted study (tombstoned, its rows hidden) raises
        StudyDeleted, recording nothing, in the transaction that would have recorded it.

        Returns the status (stored / duplicate / superseded / outdated) and the change-log sequence (None where
        nothing was recorded).
        """

    async def record_async(self, obj: StoredObject, same_content: Callable[[str], bool] | None = None, *,
                           keep_outdated: bool = True) -> tuple[StoreStatus, int | None]:
        """:meth:`record` for an event loop, for an object whose blob is durable already: the loop is not made to
        wait for another writer. This default records in a thread."""
        return await asyncio.to_thread(self.record, obj, None, same_content, keep_outdated=keep_outdated)

    def record_many(self, objs: Sequence[StoredObject]) -> list[tuple[StoreStatus, int | None]]:
        """Record several versions, in order (rebuild); backends may commit them together."""
        return [self.record(obj) for obj in objs]

    @abc.abstractmethod
    def current(self, sop_uid: str) -> InstanceRecord | None:
        """The current version of an instance, or None."""

    @abc.abstractmethod
    def find(self, level: QueryLevel, conditions: Sequence[Condition], *, limit: int | None = None,
             offset: int = 0) -> list[JsonDataset]:
        """Entities at ``level`` matching all ``conditions`` (PS3.4 C.2.2.2), as DICOM JSON.

        Each result holds the level's attributes, those of the levels above it, and the
        level's computed attributes. Results come in a stable order independent of the
        order objects were stored in.
        """

    @abc.abstractmethod
    def instances(self, level: QueryLevel, conditions: Sequence[Condition]) -> list[InstanceRecord]:
        """Current instances under the entities at ``level`` matching ``conditions`` (retrieval)."""

    @abc.abstractmethod
    def last_stamp(self) -> str | None:
        """The newest ingest stamp indexed (current or superseded), for crash recovery."""

    @abc.abstractmethod
    def has_blob(self, blob_key: str) -> bool:
        """True if ``blob_key`` is indexed as a current or superseded version."""

    def held_blobs(self, blob_keys: Sequence[str]) -> set[str]:
        """Those of ``blob_keys`` indexed as a current or superseded version: :meth:`has_blob` for many keys at once
        (crash recovery and the online rebuild ask it of every object stored in the last hour)."""
        return {key for key in blob_keys if self.has_blob(key)}

    @abc.abstractmethod
    def versions(self) -> Iterator[Version]:
        """Every version the index knows, current and superseded (for ``verify``)."""

    @abc.abstractmethod
    def changes(self, since: int = 0, limit: int = 100) -> list[Change]:
        """Entries of the current change log with ``seq > since``, oldest first (whatever log ``since`` came
        from: a consumer that must notice a new log uses :meth:`changes_after`)."""

    @abc.abstractmethod
    def changes_after(self, position: LogPosition, limit: int = 100) -> LogRead:
        """At most ``limit`` entries after ``position``, oldest first, or a reset if its log is gone.

        Within one epoch, reading from the position each read returns sees every entry once, in ``seq`` order.
        """

    @abc.abstractmethod
    def log_start(self) -> LogPosition:
        """The current log's epoch and the ``seq`` it starts after (its entries' are all greater)."""

    @abc.abstractmethod
    def log_end(self) -> LogPosition:
        """The current log's epoch and its newest ``seq`` (its start's if it has no entries)."""

    def last_change_seq(self) -> int:
        """The ``seq`` the current change log has reached (:meth:`log_end`)."""
        return self.log_end().seq

    @abc.abstractmethod
    def start_log_after(self, seq: int) -> LogPosition:
        """Drop the change log and start a new one (a new epoch) whose entries' ``seq`` are greater than ``seq``
        and than any this index handed out; its start. For an index about to be filled
        (``bastion index rebuild``): the entries that describe what it holds are recorded afterwards."""

    @abc.abstractmethod
    def resume_log_after_crash(self) -> None:
        """After an unclean shutdown, before anything is recorded: the log continues after its durable mark, so
        that no ``seq`` that the commits a power failure lost had handed out is handed out again (the epoch
        stays: positions up to the mark stay valid, and the objects those commits recorded are recorded again
        by crash recovery, after them)."""

    @abc.abstractmethod
    def record_finding(self, kind: str, blob_key: str) -> Change:
        """Append a finding of the copies of the version ``blob_key`` (:data:`COPY_WANTING` or
        :data:`COPY_REPAIRED`) to the change log, with its instance's series and study (empty where the index does
        not hold it: a copy not written of an object whose record has not committed yet); the entry."""

    @abc.abstractmethod
    def delete_instance(self, sop_uid: str) -> Change | None:
        """Remove an instance from the index, its current and superseded versions alike (and its series, study
        and patient once they hold nothing), recording a ``deleted`` change; that change, or None if the
        instance is not indexed. The blob store is not touched: the caller tombstones the versions' blobs
        (a rebuild indexes whatever the blob store still holds)."""

    # -- deleted studies (bastion.index.hidden, bastion.ingest.deletion) --------------------------------------------
    @abc.abstractmethod
    def hide_study(self, study_uid: str) -> list[Change]:
        """Move every instance of the study out of the query tables (as :meth:`delete_instance` removes one,
        recording its ``deleted`` change), keeping each version's blob key and stamp for :meth:`hidden_versions`,
        in one transaction; the changes (none if the study holds no instance)."""

    @abc.abstractmethod
    def hidden_versions(self, study_uid: str) -> list[tuple[str, str]]:
        """The versions of the study's hidden instances as ``(stamp, blob key)``, oldest first."""

    @abc.abstractmethod
    def forget_hidden(self, study_uid: str, *, purged: bool) -> list[Change]:
        """Drop the study's hidden versions, in one transaction (after an undelete recorded them
        again, or a purge removed their bytes). ``purged``: record a ``deleted`` change per hidden instance too;
        the changes."""

    @abc.abstractmethod
    def hidden_blobs(self, blob_keys: Sequence[str]) -> set[str]:
        """Those of ``blob_keys`` kept as versions of a hidden study (crash recovery leaves them out)."""

    @abc.abstractmethod
    def set_tombstone(self, study_uid: str, entry: str | None) -> None:
        """Keep the tombstone of a deleted study, as JSON text (replacing one kept before); None drops it."""

    @abc.abstractmethod
    def tombstone(self, study_uid: str) -> str | None:
        """The tombstone kept for the study, or None."""

    @abc.abstractmethod
    def tombstones(self) -> list[str]:
        """Every tombstone kept, by Study Instance UID."""

    @abc.abstractmethod
    def put_report(self, row: ReportRow) -> None:
        """Keep a radiology report's version (:mod:`bastion.index.reports`) unless a newer one is kept."""

    @abc.abstractmethod
    def report(self, report_id: str) -> ReportRow | None:
        """The latest kept version of the report, or None."""

    @abc.abstractmethod
    def open_report(self, study_uid: str) -> ReportRow | None:
        """The study's report that is not signed yet (draft or preliminary), or None."""

    @abc.abstractmethod
    def reports(self, query: ReportQuery) -> list[ReportRow]:
        """The reports ``query`` selects, most recently changed first."""

    @abc.abstractmethod
    def studies_in_report_state(self, state: str, limit: int, offset: int = 0) -> list[str]:
        """The studies with a report in ``state`` (``unreported``: none), newest first
        (:func:`bastion.index.reports.studies_in_state`)."""

    @abc.abstractmethod
    def statistics(self) -> Statistics:
        """Counts of what is indexed."""

    def damage(self) -> str | None:
        """What a process of this node met that says the index itself is damaged (a SQLite file SQLite calls
        malformed), or None: ``/health`` reports it, and the next start rebuilds the index. None by default: a
        PostgreSQL index's damage is the database's to report and repair."""
        return None

    @abc.abstractmethod
    def clear(self) -> None:
        """Drop everything (before a rebuild); the change log starts again as by :meth:`start_log_after`, so no
        ``seq`` is handed out twice."""

    def holds_nothing(self) -> bool:
        """True if no version, current or superseded, is indexed: a new, emptied or lost index (which the archive
        rebuilds at start when the blob store holds objects: :mod:`bastion.ingest.rebuild`)."""
        found = self.versions()
        try:
            return next(found, None) is None
        finally:
            if isinstance(found, Generator):
                found.close()

    def close(self) -> None:
        """Release connections and threads."""
        self.closed = True


#: The URL schemes of a PostgreSQL index location (libpq's).
POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")


def is_postgresql(location: str) -> bool:
    """True if ``location`` names a PostgreSQL index (a libpq URL), not a SQLite file."""
    return location.startswith(POSTGRESQL_SCHEMES)


def open_index(location: str) -> Index:
    """Open an index: a PostgreSQL database (a libpq URL, ``postgresql://...``), else a SQLite file path (the
    default) or ``:memory:``."""
    if is_postgresql(location):
        from bastion.index.postgresql import PostgresIndex

        return PostgresIndex(location)
    from bastion.index.sqlite import SqliteIndex

    return SqliteIndex(location)


def log_floor(location: str) -> int:
    """The ``seq`` after which the change log of an index replacing the one at ``location`` must start: the
    highest that one handed out, read from it where it can be read (without changing it) and from its durable
    mark, which survives an index that cannot be read. 0 for ``:memory:``, and for a PostgreSQL database that
    holds no index yet (its sequence is the mark)."""
    if is_postgresql(location):
        from bastion.index.postgresql import log_floor as postgresql_log_floor

        return postgresql_log_floor(location)
    from bastion.index.sqlite import log_floor as sqlite_log_floor

    return 0 if location == ":memory:" else sqlite_log_floor(location)


def set_aside_if_corrupt(location: str) -> str | None:
    """For a SQLite index file that cannot be opened or fails SQLite's ``PRAGMA quick_check``: move it aside (to
    ``<file>.corrupt-<UTC time>``, :func:`bastion.index.sqlite_files.set_aside_if_corrupt`) and say what was wrong
    and where it went, so that a new, empty index is opened in its place. None for a sound or missing file, for
    ``:memory:`` and for PostgreSQL (whose tables are not checked: an empty schema is rebuilt, a damaged one is the
    database's to repair). Only for an opener that is alone: a process holding the file open would go on using it.
    """
    if is_postgresql(location) or location == ":memory:":
        return None
    from bastion.index.sqlite_files import set_aside_if_corrupt as sqlite_set_aside

    return sqlite_set_aside(location)


def rebuild_index(location: str, build: Callable[[Index], T]) -> T:
    """``bastion index rebuild``: an index at ``location`` made anew by ``build`` (which fills the empty index it
    is given) and ``build``'s result. A SQLite file is built beside the live one and swapped in atomically
    (:func:`bastion.index.sqlite_files.rebuild_into`); a PostgreSQL index is emptied and filled in place, and only
    while no node has it open (:func:`bastion.index.postgresql.rebuild_in_place`)."""
    if is_postgresql(location):
        from bastion.index.postgresql import rebuild_in_place

        return rebuild_in_place(location, build)
    from bastion.index.sqlite_files import rebuild_into

    return rebuild_into(location, build)


async def outcome_of_write(fut: Future[T]) -> T:
    """The outcome of a write queued to a thread of the index, for :meth:`Index.record_async`: a cancellation
    cancels the write if the writer thread has not started it (CancelledError: nothing written), and is otherwise
    withheld until the write's outcome is known, which is then returned or raised."""
    waiting = asyncio.wrap_future(fut)
    withheld = 0
    try:
        while True:
            try:
                return await asyncio.shield(waiting)
            except asyncio.CancelledError:
                if waiting.done() and not waiting.cancelled():
                    return waiting.result()
                if fut.cancel():
                    raise
                withheld += 1  # started: it commits or fails, and the caller must learn which
    finally:
        task = asyncio.current_task()
        if task is not None:
            for _ in range(withheld):
                task.uncancel()
