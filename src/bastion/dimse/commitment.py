"""Storage Commitment Push Model SOP Class as SCP (PS3.4 Annex J.3; N-ACTION and N-EVENT-REPORT, PS3.7 10.1).

A modality asks with an N-ACTION-RQ (Action Type ID 1) whether the instances it names (Referenced SOP Sequence,
under a Transaction UID) are safe here. The request is answered at once (N-ACTION-RSP: success, or the failure
status of a malformed request, J.3.2.1.3); then every referenced instance is checked and the Storage Commitment
Result goes out as an N-EVENT-REPORT-RQ (J.3.3): Event Type ID 1 when every instance is committed, 2 when
failures exist, with the committed instances in the Referenced SOP Sequence and the others in the Failed SOP
Sequence, each with its Failure Reason (PS3.3 C.14.1.1).

**Committed** means durably stored here (:meth:`Committer.check`): the index holds the instance as current with
the referenced SOP Class, and at least ``copies_required`` blob stores hold a copy whose bytes hash to the digest
its key names (the bar a C-STORE success had to clear); on an edge with an upstream, also that upstream holds it
(:data:`UpstreamHolds`, wired once edge mode exists).

**Where the result goes** (J.3.3.1.2): on the association of the request while it is open (the requester, SCU of
the SOP Class, takes the N-EVENT-REPORT under its default role); else, or when the requester answers it with a
failure, on a new association to the requester's AE title as configured in ``remotes``, proposing the SCP role
for this SOP Class (SCP/SCU Role Selection, PS3.7 D.3.3.4) as J.3.3.1.3 expects. A report that cannot be
delivered is tried again :data:`REPORT_RETRY_DELAYS` later; reports are kept in memory only (a server stopped
before delivering one loses it; the modality asks again).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from bastion import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from bastion.blobs.copies import Copies
from bastion.blobs.findings import MISSING
from bastion.dimse import messages as m
from bastion.dimse.association import (
    AcceptedContext,
    Association,
    AssociationClosed,
    BytesSink,
    Message,
)
from bastion.dimse.identifiers import decode_identifier
from bastion.dimse.pdu import (
    A_ASSOCIATE_AC,
    AssociateRQ,
    PDUError,
    PresentationContext,
    RoleSelection,
    decode_associate,
    encode_associate,
)
from bastion.dimse.scu import SubOperationError, open_stream
from bastion.errors import BastionError, InvalidQuery
from bastion.index.base import Index
from bastion.model.remotes import RemoteAE
from bastion.model.uids import (
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    STORAGE_COMMITMENT_PUSH,
    STORAGE_COMMITMENT_PUSH_INSTANCE,
    is_identifiable_uid,
    is_storage_sop_class,
)
from bastion.settings import Settings

if TYPE_CHECKING:
    from bastion.archive import Archive
    from bastion.dimse.services import Session

log = logging.getLogger("bastion.dimse.commitment")

#: Action Type ID of a Storage Commitment Request (PS3.4 J.3.2.1.1).
REQUEST_COMMITMENT = 1
#: Event Type IDs of a Storage Commitment Result (PS3.4 J.3.3.1.1).
ALL_COMMITTED, FAILURES_EXIST = 1, 2

# Failure Reasons (0008,1197) of the Failed SOP Sequence (PS3.3 C.14.1.1).
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
REFERENCED_SOP_CLASS_NOT_SUPPORTED = 0x0122
DUPLICATE_TRANSACTION_UID = 0x0131

# N-ACTION-RSP failure statuses (PS3.7 10.1.4.1.10, Annex C).
NO_SUCH_SOP_INSTANCE = 0x0112
INVALID_ARGUMENT_VALUE = 0x0115
NO_SUCH_SOP_CLASS = 0x0118
MISSING_ATTRIBUTE = 0x0120
NO_SUCH_ACTION = 0x0123

TRANSACTION_UID = 0x00081195
REFERENCED_SOP_SEQUENCE = 0x00081199

#: Seconds to connect, associate, or wait for an N-EVENT-REPORT-RSP before a delivery attempt fails.
TIMEOUT = 30.0
#: After a delivery attempt failed, the next ones start this many seconds later; after the last, the report is
#: given up (logged as an ERROR).
REPORT_RETRY_DELAYS: tuple[float, ...] = (2.0, 10.0, 60.0, 300.0)

#: Whether the upstream of an edge holds an instance (by SOP Instance UID): True, it does; False, not yet; None,
#: cannot tell now (upstream unreachable). Only True lets the instance be committed; it is asked, in a worker
#: thread, only about instances committed here. Edge mode (``commit_after_upstream = true``) passes one to
#: :class:`StorageCommitment`; without it the local copies decide.
UpstreamHolds = Callable[[str], bool | None]


class CommitmentRequestError(BastionError):
    """A Storage Commitment Request that is not processed: its N-ACTION-RSP failure ``status`` (PS3.4 J.3.2.1.3),
    with the element at fault (``tag``) where there is one."""

    def __init__(self, status: int, message: str, *, tag: int | None = None) -> None:
        super().__init__(message, tag=tag)
        self.dimse_status = status


class ReportNotDelivered(Exception):
    """An attempt to deliver a Storage Commitment Result failed (no association, no response, a failure status)."""


@dataclass(frozen=True)
class Reference:
    """One item of a Referenced SOP Sequence (PS3.4 Table J.3-1)."""

    sop_class_uid: str
    sop_uid: str


@dataclass(frozen=True)
class CommitmentRequest:
    """A Storage Commitment Request's Action Information (PS3.4 Table J.3-1)."""

    transaction_uid: str
    references: tuple[Reference, ...]


@dataclass(frozen=True)
class CommitmentResult:
    """A Storage Commitment Result's Event Information (PS3.4 Table J.3-2): every reference of the request, either
    committed or failed with its Failure Reason."""

    transaction_uid: str
    committed: tuple[Reference, ...]
    failed: tuple[tuple[Reference, int], ...]

    @classmethod
    def all_failed(cls, request: CommitmentRequest, reason: int) -> CommitmentResult:
        """The result of ``request`` with every reference failed for ``reason``."""
        return cls(request.transaction_uid, (), tuple((ref, reason) for ref in request.references))

    @property
    def event_type(self) -> int:
        """1 when every instance is committed, 2 when failures exist (PS3.4 J.3.3.1.1)."""
        return FAILURES_EXIST if self.failed else ALL_COMMITTED

    def encode(self, transfer_syntax: str, retrieve_aet: str) -> bytes:
        """The Event Information dataset in ``transfer_syntax``, with the Retrieve AE Title the committed instances
        can be retrieved from."""
        ds = Dataset()
        ds.TransactionUID = self.transaction_uid
        ds.RetrieveAETitle = retrieve_aet
        if self.committed:
            ds.ReferencedSOPSequence = [_item(ref) for ref in self.committed]
        if self.failed:
            ds.FailedSOPSequence = [_item(ref, reason) for ref, reason in self.failed]
        fp = DicomBytesIO()
        fp.is_little_endian = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
        fp.is_implicit_VR = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
        write_dataset(fp, ds)
        return fp.getvalue()


def _item(ref: Reference, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_uid
    if reason is not None:
        item.FailureReason = reason
    return item


def check_command(command: dict[str, Any]) -> None:
    """Check an N-ACTION-RQ's command for a Storage Commitment Request (PS3.4 J.3.2.1.2): Action Type ID 1, on the
    Storage Commitment Push Model SOP Class and its well-known instance. Raises :class:`CommitmentRequestError`."""
    if command.get("ActionTypeID") != REQUEST_COMMITMENT:
        raise CommitmentRequestError(NO_SUCH_ACTION, f"Action Type ID {command.get('ActionTypeID')} is not 1")
    if command.get("RequestedSOPClassUID") != STORAGE_COMMITMENT_PUSH:
        raise CommitmentRequestError(NO_SUCH_SOP_CLASS, "Requested SOP Class is not Storage Commitment Push Model")
    if command.get("RequestedSOPInstanceUID") != STORAGE_COMMITMENT_PUSH_INSTANCE:
        raise CommitmentRequestError(NO_SUCH_SOP_INSTANCE, "Requested SOP Instance is not the well-known instance "
                                     f"{STORAGE_COMMITMENT_PUSH_INSTANCE}")
    if not m.has_dataset(command):
        raise CommitmentRequestError(MISSING_ATTRIBUTE, "no Action Information", tag=TRANSACTION_UID)


def parse_request(data: bytes, transfer_syntax: str) -> CommitmentRequest:
    """The Action Information of a Storage Commitment Request (PS3.4 Table J.3-1): a Transaction UID and a
    Referenced SOP Sequence of one or more items, each with a Referenced SOP Class UID and Instance UID.

    Raises :class:`CommitmentRequestError`: 0x0110 for a dataset that cannot be decoded, 0x0120 for a missing or
    empty attribute, 0x0115 for a value that is not a UID.
    """
    try:
        ds = decode_identifier(data, transfer_syntax)
    except InvalidQuery as exc:
        raise CommitmentRequestError(PROCESSING_FAILURE, exc.message) from exc
    transaction_uid = _uid(ds, "TransactionUID", TRANSACTION_UID)
    items = ds.get("ReferencedSOPSequence")
    if not items:
        raise CommitmentRequestError(MISSING_ATTRIBUTE, "no Referenced SOP Sequence item",
                                     tag=REFERENCED_SOP_SEQUENCE)
    references = tuple(Reference(_uid(item, "ReferencedSOPClassUID", 0x00081150),
                                 _uid(item, "ReferencedSOPInstanceUID", 0x00081155)) for item in items)
    return CommitmentRequest(transaction_uid, references)


def _uid(ds: Dataset, keyword: str, tag: int) -> str:
    value = str(ds.get(keyword) or "").strip("\x00 ")
    if not value:
        raise CommitmentRequestError(MISSING_ATTRIBUTE, f"no {keyword}", tag=tag)
    if not is_identifiable_uid(value):
        raise CommitmentRequestError(INVALID_ARGUMENT_VALUE, f"{keyword} {value[:40]!r} is not a UID", tag=tag)
    return value


class Committer:
    """Decides, per referenced instance, whether it is committed: durably stored here (PS3.4 J.3.3.1.2)."""

    def __init__(self, index: Index, blobs: Copies, storage_deny: Sequence[str] = (),
                 upstream_holds: UpstreamHolds | None = None) -> None:
        self.index = index
        self.blobs = blobs
        self.storage_deny = frozenset(storage_deny)
        self.upstream_holds = upstream_holds

    def check(self, ref: Reference) -> int | None:
        """None if ``ref`` is committed, else its Failure Reason (PS3.3 C.14.1.1):

        * 0x0122 for a SOP Class that is not a Storage SOP Class or that ``storage_deny`` refuses;
        * 0x0112 when the index holds no current version of the instance, or no blob store holds its object;
        * 0x0119 when the current version's SOP Class is not the referenced one;
        * 0x0110 when fewer than ``copies_required`` copies match their digest (corrupt, unreadable), when the
          index or a store fails, or when an edge's upstream does not hold it (yet).

        A copy found wanting is a finding for the repair, as a read's would be.
        """
        if not is_storage_sop_class(ref.sop_class_uid) or ref.sop_class_uid in self.storage_deny:
            return REFERENCED_SOP_CLASS_NOT_SUPPORTED
        try:
            record = self.index.current(ref.sop_uid)
            if record is None:
                return NO_SUCH_OBJECT_INSTANCE
            if record.sop_class_uid != ref.sop_class_uid:
                return CLASS_INSTANCE_CONFLICT
            reason = self._check_copies(record.blob_key)
        except (BastionError, OSError) as exc:
            log.warning("storage commitment of %s: %s", ref.sop_uid, exc)
            return PROCESSING_FAILURE
        if reason is not None or self.upstream_holds is None:
            return reason
        try:
            held = self.upstream_holds(ref.sop_uid)
        except Exception:
            log.exception("storage commitment of %s: asking whether upstream holds it failed", ref.sop_uid)
            held = None
        return None if held is True else PROCESSING_FAILURE

    def _check_copies(self, key: str) -> int | None:
        """None once ``copies_required`` stores hold a copy of ``key`` that matches its digest; else 0x0112 when
        every store lacks it, 0x0110 otherwise."""
        good, problems = 0, []
        for i, store in enumerate(self.blobs.stores):
            problem = store.problem_with(key)
            if problem is None:
                good += 1
                if good >= self.blobs.required:
                    return None
            else:
                self.blobs.found(i, key, problem)
                problems.append(problem)
        return NO_SUCH_OBJECT_INSTANCE if good == 0 and all(p == MISSING for p in problems) else PROCESSING_FAILURE

    def commit(self, request: CommitmentRequest) -> CommitmentResult:
        """The Storage Commitment Result of ``request``: each reference committed or failed (:meth:`check`)."""
        committed: list[Reference] = []
        failed: list[tuple[Reference, int]] = []
        for ref in request.references:
            reason = self.check(ref)
            if reason is None:
                committed.append(ref)
            else:
                failed.append((ref, reason))
        return CommitmentResult(request.transaction_uid, tuple(committed), tuple(failed))


class StorageCommitment:
    """The Storage Commitment Push Model SCP of one DICOM server (:class:`bastion.dimse.services.Services`)."""

    def __init__(self, archive: Archive, executor: Executor, upstream_holds: UpstreamHolds | None = None) -> None:
        self.settings: Settings = archive.settings
        self.executor = executor
        self.committer = Committer(archive.index, archive.blobs, archive.settings.storage_deny, upstream_holds)
        self._active: set[str] = set()  # Transaction UIDs whose result is not delivered yet
        self._reports: set[asyncio.Task[None]] = set()

    async def n_action(self, session: Session, msg: Message) -> None:
        """Answer a Storage Commitment Request (PS3.4 J.3.2.1.3) and start working out and delivering its result.

        A request whose Transaction UID is one whose result is still being delivered is answered with success,
        and its result fails every reference with 0x0131 Duplicate Transaction UID.
        """
        cmd = msg.command
        rsp: dict[str, Any] = {"CommandField": m.N_ACTION_RSP, "MessageIDBeingRespondedTo": cmd["MessageID"],
                               "AffectedSOPClassUID": STORAGE_COMMITMENT_PUSH,
                               "AffectedSOPInstanceUID": STORAGE_COMMITMENT_PUSH_INSTANCE,
                               "ActionTypeID": cmd.get("ActionTypeID"), "Status": m.SUCCESS}
        try:
            check_command(cmd)
            assert isinstance(msg.sink, BytesSink)
            request = parse_request(bytes(msg.sink.buffer), msg.context.transfer_syntax)
        except CommitmentRequestError as exc:
            log.warning("storage commitment request from %s refused (0x%04X): %s", session.assoc.calling_aet,
                        exc.dimse_status, exc.message)
            rsp.update(Status=exc.dimse_status, ErrorComment=exc.message[:64])
            if exc.tag is not None:
                rsp["OffendingElement"] = exc.tag
            await session.assoc.send_message(msg.context.id, rsp)
            return
        await session.assoc.send_message(msg.context.id, rsp)
        session.results_pending += 1
        task = asyncio.create_task(self._result(session, msg.context, request))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _result(self, session: Session, context: AcceptedContext, request: CommitmentRequest) -> None:
        """Work out the result of ``request`` and deliver it: on the request's association while it is open, else
        (or when that fails) on a new association to the requester's configured AE, tried again after each of
        :data:`REPORT_RETRY_DELAYS`. Until it is sent on the request's association or given up there, the
        association counts as busy (``Session.results_pending``), not idle."""
        calling, uid = session.assoc.calling_aet, request.transaction_uid
        duplicate = uid in self._active
        self._active.add(uid)
        try:
            try:
                result = (CommitmentResult.all_failed(request, DUPLICATE_TRANSACTION_UID) if duplicate
                          else await self._commit(request, calling))
                delivered = session.open and await self._report_on(session, context, result)
            finally:
                session.results_pending -= 1
            if not delivered:
                await self._report_anew(calling, result)
        finally:
            if not duplicate:
                self._active.discard(uid)

    async def _commit(self, request: CommitmentRequest, calling: str) -> CommitmentResult:
        """:meth:`Committer.commit` in a worker thread; every reference fails with 0x0110 if it raises."""
        try:
            result: CommitmentResult = await asyncio.get_running_loop().run_in_executor(
                self.executor, partial(self.committer.commit, request))
        except Exception:
            log.exception("storage commitment %s for %s failed", request.transaction_uid, calling)
            return CommitmentResult.all_failed(request, PROCESSING_FAILURE)
        log.info("storage commitment %s for %s: %d committed, %d failed", request.transaction_uid, calling,
                 len(result.committed), len(result.failed))
        return result

    async def _report_anew(self, calling: str, result: CommitmentResult) -> None:
        """Deliver ``result`` on new associations to ``calling``'s configured AE (:meth:`_report_to`)."""
        remote = self.settings.remote(calling)
        if remote is None:
            log.error("storage commitment result %s for %s lost: its association ended and %s is not a configured "
                      "remote AE", result.transaction_uid, calling, calling)
            return
        for delay in (0.0, *REPORT_RETRY_DELAYS):
            await asyncio.sleep(delay)
            try:
                await self._report_to(remote, result)
                return
            except ReportNotDelivered as exc:
                log.warning("storage commitment result %s not delivered to %s: %s", result.transaction_uid,
                            remote.aet, exc)
        log.error("storage commitment result %s for %s given up after %d attempts", result.transaction_uid,
                  remote.aet, 1 + len(REPORT_RETRY_DELAYS))

    def _event_report(self, assoc: Association, context: AcceptedContext,
                      result: CommitmentResult) -> tuple[int, dict[str, Any], bytes]:
        mid = assoc.next_message_id()
        command = {"CommandField": m.N_EVENT_REPORT_RQ, "MessageID": mid,
                   "AffectedSOPClassUID": STORAGE_COMMITMENT_PUSH,
                   "AffectedSOPInstanceUID": STORAGE_COMMITMENT_PUSH_INSTANCE, "EventTypeID": result.event_type}
        return mid, command, result.encode(context.transfer_syntax, self.settings.aet)

    async def _report_on(self, session: Session, context: AcceptedContext, result: CommitmentResult) -> bool:
        """N-EVENT-REPORT on the request's own association, the requester answering as SCU (PS3.4 J.3.3.1.2);
        whether the requester took it (answered success)."""
        try:
            await self._send_on(session, context, result)
        except ReportNotDelivered as exc:
            log.info("storage commitment result %s not delivered on the request's association: %s",
                     result.transaction_uid, exc)
            return False
        return True

    async def _send_on(self, session: Session, context: AcceptedContext, result: CommitmentResult) -> None:
        assoc = session.assoc
        mid, command, dataset = self._event_report(assoc, context, result)
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        session.replies[mid] = reply
        try:
            await assoc.send_message(context.id, command, dataset)
            await asyncio.wait([reply], timeout=TIMEOUT)
        except (AssociationClosed, OSError, TimeoutError) as exc:
            raise ReportNotDelivered(str(exc)) from exc
        finally:
            session.replies.pop(mid, None)
        if not reply.done() or reply.cancelled():
            raise ReportNotDelivered("no N-EVENT-REPORT-RSP before the association ended" if reply.cancelled()
                                     else f"no N-EVENT-REPORT-RSP within {TIMEOUT:g} s")
        _accepted(reply.result())

    async def _report_to(self, remote: RemoteAE, result: CommitmentResult) -> None:
        """N-EVENT-REPORT on a new association to ``remote``, proposing the SCP role (PS3.4 J.3.3.1.3)."""
        assoc, context = await self._associate(remote)
        try:
            mid, command, dataset = self._event_report(assoc, context, result)
            await assoc.send_message(context.id, command, dataset)
            answer = await assoc.response_to(mid, TIMEOUT)
        except (AssociationClosed, PDUError, OSError, TimeoutError) as exc:
            await assoc.abort()
            raise ReportNotDelivered(f"{remote.aet}: {exc}") from exc
        await assoc.release(TIMEOUT)
        _accepted(answer)

    async def _associate(self, remote: RemoteAE) -> tuple[Association, AcceptedContext]:
        """An association with ``remote`` on which Bastion is SCP of the Storage Commitment Push Model SOP Class."""
        context = PresentationContext(1, STORAGE_COMMITMENT_PUSH, [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN])
        rq = AssociateRQ(remote.aet, self.settings.aet, [context], self.settings.max_pdu, IMPLEMENTATION_CLASS_UID,
                         IMPLEMENTATION_VERSION_NAME, roles=[RoleSelection(STORAGE_COMMITMENT_PUSH, False, True)])
        try:
            stream = await open_stream(remote, self.settings)
        except SubOperationError as exc:
            raise ReportNotDelivered(str(exc)) from exc
        assoc = Association(stream, calling_aet=self.settings.aet, called_aet=remote.aet)
        try:
            await assoc.send_raw(encode_associate(rq, ac=False))
            kind, body = await assoc.read_pdu(TIMEOUT)
            if kind != A_ASSOCIATE_AC:
                raise PDUError(f"PDU 0x{kind:02x} instead of A-ASSOCIATE-AC")
            ac = decode_associate(body)
        except (AssociationClosed, PDUError, OSError, TimeoutError) as exc:
            assoc.close()
            raise ReportNotDelivered(f"association with {remote.aet} failed: {exc}") from exc
        accepted = next((pc for pc in ac.contexts if pc.id == context.id and pc.result == 0), None)
        if accepted is None:
            await assoc.release(TIMEOUT)
            raise ReportNotDelivered(f"{remote.aet} accepted no Storage Commitment Push Model context")
        if not any(r.sop_class == STORAGE_COMMITMENT_PUSH and r.scp for r in ac.roles):
            log.info("%s did not confirm Bastion's SCP role for Storage Commitment; reporting anyway", remote.aet)
        assoc.peer_max_pdu = ac.max_pdu - ac.max_pdu % 2
        assoc.contexts[context.id] = AcceptedContext(context.id, STORAGE_COMMITMENT_PUSH, accepted.transfer_syntax,
                                                     scu_role=False, scp_role=True)
        return assoc, assoc.contexts[context.id]

    async def close(self, grace: float) -> None:
        """Give the results still being worked out or delivered ``grace`` seconds, then stop them (those are lost;
        their modalities ask again)."""
        if not self._reports:
            return
        _, pending = await asyncio.wait(set(self._reports), timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


def _accepted(answer: dict[str, Any]) -> None:
    """Raise :class:`ReportNotDelivered` unless the N-EVENT-REPORT-RSP ``answer`` says success."""
    status = int(answer.get("Status", 0xC000))
    if status != m.SUCCESS:
        raise ReportNotDelivered(f"N-EVENT-REPORT-RSP status 0x{status:04X}")
