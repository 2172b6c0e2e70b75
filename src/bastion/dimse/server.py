"""The DICOM listener: accepts associations and runs the services on one asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from bastion import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from bastion.archive import Archive
from bastion.dimse.association import MESSAGE, Association, AssociationClosed, DatasetSink, Message, PDUStream
from bastion.dimse.negotiation import negotiate
from bastion.dimse.pdu import (
    A_ABORT,
    A_ASSOCIATE_RQ,
    A_RELEASE_RQ,
    AssociateRQ,
    PDUError,
    decode_associate,
    encode_associate,
    encode_reject,
    encode_release,
)
from bastion.dimse.services import Services, Session

log = logging.getLogger("bastion.dimse")

ARTIM_TIMEOUT = 30.0  # waiting for A-ASSOCIATE-RQ (PS3.8 9.1.5)
IDLE_TIMEOUT = 600.0  # an association silent this long is aborted


class LoadBoard:
    """How many associations each worker process serves, in memory shared by all of them (made before fork).

    The workers wait on one listening socket, and whichever wakes first would take the next association:
    with four senders and two workers, three associations often landed on one worker, which then ran them on
    one core under one GIL. A worker serving more associations than the least busy one leaves the next one
    to it (:meth:`DicomServer._accept_loop`). Each worker writes only its own slots: its association count and,
    once it listens, its process id; a worker that is not listening, or whose process is gone, does not count.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._map = mmap.mmap(-1, max(8 * workers, mmap.PAGESIZE))  # anonymous and shared across fork
        self._slots = memoryview(self._map).cast("i")  # counts, then process ids

    def register(self, worker: int) -> None:
        """Mark ``worker`` as listening, in this process (a replacement for a worker that died starts from 0)."""
        self._slots[worker] = 0
        self._slots[self.workers + worker] = os.getpid()

    def set(self, worker: int, active: int) -> None:
        """Publish how many associations ``worker`` serves."""
        self._slots[worker] = active

    def least(self) -> int:
        """The fewest associations any listening worker serves (one that died or never started does not count)."""
        counts = [self._slots[w] for w in range(self.workers) if _alive(self._slots[self.workers + w])]
        return min(counts) if counts else 0

    def total(self) -> int:
        """How many associations all workers serve (a worker that died may still count its last ones)."""
        return sum(self._slots[w] for w in range(self.workers))

    def counts(self) -> list[int]:
        """How many associations each worker serves (0 for one that is not listening or is gone)."""
        pids = self.pids()
        return [self._slots[w] if pids[w] else 0 for w in range(self.workers)]

    def pids(self) -> list[int]:
        """The process id of each listening worker; 0 for one that is not listening or is gone."""
        return [pid if _alive(pid := self._slots[self.workers + w]) else 0 for w in range(self.workers)]


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    """

    #: A busier worker still accepts once an association has waited this long for a less busy one.
    BALANCE_WAIT_S = 0.02

    def __init__(self, archive: Archive, executor: ThreadPoolExecutor | None = None,
                 board: LoadBoard | None = None, worker: int = 0) -> None:
        self.archive = archive
        self.board = board
        self.worker = worker
        self.executor = executor or ThreadPoolExecutor(max_workers=16, thread_name_prefix="bastion-dimse")
        self.services = Services(archive, self.executor)
        self.services.busy = self._busy
        self.sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self.active = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> socket.socket:
        """Listen on ``host:port``, or on an already-bound socket shared with other worker processes."""
        if sock is None:
            sock = socket.create_server((host, port), backlog=256, reuse_port=False)
            sock.setblocking(False)
        await asyncio.get_running_loop().run_in_executor(self.executor, self.archive.blobs.prepare)
        if self.board is not None:
            self.board.register(self.worker)
        self.sock = sock
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop(sock))
        return sock

    async def _accept_loop(self, sock: socket.socket) -> None:
        """Accept associations one at a time; with a :class:`LoadBoard`, leave them to less busy workers.

        Every worker wakes when a connection is pending. One that serves more associations than the least
        busy one gives that one :attr:`BALANCE_WAIT_S` to take it (checking every millisecond), then takes
        it itself (so a stalled worker cannot hold up new associations).
        """
        loop = asyncio.get_running_loop()
        while True:
            await _readable(loop, sock)
            if self.board is not None and self.active > self.board.least():
                deadline = time.monotonic() + self.BALANCE_WAIT_S
                while self.active > self.board.least() and time.monotonic() < deadline and _pending(sock):
                    await asyncio.sleep(0.001)
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                continue  # another worker took it
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            self._count(+1)  # at once: the next turn of this loop must see it
            stream = PDUStream()
            try:
                await loop.connect_accepted_socket(lambda s=stream: s, conn)  # type: ignore[misc]
            except OSError:
                conn.close()
                self._count(-1)
                continue
            task = loop.create_task(self.handle(stream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _busy(self) -> bool:
        """Whether more than one association is being served, by this process or with the others'."""
        return self.active > 1 or (self.board is not None and self.board.total() > 1)

    def _count(self, change: int) -> None:
        self.active += change
        if self.board is not None:
            self.board.set(self.worker, self.active)

    async def handle(self, stream: PDUStream) -> None:
        """Serve one association from A-ASSOCIATE-RQ to release or abort (the accept loop counted it)."""
        assoc = Association(stream)
        session = Session(assoc)
        try:
            if await self._negotiate(assoc):
                services = self.services

                def open_sink(msg: Message) -> DatasetSink:
                    return services.open_sink(session, msg)

                # P-DATA-TF is assembled as it is received; the messages come to _serve whole
                stream.deliver_pdata_to(lambda body: assoc.feed_pdata(body, open_sink))
                await self._serve(assoc, session)
        except AssociationClosed:
            log.info("association from %s (%s) closed by peer", assoc.calling_aet or "?", assoc.peername)
        except (TimeoutError, PDUError) as exc:
            log.warning("aborting association from %s (%s): %s", assoc.calling_aet or "?", assoc.peername, exc)
            await assoc.abort()
        except Exception:
            log.exception("association from %s failed", assoc.calling_aet or "?")
            await assoc.abort()
        finally:
            self.services.abort_sink(assoc.pending_message())
            for msg in stream.queued_messages():  # received whole, never served
                self.services.abort_sink(msg)
            for task in session.tasks.values():
                task.cancel()
            for fut in session.store_replies.values():
                fut.cancel()
            self._count(-1)
            assoc.close()

    async def _negotiate(self, assoc: Association) -> bool:
        kind, body = await assoc.read_pdu(ARTIM_TIMEOUT)
        if kind != A_ASSOCIATE_RQ:
            raise PDUError(f"expected A-ASSOCIATE-RQ, got PDU 0x{kind:02x}")
        rq = decode_associate(body)
        assoc.calling_aet, assoc.called_aet = rq.calling_aet, rq.called_aet
        answered, roles, accepted = negotiate(rq, self.archive.settings.storage_deny)
        if not accepted:
            log.warning("rejecting association from %s (%s): no presentation context acceptable",
                        rq.calling_aet, assoc.peername)
            await assoc.send_raw(encode_reject(1, 1, 1))
            assoc.close()
            return False
        assoc.peer_max_pdu = rq.max_pdu
        assoc.contexts = accepted
        ac = AssociateRQ(rq.called_aet, rq.calling_aet, answered, self.archive.settings.max_pdu,
                         IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, roles,
                         async_ops=(1, 1) if rq.async_ops else None)
        await assoc.send_raw(encode_associate(ac, ac=True))
        log.info("association from %s (%s) to %s: %d of %d contexts accepted", rq.calling_aet, assoc.peername,
                 rq.called_aet, len(accepted), len(rq.contexts))
        return True

    async def _serve(self, assoc: Association, session: Session) -> None:
        services = self.services
        while True:
            kind, body = await assoc.read_pdu(IDLE_TIMEOUT)
            if kind == MESSAGE:
                await services.dispatch(session, body)
            elif kind == A_RELEASE_RQ:
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
        """Stop accepting associations and give those in progress ``grace`` seconds to finish."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._tasks:
            log.info("waiting up to %.0f s for %d association(s) to finish", grace, len(self._tasks))
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
