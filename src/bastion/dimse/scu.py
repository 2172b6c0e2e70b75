"""Storage SCU: the requestor side, used for C-MOVE sub-operations (PS3.4 C.4.2.3, PS3.7 9.1.1) and for
forwarding (:mod:`bastion.forward.delivery`): the one component that sends stored instances by C-STORE.

Each SOP class is proposed in the syntaxes the instances were stored in, each in a context of its own, and in
one context of Explicit and Implicit VR Little Endian; an instance goes in its stored syntax where that was
accepted, else converted (:meth:`~bastion.query.retrieve.Retriever.open_for_dimse`), and one that cannot be
converted (no codec here) fails alone with :class:`~bastion.errors.UnsupportedTransferSyntax`, before anything of
it is sent. The socket has TCP_NODELAY (:class:`~bastion.dimse.stream.PDUStream`); a ``tls://`` remote is
reached over DICOM TLS (:func:`open_stream`).

An A-ABORT from the destination, its closing the connection, a PDU other than P-DATA-TF where a C-STORE-RSP
was due, no response within :data:`TIMEOUT`, or its reading nothing we send for that long ends the association
at once: the connection is closed (the receiver of an A-ABORT closes it, PS3.8 9.2 AA-3, so a peer that leaves it
open is not waited for) and :class:`DestinationLost` tells the caller that no further sub-operation can go there.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from bastion import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from bastion.dimse import messages as m
from bastion.dimse.association import AcceptedContext, Association
from bastion.dimse.pdu import (
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    AssociateRQ,
    PDUError,
    PresentationContext,
    decode_associate,
    encode_associate,
)
from bastion.dimse.stream import AssociationClosed, PDUStream
from bastion.dimse.tls import TLSConfigError, client_context, describe
from bastion.model.records import InstanceRecord
from bastion.model.remotes import RemoteAE
from bastion.model.uids import EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN
from bastion.settings import Settings

if TYPE_CHECKING:
    from bastion.archive import Archive

log = logging.getLogger("bastion.dimse.scu")
TIMEOUT = 30.0


class SubOperationError(Exception):
    """A storage sub-operation could not be attempted (no association, no context)."""


class DestinationLost(SubOperationError):
    """The association with the destination ended (aborted, dropped, released by it, or silent past
    :data:`TIMEOUT`): this sub-operation and every one after it fail (PS3.4 C.4.2.3.1)."""


async def open_stream(remote: RemoteAE, settings: Settings) -> PDUStream:
    """A connection to ``remote`` for an association Bastion requests: plain TCP, or DICOM TLS for a ``tls://``
    remote (:func:`~bastion.dimse.tls.client_context`: its certificate verified, this node's shown). Connecting and
    the TLS handshake each have :data:`TIMEOUT`; a failure is a SubOperationError naming the remote and why (for
    TLS, OpenSSL's reason, such as ``CERTIFICATE_VERIFY_FAILED``)."""
    where = f"{remote.aet} at {remote.host}:{remote.port}"
    try:
        tls = client_context(settings) if remote.tls else None
    except TLSConfigError as exc:
        raise SubOperationError(f"no DICOM TLS to {where}: {exc.message}") from exc
    try:
        _, stream = await asyncio.wait_for(asyncio.get_running_loop().create_connection(
            PDUStream, remote.host, remote.port, ssl=tls, server_hostname=remote.host if tls else None,
            ssl_handshake_timeout=TIMEOUT if tls else None), TIMEOUT)
    except ssl.SSLError as exc:
        raise SubOperationError(f"TLS handshake with {where} failed: {describe(exc)}") from exc
    except (TimeoutError, OSError) as exc:
        raise SubOperationError(f"cannot connect to {where}{' (TLS)' if tls else ''}: {exc or 'timed out'}") from exc
    stream.send_timeout = TIMEOUT  # a peer that stops reading what we send is lost
    return stream


async def send_instance(owner: Any, assoc: Association, context_id: int, ts: str, record: InstanceRecord,
                        command: dict[str, Any]) -> None:
    """Send a C-STORE-RQ for ``record`` in ``ts``: streamed from the blob as stored, or converted; either way a
    dataset of even length (:meth:`Retriever.open_for_dimse`), so every PDV fragment has even length."""
    stream = await owner._run(owner.archive.retriever.open_for_dimse, record, ts)
    try:
        await assoc.send_message(context_id, command, stream=stream)
    finally:
        stream.close()



@dataclass(frozen=True)
class PreparedInstance:
    """An instance ready to go on a :class:`StoreSCU`'s association: its accepted context and transfer syntax, and
    its dataset opened for sending (:meth:`StoreSCU.prepare`; closed once sent)."""

    record: InstanceRecord
    context_id: int
    transfer_syntax: str
    stream: BinaryIO


class StoreSCU:
    """One outgoing association that sends stored instances to a remote AE."""

    def __init__(self, archive: Archive, executor: Executor, *, calling_aet: str, remote: RemoteAE,
                 max_pdu: int = 1048576) -> None:
        self.archive = archive
        self.executor = executor
        self.calling_aet = calling_aet
        self.remote = remote
        self.max_pdu = max_pdu
        self.assoc: Association | None = None

    async def connect(self, sop_classes: set[str], stored_syntaxes: set[str]) -> None:
        """Associate, proposing each SOP class in its stored syntaxes and uncompressed."""
        if not sop_classes:
            raise SubOperationError("nothing to send: no SOP class to propose")
        contexts: list[PresentationContext] = []
        next_id = 1
        for sop_class in sorted(sop_classes):
            # Each stored syntax in a context of its own, uncompressed ones too: in the shared context below the
            # acceptor picks, and an instance stored in the syntax it did not pick would go converted.
            for ts_list in ([t] for t in sorted(stored_syntaxes)):
                contexts.append(PresentationContext(next_id, sop_class, ts_list))
                next_id += 2
            contexts.append(PresentationContext(next_id, sop_class,
                                                [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN]))
            next_id += 2
        if next_id > 255:
            raise SubOperationError("too many SOP classes / transfer syntaxes for one association")
        stream = await open_stream(self.remote, self.archive.settings)
        assoc = Association(stream, calling_aet=self.calling_aet, called_aet=self.remote.aet)
        rq = AssociateRQ(self.remote.aet, self.calling_aet, contexts, self.max_pdu, IMPLEMENTATION_CLASS_UID,
                         IMPLEMENTATION_VERSION_NAME)
        try:
            await assoc.send_raw(encode_associate(rq, ac=False))
            kind, body = await assoc.read_pdu(TIMEOUT)
        except (TimeoutError, AssociationClosed, OSError) as exc:
            assoc.close()
            raise SubOperationError(f"association with {self.remote.aet} failed: {exc}") from exc
        if kind == A_ASSOCIATE_RJ:
            assoc.close()
            raise SubOperationError(f"{self.remote.aet} rejected the association")
        if kind != A_ASSOCIATE_AC:
            await assoc.abort()
            raise SubOperationError(f"unexpected PDU 0x{kind:02x} from {self.remote.aet}")
        ac = decode_associate(body)
        assoc.peer_max_pdu = ac.max_pdu - ac.max_pdu % 2  # fragments of even length (PS3.8 9.3.5.1)
        proposed = {pc.id: pc for pc in contexts}
        for pc in ac.contexts:
            if pc.result == 0 and pc.id in proposed:
                assoc.contexts[pc.id] = AcceptedContext(pc.id, proposed[pc.id].abstract_syntax, pc.transfer_syntax)
        self.assoc = assoc

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _context_for(self, record: InstanceRecord) -> tuple[int, str] | None:
        assert self.assoc is not None
        candidates = [c for c in self.assoc.contexts.values() if c.abstract_syntax == record.sop_class_uid]
        ts = self.archive.retriever.choose_syntax(record, [c.transfer_syntax for c in candidates])
        for c in candidates:
            if c.transfer_syntax == ts:
                return c.id, ts
        return None

    async def prepare(self, record: InstanceRecord) -> PreparedInstance:
        """Choose the accepted context ``record`` goes in and open its dataset for sending (in the executor: a
        verified read, converted if need be), so that it can be done while the previous instance is answered.

        Raises SubOperationError when no accepted context fits ``record``, a BastionError when it cannot be read or
        converted (nothing was sent: the next instance may still go), and :class:`DestinationLost` when there is
        no association.
        """
        if self.assoc is None:
            raise DestinationLost(f"no association with {self.remote.aet}")
        ctx = self._context_for(record)
        if ctx is None:
            raise SubOperationError(f"{self.remote.aet} accepted no context for {record.sop_class_uid}")
        context_id, ts = ctx
        stream = await self._run(self.archive.retriever.open_for_dimse, record, ts)
        return PreparedInstance(record, context_id, ts, stream)

    async def store(self, record: InstanceRecord, originator: tuple[str, int] | None = None,
                    prepared: PreparedInstance | None = None) -> int:
        """Send one instance (``prepared`` by :meth:`prepare` beforehand, else now); return the peer's C-STORE
        status.

        Raises SubOperationError when no accepted context fits ``record`` (the next instance may still go), and
        :class:`DestinationLost` when the association ended (none can).
        """
        if prepared is None:
            prepared = await self.prepare(record)
        assoc = self.assoc
        if assoc is None:
            prepared.stream.close()
            raise DestinationLost(f"no association with {self.remote.aet}")
        mid = assoc.next_message_id()
        cmd: dict[str, Any] = {"CommandField": m.C_STORE_RQ, "MessageID": mid, "Priority": 0,
                               "AffectedSOPClassUID": record.sop_class_uid,
                               "AffectedSOPInstanceUID": record.sop_uid}
        if originator:
            cmd["MoveOriginatorApplicationEntityTitle"] = originator[0]
            cmd["MoveOriginatorMessageID"] = originator[1]
        try:
            try:
                await assoc.send_message(prepared.context_id, cmd, stream=prepared.stream)
            finally:
                prepared.stream.close()
            return int((await assoc.response_to(mid, TIMEOUT)).get("Status", 0xC000))
        except AssociationClosed as exc:
            self.assoc = None
            assoc.close()
            raise DestinationLost(f"{self.remote.aet}: {exc}") from exc
        except (TimeoutError, PDUError, OSError) as exc:
            self.assoc = None
            await assoc.abort()
            raise DestinationLost(f"{self.remote.aet}: {exc}") from exc

    async def release(self) -> None:
        """A-RELEASE (PS3.8 7.2) and close; an A-ABORT or a closed connection instead of A-RELEASE-RP ends it
        too, and a peer silent for :data:`TIMEOUT` is aborted. Nothing to do once the association ended."""
        assoc, self.assoc = self.assoc, None
        if assoc is not None:
            await assoc.release(TIMEOUT)
