"""Deleting a study: a tombstone that hides it, undelete before the purge, and the purge after a delay.

The lifecycle (``docs/deletion.md``)::

    stored --delete--> deleted (hidden, bytes kept) --purge, once older than deletion_delay_days--> purged
                          |  ^                                                                        (bytes gone)
                  undelete|  |delete
                          v  |
                        stored

Every step is written first to the state log in the blob store(s) (:mod:`bastion.blobs.statelog`), the truth a
rebuilt index is made from, and then to the index (:mod:`bastion.index.hidden`), which is only its cache: a step
the index missed (a crash between the two) is made again by the next rebuild (:func:`apply_state_log`), and each
index step can be run again without harm.

* **delete**: the tombstone (study, who, why, when, instance count) is kept, and the study's instances leave the
  index's query tables, so nothing that searches or retrieves finds them. A store into a deleted study is refused
  (:class:`bastion.errors.StudyDeleted`: DIMSE 0x0124, HTTP 409): undelete first. The index refuses it in the
  transaction that would record it (``Index.record`` of a new arrival), which holds the lock that deleting
  takes too (SQLite's writer lock; on PostgreSQL the study's), and only a store that would make the study's row
  again can meet a tombstone: one recorded before the tombstone is hidden by the delete, so no instance of a
  deleted study stays visible. A purged study's tombstone stays: its UID is refused for good.
* **undelete**: the kept versions are read from the blob store and recorded again, oldest first; QIDO counts and
  retrieval are as before the delete.
* **purge** (``bastion purge``, never the network): every copy of every version of the study's instances is
  removed from every blob store (and, in a versioned S3 bucket, every version of the object that the bucket's
  retention allows), and a ``deleted`` change is recorded per instance.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from bastion.blobs.base import BlobStore
from bastion.blobs.statelog import DELETE, PURGE, UNDELETE, StateEntry, StateLog, fold
from bastion.errors import NotFound, StudyDeleted
from bastion.index.base import Index
from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition, MatchType

log = logging.getLogger("bastion.deletion")

#: What a tombstone's ``state`` says: deleted (undelete possible), purge under way (its bytes partly gone), or
#: purged (its bytes gone; the tombstone stays, so that the study is not stored again unnoticed).
DELETED, PURGING, PURGED = "deleted", "purging", "purged"
_DAY_NS = 86_400 * 1_000_000_000


@dataclass(frozen=True)
class Tombstone:
    """A deleted study: who deleted it, why, when, and how many instances it held."""

    study: str
    patient_id: str
    user: str
    role: str
    via: str
    address: str
    reason: str
    at: str
    time_ns: int
    count: int
    state: str = DELETED

    @classmethod
    def of(cls, entry: StateEntry, state: str = DELETED) -> Tombstone:
        return cls(entry.study, entry.patient_id, entry.user, entry.role, entry.via, entry.address, entry.reason,
                   entry.at, entry.time_ns, entry.count, state)

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    def age_days(self, now_ns: int) -> float:
        """How many days ago the study was deleted."""
        return (now_ns - self.time_ns) / _DAY_NS


def _study_key(study_uid: str) -> Condition:
    return Condition("StudyInstanceUID", 0x0020000D, "UI", MatchType.SINGLE, (study_uid,))


def _text(dataset: dict[str, object], tag: str) -> str:
    element = dataset.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return str(values[0]) if isinstance(values, list) and values else ""


class Deletions:
    """Delete, undelete and purge studies of the archive whose blob store is ``blobs`` and index ``index``."""

    def __init__(self, blobs: BlobStore, index: Index, node_id: str = "", *,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.blobs = blobs
        self.index = index
        self.state_log = StateLog(blobs, node_id, clock)
        self._clock = clock

    # -- reading ----------------------------------------------------------------------------------------------
    def tombstone(self, study_uid: str) -> Tombstone | None:
        """The study's tombstone, or None if it is not deleted."""
        text = self.index.tombstone(study_uid)
        return None if text is None else Tombstone(**json.loads(text))

    def tombstones(self) -> list[Tombstone]:
        """Every deleted study, oldest deletion first."""
        return sorted((Tombstone(**json.loads(t)) for t in self.index.tombstones()), key=lambda t: t.time_ns)

    # -- delete, undelete -------------------------------------------------------------------------------------
    def delete(self, study_uid: str, *, reason: str = "", user: str = "", role: str = "", via: str = "",
               address: str = "") -> Tombstone:
        """Tombstone and hide the study. NotFound if the index holds no such study, StudyDeleted if it is deleted
        already; StorageError if the state log cannot be written (nothing is hidden then)."""
        if self.index.tombstone(study_uid) is not None:
            raise StudyDeleted(f"study {study_uid} is deleted already", uid=study_uid)
        found = self.index.find(QueryLevel.STUDY, [_study_key(study_uid)], limit=1)
        if not found:
            raise NotFound(f"no study {study_uid}", uid=study_uid)
        count = int(_text(found[0], "00201208") or 0)
        entry = self.state_log.append(DELETE, study_uid, user=user, role=role, via=via, address=address,
                                      reason=reason, patient_id=_text(found[0], "00100020"), count=count)
        tombstone = Tombstone.of(entry)
        self._hide(tombstone)
        log.warning("study %s deleted by %s (%d instances): %s", study_uid, user or "?", count, reason or "no reason")
        return tombstone

    def _hide(self, tombstone: Tombstone) -> None:
        self._keep(tombstone)
        self.index.hide_study(tombstone.study)

    def _keep(self, tombstone: Tombstone) -> None:
        self.index.set_tombstone(tombstone.study, json.dumps(tombstone.to_json(), sort_keys=True))

    def undelete(self, study_uid: str, *, reason: str = "", user: str = "", role: str = "", via: str = "",
                 address: str = "") -> Tombstone:
        """Restore a deleted study as it was; its tombstone. NotFound if it is not deleted, StudyDeleted if its
        purge has begun."""
        tombstone = self.tombstone(study_uid)
        if tombstone is None:
            raise NotFound(f"study {study_uid} is not deleted", uid=study_uid)
        if tombstone.state != DELETED:
            raise StudyDeleted(f"study {study_uid} is {tombstone.state}: it cannot be undeleted", uid=study_uid)
        self.state_log.append(UNDELETE, study_uid, user=user, role=role, via=via, address=address, reason=reason,
                              patient_id=tombstone.patient_id, count=tombstone.count)
        versions = _restore(self.blobs, self.index, study_uid)
        log.warning("study %s undeleted by %s (%d versions)", study_uid, user or "?", versions)
        return tombstone

    # -- purge ------------------------------------------------------------------------------------------------
    def due(self, delay_days: float, study_uid: str | None = None) -> tuple[list[Tombstone], list[Tombstone]]:
        """The tombstones (all, or ``study_uid``'s) whose delay has passed, and those still inside it."""
        now = self._clock()
        chosen = self.tombstones() if study_uid is None else [t for t in [self.tombstone(study_uid)] if t]
        chosen = [t for t in chosen if t.state != PURGED]
        ready = [t for t in chosen if t.state == PURGING or t.age_days(now) >= delay_days]
        return ready, [t for t in chosen if t not in ready]

    def purge(self, tombstone: Tombstone, *, user: str = "", via: str = "cli") -> int:
        """Remove every copy of every version of the deleted study's instances from the blob store(s), then forget
        the study in the index (a ``deleted`` change per instance); the number of versions removed. The purge is
        written to the state log first: one cut short is finished by the next ``bastion purge``, and a rebuild
        meanwhile hides what is left."""
        self.state_log.append(PURGE, tombstone.study, user=user, via=via, reason=tombstone.reason,
                              patient_id=tombstone.patient_id, count=tombstone.count)
        self._keep(replace(tombstone, state=PURGING))
        versions = self.index.hidden_versions(tombstone.study)
        for _, key in versions:
            self.blobs.destroy(key)
        self.index.forget_hidden(tombstone.study, purged=True)
        self._keep(replace(tombstone, state=PURGED))
        log.warning("study %s purged by %s: %d stored version(s) removed", tombstone.study, user or "?", len(versions))
        return len(versions)


def _restore(blobs: BlobStore, index: Index, study_uid: str) -> int:
    """Record the hidden versions of the study again (read from the blob store, oldest first), then drop them and
    its tombstone: the index part of an undelete. How many versions there were."""
    from bastion.ingest.rebuild import record_stored  # noqa: PLC0415 - the rebuild imports this module

    versions = index.hidden_versions(study_uid)
    report = record_stored(blobs, index, versions, "undelete")
    for key, why in report.skipped:
        log.error("undelete of study %s: %s cannot be indexed again: %s", study_uid, key, why)
    index.forget_hidden(study_uid, purged=False)
    index.set_tombstone(study_uid, None)
    return len(versions)


def hide_tombstoned(index: Index) -> int:
    """Hide again whatever the index shows of the studies it holds tombstoned (after crash recovery recorded objects
    of the last hour again, :func:`bastion.ingest.rebuild.recover`); how many instances that hid."""
    return sum(len(index.hide_study(json.loads(text)["study"])) for text in index.tombstones())


def apply_state_log(blobs: BlobStore, index: Index) -> int:
    """Bring ``index`` (just filled from the blob store) to the state the state log records: every study deleted
    and not undeleted since is tombstoned and hidden again; one whose purge began is ``purged`` if nothing of it is
    left, else ``purging`` (hidden, for the next ``bastion purge`` to finish); one the index holds tombstoned but
    the log says was undeleted since is restored. Run again on the same index, it changes nothing. The number of
    studies tombstoned."""
    studies = {study: state for study, state in fold(StateLog(blobs).entries()).items() if state[1] is not None}
    for text in index.tombstones():  # undeleted since the index tombstoned it (an online rebuild's new index)
        study = json.loads(text)["study"]
        if study not in studies:
            _restore(blobs, index, study)
    for study, (latest, deleted) in studies.items():
        if deleted is None:
            continue
        tombstone = Tombstone.of(deleted)
        index.set_tombstone(study, json.dumps(tombstone.to_json(), sort_keys=True))
        index.hide_study(study)
        if latest.action == PURGE:
            state = PURGING if index.hidden_versions(study) else PURGED
            index.set_tombstone(study, json.dumps(replace(tombstone, state=state).to_json(), sort_keys=True))
    if studies:
        log.info("state log: %d deleted stud%s tombstoned again", len(studies), "y" if len(studies) == 1 else "ies")
    return len(studies)
