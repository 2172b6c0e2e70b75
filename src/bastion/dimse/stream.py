"""The socket of one DICOM association: whole PDUs in, flow-controlled bytes out (:class:`PDUStream`).

PS3.8 9.3.1 (the PDU header). Used by :class:`bastion.dimse.association.Association` (the acceptor's,
:mod:`bastion.dimse.server`, and the requestor's, :mod:`bastion.dimse.scu`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import socket
import struct
import termios
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bastion.dimse.pdu import P_DATA_TF, PDURefused

if TYPE_CHECKING:
    from bastion.dimse.association import Message

#: Largest PDU a stream accepts unless told otherwise (:meth:`PDUStream.set_limits`).
MAX_INCOMING_PDU = 64 * 1024 * 1024
#: The most a stream allocates up front for one PDU unless told otherwise: the rest of a longer PDU's
#: buffer grows as its bytes arrive, so a claimed length costs nothing until it is sent.
RESERVE = 1024 * 1024
READ_CHUNK = 1024 * 1024
#: The receive buffer each association starts with: PDUs that fit (with their header) are received into it,
#: several per receive.
RECV_BUFFER = 64 * 1024
#: What a connection's receive buffers may hold before its association is accepted: the longest
#: A-ASSOCIATE-RQ accepted (:data:`MAX_ASSOCIATE_RQ`) fits beside the receive buffer within it.
UNASSOCIATED_MEMORY = 1024 * 1024
#: The longest A-ASSOCIATE-RQ (PDU length, PS3.8 9.3.2) an acceptor reads; a longer one is refused from its header.
MAX_ASSOCIATE_RQ = UNASSOCIATED_MEMORY - RECV_BUFFER - 6
#: A PDU up to this size that does not fit grows the buffer to four such PDUs (DCMTK sends 128 KB ones:
#: ten receives and five 128 KB allocations per 512 KB CT instance in a 64 KB buffer, three receives in a
#: 512 KB one); a larger PDU is received straight into a buffer of its own.
SHARED_PDU_MAX = 256 * 1024
#: The kind :meth:`PDUStream.read_pdu` gives a complete DIMSE message (see :meth:`PDUStream.deliver_pdata_to`).
MESSAGE = -1
_PDU_HEADER = struct.Struct(">BxI")


class AssociationClosed(Exception):
    """The peer released, aborted or dropped the connection."""


class PDUStream(asyncio.BufferedProtocol):
    """The socket of one association, delivering whole PDUs (PS3.8 9.3.1).

    Bytes are received into one buffer, and every complete PDU in it is handed over at once: a C-STORE's
    command and dataset PDUs often arrive in one receive. The buffer grows for PDUs up to
    :data:`SHARED_PDU_MAX`; a larger PDU is received straight into a buffer of its own, without a further copy.
    Reading pauses while unread PDUs pile up; writing honours the transport's flow control.

    Memory follows the bytes received, not the lengths claimed (PS3.8 9.3.1): a PDU whose type is not in
    ``kinds`` or whose length exceeds ``limit`` is refused from its 6-byte header (:class:`PDURefused`, raised
    to the reader; reading stops), and a PDU's own buffer starts at no more than ``reserve`` bytes and grows
    as its bytes arrive.

    Once the association is established, :meth:`deliver_pdata_to` hands each P-DATA-TF body to the
    association's message assembly as it arrives, still in the receive buffer (no copy, no wake-up of the
    reading task per PDU), and the reader gets whole messages.
    """

    def __init__(self, on_connect: Callable[[PDUStream], None] | None = None, *, limit: int = MAX_INCOMING_PDU,
                 reserve: int = RESERVE, kinds: frozenset[int] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self._on_connect = on_connect
        self._limit, self._reserve, self._kinds = limit, max(reserve, RECV_BUFFER), kinds
        self._length = 0  # the claimed length of the PDU in _body
        #: While this returns True the association is not idle, whatever it receives (see :meth:`read_pdu`).
        self.working: Callable[[], bool] | None = None
        #: A wait for the peer to read what we send fails after this many seconds without progress.
        self.send_timeout: float | None = None
        self._active_at = 0.0  # time.monotonic() when the server last reported work done (note_activity)
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0  # the first byte in _buf not yet handed over
        self._end = 0  # the end of what has been received into _buf
        self._body: bytearray | None = None  # a large PDU being received into its own buffer
        self._kind = 0
        self._pos = 0
        self._ready: collections.deque[tuple[int, Any]] = collections.deque()
        self._messages = 0  # of the items in _ready, complete messages
        self._on_pdata: Callable[[bytes | bytearray | memoryview], list[Message]] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timeout: float | None = None
        self._waiting_since = 0.0
        self._received_at = 0.0  # time.monotonic() of the last receive (the loop's clock)
        self._drain_waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._error: Exception | None = None
        self._read_paused = False
        self._write_paused = False

    # -- asyncio.BufferedProtocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=4 * READ_CHUNK)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a delayed ACK: 40 ms per message
        if self._on_connect is not None:
            self._on_connect(self)

    def set_limits(self, limit: int, reserve: int, kinds: frozenset[int] | None) -> None:
        """Accept PDUs of ``kinds`` (None: any) up to ``limit`` bytes long, allocating no more than ``reserve``
        bytes for one before its bytes arrive. Applies from the next PDU header received."""
        self._limit, self._reserve, self._kinds = limit, max(reserve, RECV_BUFFER), kinds

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._body is not None:
            if self._pos == len(self._body):  # received as far as allocated: grow towards the claimed length
                grown = bytearray(min(self._length, 2 * len(self._body)))
                grown[: self._pos] = self._body
                self._body = grown
            return memoryview(self._body)[self._pos:]
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        self._received_at = time.monotonic()
        try:
            if self._body is not None:
                self._pos += nbytes
                if self._pos == self._length:
                    body, self._body = self._body, None
                    self._deliver(self._kind, body)
                return
            self._end += nbytes
            self._split()
        except Exception as exc:  # the message assembly's: it ends the association, as its reader learns
            self._fail(exc)

    def _split(self) -> None:
        """Hand over every complete PDU in the buffer; keep the incomplete one where the rest of it fits."""
        buf, view, start, end = self._buf, self._view, self._start, self._end
        need = 6
        while end - start >= 6:
            kind, length = _PDU_HEADER.unpack_from(buf, start)
            if self._kinds is not None and kind not in self._kinds:
                self._fail(PDURefused(kind, length, "not expected in this state of the association"))
                return
            if length > self._limit:
                self._fail(PDURefused(kind, length, f"longer than the {self._limit} bytes accepted"))
                return
            need = 6 + length
            if start + need <= end:
                if kind == P_DATA_TF and self._on_pdata is not None:
                    self._take(self._on_pdata(view[start + 6: start + need]))  # used before the next receive
                else:
                    self._deliver(kind, buf[start + 6: start + need])
                start += need
                need = 6
                continue
            if need > len(buf) and length > SHARED_PDU_MAX:  # the rest goes straight into its own buffer
                got = end - start - 6
                body = bytearray(max(got, min(length, self._reserve)))  # grows as the rest arrives
                body[:got] = view[start + 6: end]
                self._body, self._length, self._kind, self._pos = body, length, kind, got
                start = end = 0
            elif need > len(buf):  # a new buffer (a reader may still hold a view of the old one)
                grown = bytearray(max(need, min(4 * need, self._limit + 6)))
                grown[: end - start] = view[start:end]
                self._buf, self._view = buf, view = grown, memoryview(grown)
                start, end = 0, end - start
            break
        if start == end:
            start = end = 0
        elif start + need > len(buf):  # move the incomplete PDU to the front, where all of it fits
            buf[: end - start] = view[start:end].tobytes()  # a copy: the two ranges may overlap
            start, end = 0, end - start
        self._start, self._end = start, end

    def _deliver(self, kind: int, body: bytearray) -> None:
        if kind == P_DATA_TF and self._on_pdata is not None:
            self._take(self._on_pdata(body))
            return
        self._ready.append((kind, body))
        self._queued()

    def _take(self, messages: list[Message]) -> None:
        """Queue the messages a P-DATA-TF body completed."""
        for msg in messages:
            self._ready.append((MESSAGE, msg))
            self._messages += 1
        if messages:
            self._queued()

    def _queued(self) -> None:
        self._wake()
        # Two complete messages (a peer that does not wait for answers) or many PDUs: stop reading until the
        # reader catches up.
        if (self._messages >= 2 or len(self._ready) >= 16) and not self._read_paused and self.transport is not None:
            self.transport.pause_reading()
            self._read_paused = True

    def deliver_pdata_to(self, assemble: Callable[[bytes | bytearray | memoryview], list[Message]]) -> None:
        """From now on, give each P-DATA-TF body to ``assemble`` as it arrives, and the reader the messages it
        returns (kind :data:`MESSAGE`). ``assemble`` must not keep the body: it may be a view of the receive
        buffer. An exception it raises ends the stream: the reader gets it once the items before are read.
        P-DATA-TF PDUs already queued go to it now, in order."""
        self._on_pdata = assemble
        queued, self._ready, self._messages = self._ready, collections.deque(), 0
        for kind, body in queued:
            if kind == P_DATA_TF:
                self._take(assemble(body))
            else:
                self._ready.append((kind, body))

    def queued_messages(self) -> list[Message]:
        """Remove and return the complete messages nobody read (their datasets' sinks are the caller's)."""
        messages = [body for kind, body in self._ready if kind == MESSAGE]
        self._ready = collections.deque((kind, body) for kind, body in self._ready if kind != MESSAGE)
        self._messages = 0
        return messages

    def _fail(self, error: Exception) -> None:
        self._error = error
        self._wake()
        if self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._wake()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(AssociationClosed("connection lost"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._active_at = time.monotonic()  # the peer reads what we send
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- used by Association ----------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read_pdu(self, timeout: float | None) -> tuple[int, Any]:
        """The next PDU (kind, body), or a complete message (:data:`MESSAGE`, :class:`Message`) once P-DATA-TF
        goes to :meth:`deliver_pdata_to`'s ``assemble``; raises AssociationClosed, PDUError or TimeoutError.

        The timeout is an idle timeout: it counts from the start of the wait, the last byte received or the
        last :meth:`note_activity`, whichever is latest, and never runs out while :attr:`working` returns True
        (the server still answers a request of the peer's).
        """
        while not self._ready:
            if self._error is not None:
                raise self._error
            if self._closed:
                raise AssociationClosed("connection closed by peer")
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            if timeout is not None:
                self._arm(loop, timeout)
            else:
                self._timeout = None  # a timer armed by an earlier wait must leave this one alone
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._ready.popleft()
        if item[0] == MESSAGE:
            self._messages -= 1
        if (self._read_paused and self._messages < 2 and len(self._ready) < 4 and self.transport is not None
                and self._error is None):  # after a refused PDU, reading stops for good (_split stopped mid-buffer)
            self.transport.resume_reading()
            self._read_paused = False
        return item

    def _arm(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """Time out the current wait after ``timeout`` s.

        One timer per association, not one per PDU (``asyncio.wait_for`` made two futures and a timer for
        every PDU): a timer that fires while data keeps arriving finds a newer wait and re-arms itself for
        what remains of that one.
        """
        self._timeout = timeout
        self._waiting_since = now = loop.time()
        if self._timer is not None and self._timer.when() > now + timeout:
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer = loop.call_at(now + timeout, self._check_idle)

    def _check_idle(self) -> None:
        self._timer = None
        waiter, timeout = self._waiter, self._timeout
        if waiter is None or waiter.done() or timeout is None:
            return  # not waiting: the next wait arms it again
        loop = waiter.get_loop()
        if self.working is not None and self.working():
            self._active_at = loop.time()
        # from the last byte received: a dataset still arriving keeps its association alive
        remaining = max(self._waiting_since, self._received_at, self._active_at) + timeout - loop.time()
        if remaining > 0.001:
            self._timer = loop.call_later(remaining, self._check_idle)
        else:
            waiter.set_exception(TimeoutError(f"nothing received for {timeout:.0f} s"))

    def note_activity(self) -> None:
        """Count the association as active now: an idle timeout counts from here (see :meth:`read_pdu`)."""
        self._active_at = time.monotonic()

    @property
    def write_blocked(self) -> bool:
        """Whether what we send waits for the peer to read (the transport's buffer is above its high-water mark)."""
        return self._write_paused

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.transport is None or self.transport.is_closing():
            raise AssociationClosed("connection closed")
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark; raises TimeoutError when the
        peer reads nothing for :attr:`send_timeout` s."""
        if self._closed:
            raise AssociationClosed("connection closed")
        if self._write_paused:
            self._drain_waiter = waiter = asyncio.get_running_loop().create_future()
            if self.send_timeout is None:
                await waiter
                return
            # The transport resumes only once its buffer is down to the low-water mark: a peer that reads, however
            # slowly, lessens what is left to send meanwhile, and is waited for.
            left = self._unsent()
            while True:
                try:
                    await asyncio.wait_for(asyncio.shield(waiter), self.send_timeout)
                    return
                except TimeoutError:
                    now_left = self._unsent()
                    if now_left >= left:
                        waiter.cancel()
                        raise TimeoutError(f"the peer read nothing we sent for {self.send_timeout:.0f} s") from None
                    left = now_left

    def _unsent(self) -> int:
        """The bytes written and not yet taken by the peer: the transport's buffer and, where the system tells
        (Linux: ``TIOCOUTQ``), the socket's send queue, which the kernel refills only in large steps."""
        if self.transport is None:
            return 0
        unsent = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None and hasattr(termios, "TIOCOUTQ"):
            with contextlib.suppress(OSError):
                unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        return unsent

    def close(self, hard: bool = False) -> None:
        """Close the connection once what was written is sent; ``hard``: at once, dropping it."""
        if self.transport is not None:
            if hard:
                self.transport.abort()
            else:
                self.transport.close()
