"""The Index interface: record stored objects, answer queries, keep the change log."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition
from bastion.model.records import InstanceRecord, JsonDataset, StoredObject, StoreStatus


@dataclass(frozen=True)
class Change:
    """One entry of the change log (monotonic ``seq``)."""

    seq: int
    kind: str  # "stored" | "superseded"
    sop_uid: str
    series_uid: str
    study_uid: str
    blob_key: str
    at: str  # ISO 8601 UTC


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
               same_content: Callable[[str], bool] | None = None) -> tuple[StoreStatus, int | None]:
        """Record a stored version in one transaction (durable on return).

        ``durable``, if given, returns once the object's blob is durable (:meth:`BlobWriter.start_commit`): it is
        called before the transaction commits, so the index never holds an object whose bytes a crash could
        still lose, while the index's own work overlaps the flush. If it raises, nothing is recorded and the
        error propagates.

        A current version with the same digest makes the object a duplicate (nothing recorded). One whose digest
        is of another algorithm (SHA-256: stored before BLAKE3) is compared by ``same_content(that digest)``
        where it is given, and is superseded where it is not.

        Returns the status (stored / duplicate / superseded) and the change-log sequence.
        """

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

    @abc.abstractmethod
    def versions(self) -> Iterator[Version]:
        """Every version the index knows, current and superseded (for ``verify``)."""

    @abc.abstractmethod
    def changes(self, since: int = 0, limit: int = 100) -> list[Change]:
        """Change-log entries with ``seq > since``, oldest first."""

    def last_change_seq(self) -> int:
        """The ``seq`` of the newest change-log entry (0 if none)."""
        return self.statistics().last_change

    @abc.abstractmethod
    def statistics(self) -> Statistics:
        """Counts of what is indexed."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Drop everything (before a rebuild)."""

    def close(self) -> None:
        """Release connections and threads."""
        self.closed = True


def open_index(location: str) -> Index:
    """Open an index: a SQLite file path (default) or ``:memory:``."""
    from bastion.index.sqlite import SqliteIndex

    return SqliteIndex(location)
