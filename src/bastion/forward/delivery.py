"""Sending queued instances to a destination: C-STORE (PS3.4 B) through the one Storage SCU
(:class:`bastion.dimse.scu.StoreSCU`, shared with C-MOVE), or STOW-RS (PS3.18 10.5).

A sender gets a batch of entries (one or a few studies, in order) with their current records and says, for
each, whether it was delivered or the error it failed with (:class:`Outcome`); the forwarder records that in
the queue. An instance goes out in its stored transfer syntax where the destination accepts it, else
converted to Explicit or Implicit VR Little Endian (:meth:`~bastion.query.retrieve.Retriever.open_for_dimse`);
an instance that cannot be converted (no codec for its syntax) fails alone, with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.error
import urllib.request
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bastion.dimse.scu import DestinationLost, PreparedInstance, StoreSCU, SubOperationError
from bastion.dimse.suboperations import delivered
from bastion.errors import BastionError
from bastion.model.records import InstanceRecord
from bastion.model.remotes import ForwardRule

if TYPE_CHECKING:
    from bastion.archive import Archive

log = logging.getLogger("bastion.forward")

#: An association with no instance to send for this long is released.
IDLE_RELEASE_S = 5.0
#: The largest STOW-RS request body (bytes) and the most instances in one.
STOW_MAX_BYTES = 32 * 1024 * 1024
STOW_MAX_INSTANCES = 100
STOW_TIMEOUT_S = 120.0
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"


@dataclass
class Outcome:
    """What sending a batch did: the SOP Instance UIDs delivered, and the error of each one that failed."""

    delivered: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def fail(self, sop_uids: Sequence[str], error: str) -> None:
        for sop_uid in sop_uids:
            self.failed[sop_uid] = error


class Destination(ABC):
    """Where one queue's instances go."""

    def __init__(self, rule: ForwardRule) -> None:
        self.name = rule.name
        self.to = rule.to

    @abstractmethod
    async def send(self, records: Sequence[InstanceRecord]) -> Outcome:
        """Send ``records`` in order."""

    async def idle(self) -> None:
        """Nothing to send for now (an open association may be released)."""
        return None

    async def close(self) -> None:
        """Release what the destination holds."""
        return None


class DimseDestination(Destination):
    """A C-STORE SCP: several instances per association, kept open while there is work (released after
    :data:`IDLE_RELEASE_S` without any), proposing each SOP class in its stored syntax first and in Explicit and
    Implicit VR Little Endian (:meth:`StoreSCU.connect`)."""

    def __init__(self, rule: ForwardRule, archive: Archive, executor: Executor) -> None:
        super().__init__(rule)
        remote = rule.remote
        assert remote is not None
        self.remote = remote
        self.archive = archive
        self.executor = executor
        self.scu: StoreSCU | None = None
        self._proposed: set[tuple[str, str]] = set()  # (SOP class, stored syntax) of the open association
        self._idle_since: float | None = None

    async def _association(self, records: Sequence[InstanceRecord]) -> StoreSCU:
        wanted = {(r.sop_class_uid, r.transfer_syntax) for r in records}
        if self.scu is not None and self.scu.assoc is not None and wanted <= self._proposed:
            return self.scu
        await self.close()  # a SOP class or syntax the open association did not propose: a new one
        proposed = wanted | self._proposed
        scu = StoreSCU(self.archive, self.executor, calling_aet=self.archive.settings.aet, remote=self.remote)
        await scu.connect({c for c, _ in proposed}, {t for _, t in proposed})
        self.scu, self._proposed = scu, proposed
        return scu

    async def send(self, records: Sequence[InstanceRecord]) -> Outcome:
        out = Outcome()
        self._idle_since = None
        try:
            scu = await self._association(records)
        except SubOperationError as exc:
            self._proposed = set()
            out.fail([r.sop_uid for r in records], str(exc))
            return out
        # One instance ahead: the next is read (and converted, if need be) while the destination stores this one.
        ahead: asyncio.Future[PreparedInstance] | None = asyncio.ensure_future(scu.prepare(records[0]))
        try:
            for i, record in enumerate(records):
                current, ahead = ahead, None
                assert current is not None
                if i + 1 < len(records):
                    ahead = asyncio.ensure_future(scu.prepare(records[i + 1]))
                try:
                    status = await scu.store(record, prepared=await current)
                except DestinationLost as exc:
                    out.fail([r.sop_uid for r in records[i:]], str(exc))
                    await self.close()
                    break
                except SubOperationError as exc:  # no accepted context fits this one
                    out.failed[record.sop_uid] = str(exc)
                    continue
                except BastionError as exc:  # unreadable, or no codec to convert it to what the destination accepts
                    out.failed[record.sop_uid] = exc.message
                    continue
                if delivered(status):
                    out.delivered.append(record.sop_uid)
                else:
                    out.failed[record.sop_uid] = f"{self.remote.aet} answered C-STORE status 0x{status:04X}"
        finally:
            if ahead is not None:
                ahead.add_done_callback(_close_unsent)
        return out

    async def idle(self) -> None:
        loop = asyncio.get_running_loop()
        if self.scu is None:
            return
        if self._idle_since is None:
            self._idle_since = loop.time()
        elif loop.time() - self._idle_since >= IDLE_RELEASE_S:
            await self.close()

    async def close(self) -> None:
        scu, self.scu, self._idle_since = self.scu, None, None
        self._proposed = set()
        if scu is not None:
            with contextlib.suppress(Exception):
                await scu.release()


class StowDestination(Destination):
    """A DICOMweb origin server: one STOW-RS request (``POST {base}/studies``) per study or per
    :data:`STOW_MAX_INSTANCES`, each instance as stored (``application/dicom``). A 200 delivered every one; a 202
    or 409 failed those its Failed SOP Sequence names (PS3.18 10.5.3); any other answer, or none, failed all."""

    def __init__(self, rule: ForwardRule, archive: Archive, executor: Executor) -> None:
        super().__init__(rule)
        self.url = f"{rule.stow_url}/studies"
        self.api_key = rule.api_key
        self.archive = archive
        self.executor = executor

    async def send(self, records: Sequence[InstanceRecord]) -> Outcome:
        out = Outcome()
        loop = asyncio.get_running_loop()
        batch: list[tuple[InstanceRecord, bytes]] = []
        size = 0
        for i, record in enumerate(records):
            try:
                data = await loop.run_in_executor(self.executor, self.archive.retriever.read, record)
            except BastionError as exc:
                out.failed[record.sop_uid] = exc.message
                data = b""
            if data:
                batch.append((record, data))
                size += len(data)
            last = i == len(records) - 1
            if batch and (last or size >= STOW_MAX_BYTES or len(batch) >= STOW_MAX_INSTANCES
                          or records[i + 1].study_uid != record.study_uid):
                await loop.run_in_executor(self.executor, self._post, batch, out)
                batch, size = [], 0
        return out

    def _post(self, batch: Sequence[tuple[InstanceRecord, bytes]], out: Outcome) -> None:
        boundary = uuid.uuid4().hex
        body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
                        for _, data in batch) + f"--{boundary}--\r\n".encode()
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
            **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        uids = [r.sop_uid for r, _ in batch]
        try:
            with urllib.request.urlopen(request, timeout=STOW_TIMEOUT_S) as rsp:
                status, answer = rsp.status, rsp.read()
        except urllib.error.HTTPError as exc:
            status, answer = exc.code, exc.read()
        except (OSError, ValueError) as exc:
            out.fail(uids, f"STOW-RS to {self.url}: {exc}")
            return
        if status == 200:
            out.delivered += uids
            return
        failed = _failed_sops(answer) if status in (202, 409) else {}
        if not failed:
            out.fail(uids, f"STOW-RS to {self.url}: HTTP {status} {answer[:200].decode('utf-8', 'replace')}")
            return
        for uid in uids:
            if uid in failed:
                out.failed[uid] = f"STOW-RS to {self.url}: HTTP {status}, failure reason {failed[uid]}"
            else:
                out.delivered.append(uid)


def _close_unsent(prepared: asyncio.Future[PreparedInstance]) -> None:
    """Close the dataset of an instance read ahead but not sent (the batch ended first)."""
    if not prepared.cancelled() and prepared.exception() is None:
        prepared.result().stream.close()


def _failed_sops(answer: bytes) -> dict[str, str]:
    """SOP Instance UID -> Failure Reason of the Failed SOP Sequence in a STOW-RS answer (DICOM JSON)."""
    try:
        doc: Any = json.loads(answer)
        items = doc.get(_FAILED_SOP_SEQUENCE, {}).get("Value", []) if isinstance(doc, dict) else []
        out = {}
        for item in items:
            uid = item.get(_REFERENCED_SOP_INSTANCE_UID, {}).get("Value", [""])[0]
            reason = item.get(_FAILURE_REASON, {}).get("Value", [0])[0]
            out[str(uid)] = f"0x{int(reason):04X}"
        return out
    except (ValueError, TypeError, AttributeError, IndexError):
        return {}


def destination_for(rule: ForwardRule, archive: Archive, executor: Executor) -> Destination:
    """The sender of ``rule``'s destination."""
    if rule.stow_url:
        return StowDestination(rule, archive, executor)
    return DimseDestination(rule, archive, executor)
