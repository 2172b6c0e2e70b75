"""DIMSE service handlers: Verification, Storage, Query/Retrieve FIND, MOVE and GET, Storage Commitment Push Model
(PS3.4 A, B, C, J)."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from bastion.archive import Archive
from bastion.audit import AuditEvent, AuditKind, Outcome, StoreTally
from bastion.audit.events import query_event
from bastion.dimse import messages as m
from bastion.dimse.access import ALL, Grant, ServiceRefused, service_of
from bastion.dimse.association import Association, BytesSink, DatasetSink, Message
from bastion.dimse.commitment import StorageCommitment, UpstreamHolds
from bastion.dimse.identifiers import (
    decode_identifier,
    encode_failed_uids,
    encode_response,
    query_keys,
    query_level,
)
from bastion.dimse.moves import Moves, move_key, move_payload
from bastion.dimse.scu import DestinationLost, SubOperationError, send_instance
from bastion.dimse.suboperations import Store, Tally, run_suboperations
from bastion.errors import BastionError, InvalidQuery, UnknownDestination
from bastion.ingest import PendingObject
from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition
from bastion.model.records import InstanceRecord
from bastion.model.uids import PATIENT_ROOT_MODELS, STORAGE_COMMITMENT_PUSH, is_storage_sop_class
from bastion.query.find import conditions_for, select_keys

log = logging.getLogger("bastion.dimse")

#: The C-STORE status of an object stored with warnings: Warning 0116H, Attribute Value Out of Range ("the
#: attribute value specified was out of range or otherwise inappropriate", PS3.7 Annex C), which is what a UID
#: breaking PS3.5 9.1 or a File Meta naming another SOP instance is. None of PS3.4 B.2.3's own warnings fits:
#: nothing was coerced (B000) or discarded (B006), and the data set is not found to mismatch its SOP class
#: (B007). An SCU counts any warning status as stored (PS3.4 B.2.3); C-MOVE and C-GET count 0116H as a warning
#: sub-operation.
STORED_WITH_WARNINGS = 0x0116
#: The most C-FIND, C-MOVE and C-GET requests one association may have running at once; one more is refused out
#: of resources. We negotiate one (PS3.7 D.3.3.3); a few more are tolerated from peers that do not wait.
MAX_OPERATIONS = 16


class FailedSink:
    """Swallows a dataset whose storage could not even start; the error is answered at the end."""

    def __init__(self, error: BastionError) -> None:
        self.error = error

    def write(self, data: bytes | memoryview) -> None:
        pass


@dataclass
class Session:
    """Per-association state: running Q/R operations, and the responses awaited to our own requests (C-GET's
    C-STORE sub-operations, Storage Commitment results) by Message ID."""

    assoc: Association
    tasks: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    cancelled: set[int] = field(default_factory=set)
    replies: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    #: False once the peer asked to release the association, aborted it, or it ended.
    open: bool = True
    #: Storage Commitment results of this association's requests not yet sent on it, nor given up there.
    results_pending: int = 0
    #: The services this association may use (:mod:`bastion.dimse.access`), decided at its A-ASSOCIATE-RQ.
    grant: Grant = ALL
    #: The peer's IP address.
    address: str = ""
    #: The C-STOREs of this association per study, audited once at its end (:meth:`Services.end_session`).
    stores: StoreTally = field(default_factory=StoreTally)

    def audit_who(self) -> dict[str, Any]:
        """Who is asking, for an audit event: the calling AE title, its IP address, the AE title it called."""
        return {"user": self.assoc.calling_aet, "address": self.assoc.peername.rsplit(":", 1)[0],
                "destination": self.assoc.called_aet, "via": "dimse"}


#: The audit event a refused request is recorded as (a refused C-ECHO or N-ACTION: as an association event).
_AUDIT_KIND = {"store": AuditKind.STORE, "find": AuditKind.QUERY, "move": AuditKind.RETRIEVE,
               "get": AuditKind.RETRIEVE}


def _comment(text: str) -> str:
    return text.replace("\\", "/")[:64]


class Services:
    """Dispatches assembled messages to the archive; one instance per server."""

    def __init__(self, archive: Archive, executor: Executor, *, upstream_holds: UpstreamHolds | None = None) -> None:
        self.archive = archive
        self.executor = executor
        self.moves = Moves(archive, executor)
        self.commitment = StorageCommitment(archive, executor, upstream_holds)

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args, **kwargs))

    # -- dataset sinks --------------------------------------------------------------------
    def open_sink(self, session: Session, msg: Message) -> DatasetSink:
        """Where an incoming dataset goes: straight into the blob store for C-STORE."""
        cmd = msg.command
        if cmd["CommandField"] != m.C_STORE_RQ:
            return BytesSink()
        if not session.grant.allows("store"):  # its dataset is read and dropped; dispatch answers 0x0124
            return FailedSink(ServiceRefused("store not granted"))
        try:
            return self.archive.ingest.begin_dimse(
                f"dimse:{session.assoc.calling_aet}", str(cmd.get("AffectedSOPClassUID", "")),
                str(cmd.get("AffectedSOPInstanceUID", "")), msg.context.transfer_syntax,
                session.assoc.calling_aet)
        except BastionError as exc:
            return FailedSink(exc)

    def abort_sink(self, msg: Message | None) -> None:
        """Drop a half-received dataset (association aborted or dropped)."""
        if msg is not None and isinstance(msg.sink, PendingObject):
            msg.sink.abort()

    # -- dispatch ---------------------------------------------------------------------------
    async def dispatch(self, session: Session, msg: Message) -> None:
        """Handle one complete message."""
        field_ = msg.command["CommandField"]
        service = service_of(field_, msg.context.abstract_syntax)
        if service is not None and not session.grant.allows(service):
            await self._not_authorized(session, msg, service)
            return
        if field_ == m.C_STORE_RQ:
            await self.c_store(session, msg)
        elif field_ == m.C_ECHO_RQ:
            await session.assoc.send_message(msg.context.id, {
                "CommandField": m.C_ECHO_RSP, "MessageIDBeingRespondedTo": msg.command["MessageID"],
                "AffectedSOPClassUID": msg.context.abstract_syntax, "Status": m.SUCCESS})
        elif field_ in (m.C_FIND_RQ, m.C_MOVE_RQ, m.C_GET_RQ):
            handler = {m.C_FIND_RQ: self.c_find, m.C_MOVE_RQ: self.c_move, m.C_GET_RQ: self.c_get}[field_]
            mid = msg.command["MessageID"]
            if mid in session.tasks or len(session.tasks) >= MAX_OPERATIONS:
                await self._refuse(session, msg, f"{len(session.tasks)} requests running")
                return
            session.tasks[mid] = asyncio.create_task(self._guard(session, msg, handler))
        elif field_ == m.N_ACTION_RQ and msg.context.abstract_syntax == STORAGE_COMMITMENT_PUSH:
            await self.commitment.n_action(session, msg)
        elif field_ == m.C_CANCEL_RQ:
            session.cancelled.add(msg.command.get("MessageIDBeingRespondedTo", -1))
        elif field_ in (m.C_STORE_RSP, m.N_EVENT_REPORT_RSP):
            fut = session.replies.pop(msg.command.get("MessageIDBeingRespondedTo", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(msg.command)
        else:
            await session.assoc.send_message(msg.context.id, {
                "CommandField": field_ | 0x8000, "MessageIDBeingRespondedTo": msg.command.get("MessageID", 0),
                "Status": m.UNRECOGNIZED_OPERATION})

    async def _not_authorized(self, session: Session, msg: Message, service: str) -> None:
        """Refuse a request for a service the association was not granted: 0x0124 Refused: Not Authorized (PS3.7
        Annex C), logged and audited; a C-STORE's dataset was dropped as it arrived (:meth:`open_sink`)."""
        cmd = msg.command
        calling = session.assoc.calling_aet
        why = f"{service} not granted to {calling}"
        log.warning("refusing %s from %s (%s): %s (0x0124 not authorized)", service, calling, session.address, why)
        self.refused(session, service, why)
        rsp: dict[str, Any] = {"CommandField": cmd["CommandField"] | 0x8000,
                               "MessageIDBeingRespondedTo": cmd.get("MessageID", 0),
                               "AffectedSOPClassUID": cmd.get("AffectedSOPClassUID") or msg.context.abstract_syntax,
                               "Status": ServiceRefused.dimse_status, "ErrorComment": _comment(why)}
        if cmd.get("AffectedSOPInstanceUID"):
            rsp["AffectedSOPInstanceUID"] = cmd["AffectedSOPInstanceUID"]
        await session.assoc.send_message(msg.context.id, rsp)

    def refused(self, session: Session, service: str, why: str) -> None:
        """Audit a request refused by the access rules (:mod:`bastion.dimse.access`)."""
        self.archive.audit.record(AuditEvent(
            kind=_AUDIT_KIND.get(service, AuditKind.ASSOCIATION), outcome=Outcome.MINOR_FAILURE,
            user=session.assoc.calling_aet,
            address=session.address, destination=session.assoc.called_aet, via="dimse",
            detail=f"{service} refused: {why}", event_type="110132"))  # Use of Restricted Function: a Security Alert

    async def _refuse(self, session: Session, msg: Message, why: str) -> None:
        """Answer a Q/R request that is not run: 0x0210 for a Message ID in use by a running one (PS3.7 C.5.2),
        else refused out of resources (PS3.4 C.4.1.1.4, C.4.2.1.4, C.4.3.1.4)."""
        field_, mid = msg.command["CommandField"], msg.command["MessageID"]
        status = (m.DUPLICATE_INVOCATION if mid in session.tasks
                  else m.OUT_OF_RESOURCES if field_ == m.C_FIND_RQ else m.OUT_OF_RESOURCES_MATCHES)
        log.warning("refusing %s %d from %s: %s (at most %d at once)", hex(field_), mid, session.assoc.calling_aet,
                    why, MAX_OPERATIONS)
        await session.assoc.send_message(msg.context.id, {
            "CommandField": field_ | 0x8000, "MessageIDBeingRespondedTo": mid,
            "AffectedSOPClassUID": msg.context.abstract_syntax, "Status": status,
            "ErrorComment": _comment(f"{why}; at most {MAX_OPERATIONS} at once")})

    async def _guard(self, session: Session, msg: Message, handler: Any) -> None:
        rsp_field = msg.command["CommandField"] | 0x8000
        try:
            await handler(session, msg)
        except BastionError as exc:
            log.warning("%s from %s failed: %s", hex(msg.command["CommandField"]), session.assoc.calling_aet,
                        exc.message)
            self.archive.audit.record(AuditEvent(
                AuditKind.QUERY if msg.command["CommandField"] == m.C_FIND_RQ else AuditKind.RETRIEVE,
                Outcome.SERIOUS_FAILURE, **session.audit_who(), detail=exc.message))
            await self._final(session, msg, rsp_field, exc.dimse_status, comment=exc.message)
        except Exception as exc:
            log.exception("query/retrieve from %s failed", session.assoc.calling_aet)
            await self._final(session, msg, rsp_field, 0xC000, comment=f"internal error: {exc}")
        finally:
            session.tasks.pop(msg.command["MessageID"], None)
            session.cancelled.discard(msg.command["MessageID"])

    async def _final(self, session: Session, msg: Message, rsp_field: int, status: int, *,
                     comment: str | None = None, counts: dict[str, int] | None = None,
                     dataset: bytes | None = None) -> bool:
        """Send a final response; whether it was sent (False: the association is gone)."""
        cmd = {"CommandField": rsp_field, "MessageIDBeingRespondedTo": msg.command["MessageID"],
               "AffectedSOPClassUID": msg.context.abstract_syntax, "Status": status, **(counts or {})}
        if comment and status not in (m.SUCCESS, m.PENDING, m.CANCEL):
            cmd["ErrorComment"] = _comment(comment)
        try:
            await session.assoc.send_message(msg.context.id, cmd, dataset)
        except Exception:
            log.info("could not answer %s: association gone", hex(rsp_field))
            return False
        return True

    # -- C-STORE (PS3.4 B.2) --------------------------------------------------------------------
    async def c_store(self, session: Session, msg: Message) -> None:
        """Store one object and answer (PS3.4 B.2.3): success, a failure with its status and an ErrorComment,
        or, for an object stored with warnings (``StoreResult.warnings``), :data:`STORED_WITH_WARNINGS` with an
        ErrorComment naming the first problems."""
        cmd = msg.command
        rsp: dict[str, Any] = {"CommandField": m.C_STORE_RSP, "MessageIDBeingRespondedTo": cmd["MessageID"],
                               "AffectedSOPClassUID": cmd.get("AffectedSOPClassUID", ""),
                               "AffectedSOPInstanceUID": cmd.get("AffectedSOPInstanceUID", "")}
        sink = msg.sink
        try:
            if isinstance(sink, FailedSink):
                raise sink.error
            assert isinstance(sink, PendingObject)
            if not is_storage_sop_class(msg.context.abstract_syntax):
                sink.abort()
                raise InvalidQuery("not a storage presentation context")
            sop_class: str | None = cmd.get("AffectedSOPClassUID")
            sop_uid: str | None = cmd.get("AffectedSOPInstanceUID")
            # One path for every object: the loop checks the header while the disk flushes, and awaits the
            # flush and any other writer of the index instead of waiting for them (it serves others meanwhile).
            result = await self.archive.ingest.finish_async(sink, sop_class=sop_class, sop_uid=sop_uid)
            session.stores.stored(result.record.study_uid, result.patient_id)
            rsp["Status"] = STORED_WITH_WARNINGS if result.warnings else m.SUCCESS
            if result.warnings:
                rsp["ErrorComment"] = _comment("; ".join(result.warnings))
        except BastionError as exc:
            rsp["Status"] = exc.dimse_status
            rsp["ErrorComment"] = _comment(exc.message)
            session.stores.failed(exc.message)
        await session.assoc.send_message(msg.context.id, rsp)

    def end_session(self, session: Session) -> None:
        """Audit the association's C-STOREs, one event per study (PS3.15 A.5.3.2), when it ends."""
        if session.stores:
            for event in session.stores.events(AuditEvent(AuditKind.STORE, **session.audit_who())):
                self.archive.audit.record(event)

    # -- C-FIND (PS3.4 C.4.1) ---------------------------------------------------------------------
    def _identifier(self, msg: Message) -> tuple[QueryLevel, Any, list[int]]:
        assert isinstance(msg.sink, BytesSink)
        ds = decode_identifier(bytes(msg.sink.buffer), msg.context.transfer_syntax)
        level = query_level(ds)
        if level is QueryLevel.PATIENT and msg.context.abstract_syntax not in PATIENT_ROOT_MODELS:
            raise InvalidQuery("the Study Root model has no PATIENT level")
        keys, tags = query_keys(ds)
        return level, conditions_for(keys), tags

    async def c_find(self, session: Session, msg: Message) -> None:
        level, conditions, tags = self._identifier(msg)
        results = await self._run(self.archive.finder.find, level, conditions)
        self.archive.audit.record(query_event(conditions, level.value, len(results), **session.audit_who()))
        ts = msg.context.transfer_syntax
        mid = msg.command["MessageID"]
        for result in results:
            if mid in session.cancelled:
                await self._final(session, msg, m.C_FIND_RSP, m.CANCEL)
                return
            body = encode_response(select_keys(result, tags, empty_for_missing=True), level, ts,
                                   self.archive.settings.aet if 0x00080054 in tags else None)
            await session.assoc.send_message(msg.context.id, {
                "CommandField": m.C_FIND_RSP, "MessageIDBeingRespondedTo": mid,
                "AffectedSOPClassUID": msg.context.abstract_syntax, "Status": m.PENDING}, body)
        await self._final(session, msg, m.C_FIND_RSP, m.SUCCESS)

    # -- C-MOVE (PS3.4 C.4.2) and C-GET (C.4.3) -----------------------------------------------------
    def _retrieve_keys(self, msg: Message) -> tuple[QueryLevel, list[Condition]]:
        """A retrieve identifier's level and matching keys; it must name the level's unique key
        (PS3.4 C.4.2.1.4, C.4.3.1.4)."""
        level, conditions, _ = self._identifier(msg)
        if not any(c.keyword == level.unique_key and c.kind.value != "universal" for c in conditions):
            raise InvalidQuery(f"a retrieve at {level.value} level needs {level.unique_key}")
        return level, conditions

    async def _select(self, msg: Message) -> list[InstanceRecord]:
        return list(await self._run(self.archive.retriever.select, *self._retrieve_keys(msg)))

    async def c_move(self, session: Session, msg: Message) -> None:
        """C-MOVE (PS3.4 C.4.2): the matching instances sent to the move destination, one C-STORE sub-operation
        each over one association (C.4.2.2), a pending response after each and a final response with the counts
        (C.4.2.1.4).

        The sub-operations are a leased job (:mod:`bastion.dimse.moves`): if this node dies, another finishes
        them within a lease and a poll; the same request sent again joins the job (waits for it, or takes it
        over) instead of starting another, and answers with its counts once it finished, skipping the instances
        it delivered. A requester that leaves does not stop the job: the node's runner finishes it.
        """
        dest = str(msg.command.get("MoveDestination", "")).strip()
        if self.archive.settings.remote(dest) is None:
            raise UnknownDestination(f"move destination {dest!r} is not a configured remote AE")
        if not session.grant.may_move_to(dest):  # logged and audited as a failed retrieve by _guard
            raise UnknownDestination(f"move destination {dest!r} not granted to {session.assoc.calling_aet}")
        level, conditions = self._retrieve_keys(msg)
        records = list(await self._run(self.archive.retriever.select, level, conditions))
        if not records:  # nothing matches: zero sub-operations, no association with the destination, no job
            self._audit_retrieve(session, dest, records, Tally(0))
            await self._answer(session, msg, Tally(0))
            return
        calling, mid = session.assoc.calling_aet, msg.command["MessageID"]
        job, tally = await self.moves.request(
            move_key(calling, dest, level, conditions), move_payload(dest, records, (calling, mid)), records,
            stop=lambda: mid in session.cancelled, progress=partial(self._pending, session, msg))
        self._audit_retrieve(session, dest, records, tally)
        if await self._answer(session, msg, tally):
            await self._run(self.archive.jobs.answered, job)

    async def c_get(self, session: Session, msg: Message) -> None:
        records = await self._select(msg)

        async def store_here(record: InstanceRecord, originator: tuple[str, int] | None) -> int:
            ctx = self._get_context(session.assoc, record)
            if ctx is None:
                raise SubOperationError(f"no accepted storage context for {record.sop_class_uid}")
            context_id, ts = ctx
            mid = session.assoc.next_message_id()
            fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            session.replies[mid] = fut
            await send_instance(self, session.assoc, context_id, ts, record, {
                "CommandField": m.C_STORE_RQ, "MessageID": mid, "Priority": 0,
                "AffectedSOPClassUID": record.sop_class_uid, "AffectedSOPInstanceUID": record.sop_uid})
            idle = self.archive.settings.dicom_idle_timeout
            try:  # a peer silent for the idle timeout is gone: its own running request must not keep it alive
                rsp = await asyncio.wait_for(fut, idle)
            except TimeoutError:
                raise DestinationLost(f"no C-STORE response from {session.assoc.calling_aet} "
                                      f"within {idle:g} s") from None
            finally:
                session.replies.pop(mid, None)
            return int(rsp.get("Status", 0xC000))

        await self._suboperations(session, msg, records, store_here)

    def _get_context(self, assoc: Association, record: InstanceRecord) -> tuple[int, str] | None:
        candidates = [c for c in assoc.contexts.values()
                      if c.abstract_syntax == record.sop_class_uid and c.scp_role]
        accepted = [c.transfer_syntax for c in candidates]
        ts = self.archive.retriever.choose_syntax(record, accepted)
        for c in candidates:
            if c.transfer_syntax == ts:
                return c.id, ts
        return None

    async def _suboperations(self, session: Session, msg: Message, records: list[InstanceRecord],
                             store: Store) -> None:
        """C-GET's sub-operations over the requester's own association, a pending response after each, then the
        final response (PS3.4 C.4.3.1.4, :func:`run_suboperations`); a C-CANCEL stops them (C.4.3.3.1)."""
        mid = msg.command["MessageID"]
        tally = Tally(len(records))

        async def pending(record: InstanceRecord, status: int) -> None:
            await self._pending(session, msg, tally)

        if not await run_suboperations(records, store, tally, (session.assoc.calling_aet, mid),
                                       peer=session.assoc.calling_aet, stop=lambda: mid in session.cancelled,
                                       done=pending):
            tally.cancelled = True
        self._audit_retrieve(session, session.assoc.calling_aet, records, tally)
        await self._answer(session, msg, tally)

    def _audit_retrieve(self, session: Session, destination: str, records: list[InstanceRecord], tally: Tally) -> None:
        """Audit a C-MOVE or C-GET (PS3.15 A.5.3.2, instances sent): its destination, the studies and patient,
        the instances delivered; a failure outcome if some sub-operations failed or it was cancelled."""
        studies = tuple(dict.fromkeys(r.study_uid for r in records))
        outcome = (Outcome.SUCCESS if not tally.failed and not tally.cancelled
                   else Outcome.MINOR_FAILURE if tally.completed or tally.warning else Outcome.SERIOUS_FAILURE)
        detail = ", ".join(f for f in (f"{tally.failed} failed" if tally.failed else "",
                                       "cancelled" if tally.cancelled else "") if f)
        self.archive.audit.record(AuditEvent(
            AuditKind.RETRIEVE, outcome, "R", **{**session.audit_who(), "destination": destination},
            studies=studies[:100],
            count=tally.completed + tally.warning, detail=detail))

    async def _pending(self, session: Session, msg: Message, tally: Tally) -> None:
        """A pending C-MOVE or C-GET response with the counts so far (PS3.4 C.4.2.1.4, C.4.3.1.4)."""
        await session.assoc.send_message(msg.context.id, {
            "CommandField": msg.command["CommandField"] | 0x8000, "MessageIDBeingRespondedTo": msg.command["MessageID"],
            "AffectedSOPClassUID": msg.context.abstract_syntax, "Status": m.PENDING, **tally.counts(final=False)})

    async def _answer(self, session: Session, msg: Message, tally: Tally) -> bool:
        """The final C-MOVE or C-GET response (PS3.4 C.4.2.1.4, C.4.3.1.4): Cancel after a C-CANCEL, success,
        0xB000 if some sub-operations failed or had warnings, 0xA702 if none succeeded; the failed instances'
        UIDs in its identifier. Whether it was sent."""
        dataset = encode_failed_uids(tally.failed_uids, msg.context.transfer_syntax) if tally.failed_uids else None
        return await self._final(session, msg, msg.command["CommandField"] | 0x8000, tally.status,
                                 counts=tally.counts(final=True), dataset=dataset,
                                 comment=f"{tally.failed} sub-operation(s) failed" if tally.failed else None)
