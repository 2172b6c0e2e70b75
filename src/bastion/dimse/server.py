"""The DICOM listener: accepts associations and runs the services on one asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

from bastion import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from bastion.archive import Archive
from bastion.audit import AuditEvent, AuditKind, Outcome
from bastion.dimse.access import AccessPolicy, Rejection, certificate_subject
from bastion.dimse.association import Association, DatasetSink, Message
from bastion.dimse.commitment import UpstreamHolds
from bastion.dimse.loadboard import LoadBoard
from bastion.dimse.negotiation import negotiate
from bastion.dimse.pdu import (
    A_ABORT,
    A_ASSOCIATE_RQ,
    A_RELEASE_RQ,
    P_DATA_TF,
    REASON_LOCAL_LIMIT_EXCEEDED,
    REJECTED_PERMANENT,
    REJECTED_TRANSIENT,
    SOURCE_PROVIDER_PRESENTATION,
    SOURCE_SERVICE_USER,
    AssociateRQ,
    PDUError,
    PDURefused,
    decode_associate,
    encode_associate,
    encode_reject,
    encode_release,
)
from bastion.dimse.services import Services, Session
from bastion.dimse.stream import (
    MAX_ASSOCIATE_RQ,
    MAX_INCOMING_PDU,
    MESSAGE,
    RESERVE,
    AssociationClosed,
    PDUStream,
)
from bastion.dimse.tls import describe, server_context

log = logging.getLogger("bastion.dimse")

#: The PDUs an acceptor takes before its association is established (PS3.8 9.2, Sta2).
UNASSOCIATED_PDUS = frozenset({A_ASSOCIATE_RQ, A_ABORT})
#: The PDUs an acceptor takes once established (it never requests a release itself).
ASSOCIATED_PDUS = frozenset({P_DATA_TF, A_RELEASE_RQ, A_ABORT})
#: A P-DATA-TF PDU may be this many times longer than the maximum length we advertise (PS3.8 D.1) before it is
#: refused with A-ABORT: some peers send longer ones than they were told. The buffer for the part beyond the
#: advertised length grows only as its bytes arrive.
PDU_TOLERANCE = 4


def _where(address: object) -> str:
    """``host:port`` of a peer's socket address."""
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until a connection is pending on the listening ``sock``."""
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


def _pending(sock: socket.socket) -> bool:
    """True while a connection waits on the listening ``sock`` (no other worker took it yet)."""
    return bool(select.select([sock], [], [], 0)[0])


class DicomServer:
    """Accepts DICOM associations for an :class:`Archive`.

    ``board`` and ``worker``: this process's slot on the :class:`LoadBoard` shared by the worker processes
    of one listening socket (None when it has the socket to itself).

    What one client can hold is bounded by the archive's settings:

    * a connection is counted against ``max_associations`` (over all workers) and ``max_associations_per_peer``
      (per IP address, over all workers) from the moment it is accepted; one beyond either is answered
      A-ASSOCIATE-RJ rejected-transient, service-provider (presentation), local-limit-exceeded (PS3.8 9.3.4);
    * until A-ASSOCIATE-AC is sent, a connection's receive buffers hold at most 1 MB: a longer A-ASSOCIATE-RQ is
      answered A-ASSOCIATE-RJ, any other PDU but A-ABORT with A-ABORT, from its header alone;
    * the whole A-ASSOCIATE-RQ must arrive within ``dicom_artim_timeout`` of the connection (ARTIM, PS3.8 9.1.5);
    * once established, a PDU longer than :data:`PDU_TOLERANCE` times ``max_pdu`` is refused with A-ABORT, and
      no more than ``max_pdu`` is allocated for one before its bytes arrive;
    * an association that receives nothing for ``dicom_idle_timeout`` while no request of its peer is in
      progress (:attr:`Session.tasks`), or whose peer reads nothing we send for that long, is aborted.
    """

    #: A busier worker still accepts once an association has waited this long for a less busy one.
    BALANCE_WAIT_S = 0.02

    def __init__(self, archive: Archive, executor: ThreadPoolExecutor | None = None,
                 board: LoadBoard | None = None, worker: int = 0, *,
                 upstream_holds: UpstreamHolds | None = None) -> None:
        self.archive = archive
        self.settings = settings = archive.settings
        self.board = board or LoadBoard(1, settings.max_associations)
        self.worker = worker if board is not None else 0
        self.executor = executor or ThreadPoolExecutor(max_workers=16, thread_name_prefix="bastion-dimse")
        self.services = Services(archive, self.executor, upstream_holds=upstream_holds)
        self.policy = AccessPolicy(settings)
        self.tls: ssl.SSLContext | None = server_context(settings) if settings.tls_port else None
        self.sock: socket.socket | None = None
        self.tls_sock: socket.socket | None = None
        self._accepting: list[asyncio.Task[None]] = []
        self.active = 0  # associations counted on the board
        self._refusing = 0  # connections being answered A-ASSOCIATE-RJ for a limit
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, sock: socket.socket | None = None, *,
                    tls_sock: socket.socket | None = None) -> socket.socket:
        """Listen on ``host:port``, or on an already-bound socket shared with other worker processes; with
        ``tls_port`` set, for DICOM TLS too, on ``host:tls_port`` or ``tls_sock`` (same services, same rules)."""
        if sock is None:
            sock = socket.create_server((host, port), backlog=256, reuse_port=False)
            sock.setblocking(False)
        if self.tls is not None and tls_sock is None:
            tls_sock = socket.create_server((host, self.settings.tls_port), backlog=256, reuse_port=False)
            tls_sock.setblocking(False)
        await asyncio.get_running_loop().run_in_executor(self.executor, self.archive.blobs.prepare)
        self.board.register(self.worker)
        self.sock, self.tls_sock = sock, tls_sock if self.tls is not None else None
        loop = asyncio.get_running_loop()
        self._accepting = [loop.create_task(self._accept_loop(sock, None))]
        if self.tls is not None and tls_sock is not None:
            self._accepting.append(loop.create_task(self._accept_loop(tls_sock, self.tls)))
        return sock

    async def _accept_loop(self, sock: socket.socket, tls: ssl.SSLContext | None) -> None:
        """Accept associations one at a time; with a :class:`LoadBoard`, leave them to less busy workers.
        ``tls``: the listener's TLS context (DICOM TLS), whose handshake each connection's own task makes.

        Every worker wakes when a connection is pending. One that serves more associations than the least
        busy one gives that one :attr:`BALANCE_WAIT_S` to take it (checking every millisecond), then takes
        it itself (so a stalled worker cannot hold up new associations).

        A connection beyond the association limits is still read, to answer its A-ASSOCIATE-RQ with
        A-ASSOCIATE-RJ; while as many such connections are being refused as ``max_associations``, a further one
        is closed at once.
        """
        loop = asyncio.get_running_loop()
        settings = self.settings
        while True:
            await _readable(loop, sock)
            if self.active > self.board.least():
                deadline = time.monotonic() + self.BALANCE_WAIT_S
                while self.active > self.board.least() and time.monotonic() < deadline and _pending(sock):
                    await asyncio.sleep(0.001)
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                continue  # another worker took it
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            accepted_at = loop.time()
            conn.setblocking(False)
            peer = str(address[0]) if isinstance(address, tuple) else str(address)
            # counted at once: the next turn of this loop, and the other workers, must see it
            refused = self.board.admit(self.worker, peer, settings.max_associations,
                                       settings.max_associations_per_peer)
            if refused is None:
                self.active += 1
            elif self._refusing >= settings.max_associations:
                log.warning("closing connection from %s at once: %s, and %d connections over the limits are "
                            "being refused already", _where(address), refused, self._refusing)
                conn.close()
                continue
            else:
                self._refusing += 1
            if tls is None:  # at once: the connection's first bytes are the A-ASSOCIATE-RQ
                stream = await self._connect(conn, address, peer, refused, None)
                if stream is None:
                    continue
                task = loop.create_task(self.handle(stream, peer, accepted_at, refused))
            else:  # the TLS handshake in the connection's own task: a slow one holds up no other
                task = loop.create_task(self._handshake_then_handle(conn, address, peer, accepted_at, refused, tls))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket, address: object, peer: str, refused: str | None,
                       tls: ssl.SSLContext | None) -> PDUStream | None:
        """The accepted ``conn`` as a :class:`PDUStream`; over TLS once its handshake is done, within the ARTIM
        timeout (PS3.8 9.1.5, which the A-ASSOCIATE-RQ's own deadline then also counts from). None, logged in one
        line, audited and uncounted, when the connection or its handshake fails."""
        stream = PDUStream(limit=MAX_ASSOCIATE_RQ, reserve=MAX_ASSOCIATE_RQ, kinds=UNASSOCIATED_PDUS)
        loop = asyncio.get_running_loop()
        try:
            if tls is None:
                await loop.connect_accepted_socket(lambda: stream, conn)
            else:
                await loop.connect_accepted_socket(lambda: stream, conn, ssl=tls,
                                                   ssl_handshake_timeout=self.settings.dicom_artim_timeout)
        except OSError as exc:  # TimeoutError, ssl.SSLError and ConnectionError are OSErrors
            conn.close()
            self._uncount(peer, refused)
            if tls is not None:
                why = f"TLS handshake failed: {describe(exc)}"
                log.warning("closing TLS connection from %s: %s", _where(address), why)
                self.archive.audit.record(AuditEvent(
                    kind=AuditKind.ASSOCIATION, outcome=Outcome.MINOR_FAILURE, address=peer,
                    destination=self.settings.aet, via="dimse", detail=why))
            return None
        except asyncio.CancelledError:  # the server closes during the handshake
            conn.close()
            self._uncount(peer, refused)
            raise
        return stream

    async def _handshake_then_handle(self, conn: socket.socket, address: object, peer: str, accepted_at: float,
                                     refused: str | None, tls: ssl.SSLContext) -> None:
        stream = await self._connect(conn, address, peer, refused, tls)
        if stream is not None:
            await self.handle(stream, peer, accepted_at, refused)

    def _uncount(self, peer: str, refused: str | None) -> None:
        if refused is None:
            self.active -= 1
            self.board.release(self.worker, peer)
        else:
            self._refusing -= 1

    async def handle(self, stream: PDUStream, peer: str, accepted_at: float, refused: str | None = None) -> None:
        """Serve one connection from A-ASSOCIATE-RQ to release or abort; the accept loop counted it at
        ``accepted_at`` (the loop's clock), or found it over a limit, ``refused`` saying which."""
        assoc = Association(stream)
        session = Session(assoc, address=peer)
        established = False
        try:
            if refused is not None:
                await self._refuse(assoc, accepted_at, refused)
            elif await self._negotiate(session, accepted_at):
                established = True
                services = self.services

                def open_sink(msg: Message) -> DatasetSink:
                    return services.open_sink(session, msg)

                # P-DATA-TF is assembled as it is received; the messages come to _serve whole
                stream.deliver_pdata_to(lambda body: assoc.feed_pdata(body, open_sink))
                await self._serve(assoc, session)
        except AssociationClosed:
            log.info("association from %s (%s) closed by peer", assoc.calling_aet or "?", assoc.peername)
        except TimeoutError as exc:
            if established:
                log.warning("aborting association from %s (%s): %s", assoc.calling_aet or "?", assoc.peername, exc)
                await assoc.abort()
            else:  # ARTIM expired before the association: close the connection, nothing else (PS3.8 9.2, AA-2)
                log.warning("closing connection from %s: %s", assoc.peername, exc)
        except PDURefused as exc:
            if not established and exc.kind == A_ASSOCIATE_RQ:
                log.warning("rejecting association from %s: %s", assoc.peername, exc)
                with contextlib.suppress(AssociationClosed):
                    stream.write(encode_reject(REJECTED_PERMANENT, SOURCE_PROVIDER_PRESENTATION,
                                               REASON_LOCAL_LIMIT_EXCEEDED))
            elif exc.kind == A_ABORT:
                log.warning("closing connection from %s: %s", assoc.peername, exc)
            else:
                log.warning("aborting %s from %s (%s): %s", "association" if established else "connection",
                            assoc.calling_aet or "?", assoc.peername, exc)
                await assoc.abort()
        except PDUError as exc:
            log.warning("aborting association from %s (%s): %s", assoc.calling_aet or "?", assoc.peername, exc)
            await assoc.abort()
        except Exception:
            log.exception("association from %s failed", assoc.calling_aet or "?")
            await assoc.abort()
        finally:
            session.open = False
            self.services.abort_sink(assoc.pending_message())
            for msg in stream.queued_messages() + assoc.abandoned_messages():  # received whole, never served
                self.services.abort_sink(msg)
            for task in session.tasks.values():
                task.cancel()
            for fut in session.replies.values():
                fut.cancel()
            self.services.end_session(session)  # its C-STOREs, audited once per study
            self._uncount(peer, refused)
            assoc.close()

    async def _request(self, assoc: Association, accepted_at: float) -> AssociateRQ:
        """The A-ASSOCIATE-RQ, whole within the ARTIM timeout of the connection (PS3.8 9.1.5): a deadline
        however the bytes trickle in. Raises TimeoutError, or AssociationClosed for an A-ABORT instead."""
        artim = self.settings.dicom_artim_timeout
        try:
            async with asyncio.timeout_at(accepted_at + artim):
                kind, body = await assoc.read_pdu(None)
        except TimeoutError:
            raise TimeoutError(f"no whole A-ASSOCIATE-RQ within the ARTIM timeout ({artim:g} s)") from None
        if kind == A_ABORT:
            raise AssociationClosed("A-ABORT before the association")
        if kind != A_ASSOCIATE_RQ:
            raise PDUError(f"expected A-ASSOCIATE-RQ, got PDU 0x{kind:02x}")
        rq = decode_associate(body)
        assoc.calling_aet, assoc.called_aet = rq.calling_aet, rq.called_aet
        return rq

    async def _refuse(self, assoc: Association, accepted_at: float, why: str) -> None:
        """Answer the A-ASSOCIATE-RQ of a connection beyond an association limit with A-ASSOCIATE-RJ
        rejected-transient, service-provider (presentation), local-limit-exceeded (PS3.8 9.3.4), and close."""
        rq = await self._request(assoc, accepted_at)
        log.warning("rejecting association from %s (%s): %s", rq.calling_aet, assoc.peername, why)
        self._audit(assoc, Outcome.MINOR_FAILURE, f"rejected: {why}")
        await assoc.send_raw(encode_reject(REJECTED_TRANSIENT, SOURCE_PROVIDER_PRESENTATION,
                                           REASON_LOCAL_LIMIT_EXCEEDED))
        assoc.close()

    def _audit(self, assoc: Association, outcome: Outcome, detail: str) -> None:
        """Record an association accepted or rejected (PS3.15 A.5.3: the calling AE, its address, the called AE)."""
        transport = assoc.stream.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if transport is not None and transport.get_extra_info("ssl_object") is not None:
            subject = certificate_subject(transport.get_extra_info("peercert"))
            detail += f" (TLS, client certificate {subject!r})" if subject else " (TLS)"
        self.archive.audit.record(AuditEvent(
            kind=AuditKind.ASSOCIATION, outcome=outcome, user=assoc.calling_aet,
            address=str(peer[0]) if peer else "", destination=assoc.called_aet, via="dimse", detail=detail))

    async def _negotiate(self, session: Session, accepted_at: float) -> bool:
        """Answer the A-ASSOCIATE-RQ: A-ASSOCIATE-RJ when the access rules refuse the calling or called AE title
        (:mod:`bastion.dimse.access`, PS3.8 9.3.4) or no presentation context is acceptable, else A-ASSOCIATE-AC
        with the services granted kept on ``session``. Whether the association is established."""
        assoc = session.assoc
        rq = await self._request(assoc, accepted_at)
        transport = assoc.stream.transport
        subject = certificate_subject(transport.get_extra_info("peercert")) if transport is not None else ""
        decision = await self.policy.admit(rq.calling_aet, rq.called_aet, session.address, subject)
        if isinstance(decision, Rejection):
            log.warning("rejecting association from %s (%s) to %s: %s", rq.calling_aet, assoc.peername,
                        rq.called_aet, decision.detail)
            self._audit(assoc, Outcome.MINOR_FAILURE, f"rejected: {decision.detail}")
            await assoc.send_raw(encode_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, decision.reason))
            assoc.close()
            return False
        session.grant = decision
        answered, roles, accepted = negotiate(rq, self.archive.settings.storage_deny)
        if not accepted:
            log.warning("rejecting association from %s (%s): no presentation context acceptable",
                        rq.calling_aet, assoc.peername)
            self._audit(assoc, Outcome.MINOR_FAILURE, "rejected: no presentation context acceptable")
            await assoc.send_raw(encode_reject(1, 1, 1))
            assoc.close()
            return False
        assoc.peer_max_pdu = rq.max_pdu
        assoc.contexts = accepted
        advertised = self.settings.max_pdu  # 0: no limit (PS3.8 D.1)
        limit = min(PDU_TOLERANCE * advertised, MAX_INCOMING_PDU) if advertised > 0 else MAX_INCOMING_PDU
        assoc.stream.set_limits(limit, advertised or RESERVE, ASSOCIATED_PDUS)  # no maximum: allocate as bytes come
        ac = AssociateRQ(rq.called_aet, rq.calling_aet, answered, advertised,
                         IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, roles,
                         async_ops=(1, 1) if rq.async_ops else None)
        await assoc.send_raw(encode_associate(ac, ac=True))
        log.info("association from %s (%s) to %s: %d of %d contexts accepted", rq.calling_aet, assoc.peername,
                 rq.called_aet, len(accepted), len(rq.contexts))
        self._audit(assoc, Outcome.SUCCESS, f"accepted: {', '.join(sorted(decision.services))}"
                    + (f" (peer {decision.peer})" if decision.peer else ""))
        return True

    async def _serve(self, assoc: Association, session: Session) -> None:
        """Serve the messages of an established association until it is released or aborted.

        Idle means no byte received for ``dicom_idle_timeout`` while none of the peer's requests is in
        progress (:attr:`Session.tasks`: a C-FIND streaming results, C-MOVE / C-GET sub-operations; and
        :attr:`Session.results_pending`, Storage Commitment results being worked out); the time counts from the
        end of the last one. A peer that reads nothing we send for that long fails the send.
        """
        services = self.services
        stream = assoc.stream
        idle = self.settings.dicom_idle_timeout
        stream.working = lambda: bool(session.tasks) or session.results_pending > 0
        stream.send_timeout = idle
        watched: set[asyncio.Task[None]] = set()

        def done(task: asyncio.Task[None]) -> None:
            watched.discard(task)
            stream.note_activity()

        while True:
            kind, body = await assoc.read_pdu(idle)
            if kind == MESSAGE:
                await services.dispatch(session, body)
                for task in session.tasks.values():
                    if task not in watched:
                        watched.add(task)
                        task.add_done_callback(done)
            elif kind == A_RELEASE_RQ:
                session.open = False  # nothing more of ours goes on it (a Storage Commitment result: a new one)
                if session.tasks:
                    await asyncio.gather(*session.tasks.values(), return_exceptions=True)
                await assoc.send_raw(encode_release(rp=True))
                assoc.close()
                return
            elif kind == A_ABORT:
                log.info("association from %s aborted by peer", assoc.calling_aet)
                return
            else:
                raise PDUError(f"unexpected PDU 0x{kind:02x} during association")

    async def close(self, grace: float = 10.0) -> None:
        """Stop accepting associations and give those in progress, then the Storage Commitment results still being
        delivered, ``grace`` seconds each to finish."""
        for accepting in self._accepting:
            accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await accepting
        if self._tasks:
            log.info("waiting up to %.0f s for %d association(s) to finish", grace, len(self._tasks))
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:  # their clean-up (sinks aborted, counts released) runs now, while the archive is open
                await asyncio.wait(pending)
        await self.services.commitment.close(grace)
