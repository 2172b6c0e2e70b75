"""The C-STORE sub-operations of C-MOVE (PS3.4 C.4.2.2) and C-GET (C.4.3.2), and their counts.

One loop (:func:`run_suboperations`) serves a C-GET, a C-MOVE answering its requester, and a C-MOVE job
taken over by a node's runner (:mod:`bastion.dimse.moves`); what each does after a sub-operation (a pending
response, recording the job's progress) is its ``done`` callback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bastion.dimse import messages as m
from bastion.dimse.scu import DestinationLost, SubOperationError
from bastion.errors import BastionError
from bastion.model.records import InstanceRecord

log = logging.getLogger("bastion.dimse")

#: C-STORE statuses that count as a warning sub-operation: PS3.4 B.2.3's warnings (B000, B006, B007) and the
#: warnings of PS3.7 Annex C that a Storage SCP may answer (0107 attribute list, 0116 value out of range).
WARNING_STATUSES = frozenset({0x0107, 0x0116, 0xB000, 0xB006, 0xB007})

#: Sends one instance (the originator's AE title and Message ID, for a C-MOVE), returning its C-STORE status.
Store = Callable[[InstanceRecord, tuple[str, int] | None], Awaitable[int]]


def delivered(status: int) -> bool:
    """Whether a sub-operation of this C-STORE status delivered its instance (success or a warning)."""
    return status == m.SUCCESS or status in WARNING_STATUSES


@dataclass
class Tally:
    """The counts of a retrieve's sub-operations, as its responses carry them (PS3.4 C.4.2.1.4, C.4.3.1.4)."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    #: Stopped by a C-CANCEL before the last sub-operation (PS3.4 C.4.2.3.1).
    cancelled: bool = False

    def count(self, sop_uid: str, status: int) -> None:
        """One sub-operation done with the C-STORE ``status``."""
        self.remaining -= 1
        if status == m.SUCCESS:
            self.completed += 1
        elif status in WARNING_STATUSES:
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(sop_uid)

    def fail(self, sop_uids: Sequence[str]) -> None:
        """These sub-operations failed without being attempted (the destination was lost)."""
        self.remaining -= len(sop_uids)
        self.failed += len(sop_uids)
        self.failed_uids += sop_uids

    @property
    def status(self) -> int:
        """The final response's status: Cancel; Success; 0xA702 if no sub-operation succeeded; else 0xB000."""
        if self.cancelled:
            return m.CANCEL
        if self.failed == 0 and self.warning == 0:
            return m.SUCCESS
        if self.completed == 0 and self.warning == 0:
            return m.OUT_OF_RESOURCES_SUBOPS  # Refused/failed: unable to perform sub-operations
        return m.WARNING_SUBOPS

    def counts(self, *, final: bool) -> dict[str, int]:
        """The counts of a response; Number of Remaining Sub-operations in a pending one, and in a final one
        after a cancel (PS3.4 C.4.2.1.4: absent otherwise)."""
        out = {"NumberOfCompletedSuboperations": self.completed, "NumberOfFailedSuboperations": self.failed,
               "NumberOfWarningSuboperations": self.warning}
        if not final or self.cancelled:
            out["NumberOfRemainingSuboperations"] = self.remaining
        return out

    def outcome(self) -> dict[str, Any]:
        """The tally as a job's stored outcome (:meth:`of_outcome` reads it back)."""
        return asdict(self)

    @classmethod
    def of_outcome(cls, outcome: Mapping[str, Any]) -> Tally:
        return cls(**{k: outcome[k] for k in ("remaining", "completed", "failed", "warning", "cancelled")},
                   failed_uids=list(outcome["failed_uids"]))

    @classmethod
    def of_progress(cls, sop_uids: Sequence[str], done: Mapping[str, int]) -> Tally:
        """The counts of a job's sub-operations recorded so far (``done``) out of ``sop_uids``."""
        tally = cls(len(sop_uids))
        for sop_uid in sop_uids:
            if sop_uid in done:
                tally.count(sop_uid, done[sop_uid])
        return tally


async def run_suboperations(records: Sequence[InstanceRecord], store: Store, tally: Tally,
                            originator: tuple[str, int] | None, *, peer: str, stop: Callable[[], bool],
                            done: Callable[[InstanceRecord, int], Awaitable[None]]) -> bool:
    """Run one C-STORE sub-operation per record, in order, counting each into ``tally`` and calling ``done``
    after it (PS3.4 C.4.2.2, C.4.3.2). Returns False if ``stop()`` said so before a sub-operation (a C-CANCEL,
    C.4.2.3.1, or a job's lease lost), True once every record was attempted.

    A sub-operation that cannot be attempted (no accepted context) or raises a Bastion error fails on its own.
    When the association the sub-operations go over ends (:class:`DestinationLost`: the destination aborted or
    dropped it), the current and every remaining sub-operation fail, and the run ends there.
    """
    for i, record in enumerate(records):
        if stop():
            return False
        try:
            status = await store(record, originator)
        except DestinationLost as exc:
            log.warning("sub-operations for %s ended after %d of %d: %s", peer, i, len(records), exc)
            tally.fail([r.sop_uid for r in records[i:]])
            return True
        except (SubOperationError, BastionError) as exc:
            log.warning("sub-operation for %s failed: %s", record.sop_uid, exc)
            status = 0xC000
        tally.count(record.sop_uid, status)
        await done(record, status)
    return True
