"""PDUStream over a real socket pair: whole PDUs however the bytes arrive, and the per-wait timeout."""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import pytest

from bastion.dimse.pdu import PDUError, PDURefused
from bastion.dimse.stream import MESSAGE, RECV_BUFFER, SHARED_PDU_MAX, PDUStream


def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BxI", kind, len(body)) + body


def _run(scenario: Callable[[PDUStream, socket.socket], Awaitable[None]]) -> None:
    """Run ``scenario(stream, peer)`` on a fresh event loop over a socket pair; both ends are closed after."""
    async def main() -> None:
        ours, peer = socket.socketpair()
        ours.setblocking(False)
        stream = PDUStream()
        await asyncio.get_running_loop().connect_accepted_socket(lambda: stream, ours)
        peer.setblocking(True)
        try:
            await scenario(stream, peer)
        finally:
            peer.close()
            stream.close()

    asyncio.run(main())


def _bodies() -> list[tuple[int, bytes]]:
    return [(4, os.urandom(n)) for n in (0, 1, 5, 6, 100, RECV_BUFFER - 7, RECV_BUFFER - 6, RECV_BUFFER - 5,
                                         3 * RECV_BUFFER + 11, 2000)] + [(5, b"\0" * 4)]


async def _send_cut_and_read(stream: PDUStream, peer: socket.socket, wire: bytes, chunk: int,
                             count: int) -> list[tuple[int, object]]:
    """Send ``wire`` in pieces of ``chunk`` bytes from another thread; read ``count`` items meanwhile."""
    def send() -> None:
        for off in range(0, len(wire), chunk):
            peer.sendall(wire[off: off + chunk])

    sending = asyncio.get_running_loop().run_in_executor(None, send)
    got = [await stream.read_pdu(10) for _ in range(count)]
    await sending
    return got


@pytest.mark.parametrize("chunk", [5, 4096, 65536, 10 ** 7])
def test_pdus_arrive_whole_and_in_order_however_the_bytes_are_cut(chunk: int) -> None:
    async def scenario(stream: PDUStream, peer: socket.socket) -> None:
        expected = _bodies()
        wire = b"".join(_pdu(kind, body) for kind, body in expected)
        got = await _send_cut_and_read(stream, peer, wire, chunk, len(expected))
        assert [(k, bytes(b)) for k, b in got] == expected  # type: ignore[arg-type]

    _run(scenario)


def test_a_silent_peer_times_out_after_the_wait_s_own_timeout() -> None:
    async def scenario(stream: PDUStream, peer: socket.socket) -> None:
        peer.sendall(_pdu(4, b"x" * 10))
        assert (await stream.read_pdu(600))[0] == 4  # arms a long timer
        # A shorter timeout is not held up by the longer timer: the stream's own TimeoutError comes, not the
        # guard's (which would only come after a minute).
        with pytest.raises(TimeoutError, match="nothing received"):
            await asyncio.wait_for(stream.read_pdu(0.3), timeout=60)

    _run(scenario)


def test_a_peer_that_keeps_sending_does_not_time_out() -> None:
    async def scenario(stream: PDUStream, peer: socket.socket) -> None:
        loop = asyncio.get_running_loop()

        def trickle() -> None:
            for _ in range(8):
                time.sleep(0.1)
                peer.sendall(_pdu(4, b"y"))

        sending = loop.run_in_executor(None, trickle)
        for _ in range(8):  # 0.8 s in all, but never 0.3 s without a PDU
            assert await stream.read_pdu(0.3) == (4, bytearray(b"y"))
        await sending
        with pytest.raises(TimeoutError):
            await stream.read_pdu(0.3)

    _run(scenario)


def test_an_oversized_pdu_is_an_error_not_an_allocation() -> None:
    async def scenario(stream: PDUStream, peer: socket.socket) -> None:
        peer.sendall(struct.pack(">BxI", 4, 0xFFFFFFF0))
        with pytest.raises(PDUError):
            await stream.read_pdu(5)

    _run(scenario)


def test_a_wait_without_timeout_is_not_ended_by_an_earlier_wait_s_timer() -> None:
    async def scenario(stream: PDUStream, peer: socket.socket) -> None:
        peer.sendall(_pdu(4, b"a"))
        assert (await stream.read_pdu(0.2))[0] == 4  # arms a timer for 0.2 s
        loop = asyncio.get_running_loop()
        loop.call_later(0.6, peer.sendall, _pdu(4, b"b"))
        assert await stream.read_pdu(None) == (4, bytearray(b"b"))  # waits 0.6 s, past the old timer

    _run(scenario)


def _assemble(body: bytes | bytearray | memoryview) -> list[bytes]:
    """A stand-in for the association's message assembly: each body becomes one 'message', its bytes copied at
    once (as the real one copies them into its sinks); ``b"boom"`` is a protocol error."""
    data = bytes(body)
    if data == b"boom":
        raise PDUError("bad PDV")
    return [data]


@pytest.mark.parametrize("chunk", [5, 4096, 65536, 10 ** 7])
def test_p_data_goes_to_the_assembly_as_it_arrives_and_the_reader_gets_its_messages(chunk: int) -> None:
    """P-DATA-TF bodies of every size around the buffer's, and past the size that grows it, arrive whole and in
    order among other PDUs; the assembly's messages come to the reader, the other PDUs as they were."""
    async def scenario(stream: PDUStream, peer: socket.socket) -> None:
        sizes = (1, 100, RECV_BUFFER - 7, RECV_BUFFER - 6, RECV_BUFFER - 5, 131066, 131066, 131066, 960,
                 SHARED_PDU_MAX, SHARED_PDU_MAX + 1, 3 * RECV_BUFFER + 11, 2000)
        pdus = [(4, os.urandom(n)) for n in sizes] + [(5, b"\0" * 4)]
        wire = b"".join(_pdu(kind, body) for kind, body in pdus)
        stream.deliver_pdata_to(_assemble)  # type: ignore[arg-type]
        got = await _send_cut_and_read(stream, peer, wire, chunk, len(pdus))
        assert got == [(MESSAGE, body) for _, body in pdus[:-1]] + [(5, bytearray(b"\0" * 4))]

    _run(scenario)


def test_p_data_queued_before_the_assembly_is_set_goes_to_it_first_in_order() -> None:
    async def scenario(stream: PDUStream, peer: socket.socket) -> None:
        peer.sendall(_pdu(1, b"rq") + _pdu(4, b"first") + _pdu(4, b"second"))
        assert await stream.read_pdu(5) == (1, bytearray(b"rq"))
        while len(stream._ready) < 2:  # both P-DATA PDUs received, not read
            await asyncio.sleep(0.01)
        stream.deliver_pdata_to(_assemble)  # type: ignore[arg-type]
        peer.sendall(_pdu(4, b"third"))
        assert [await stream.read_pdu(5) for _ in range(3)] == [(MESSAGE, b"first"), (MESSAGE, b"second"),
                                                                 (MESSAGE, b"third")]

    _run(scenario)


def test_an_assembly_error_reaches_the_reader_after_the_messages_before_it() -> None:
    async def scenario(stream: PDUStream, peer: socket.socket) -> None:
        stream.deliver_pdata_to(_assemble)  # type: ignore[arg-type]
        peer.sendall(_pdu(4, b"ok") + _pdu(4, b"boom") + _pdu(4, b"never"))
        assert await stream.read_pdu(5) == (MESSAGE, b"ok")
        with pytest.raises(PDUError, match="bad PDV"):
            await stream.read_pdu(5)

    _run(scenario)


def test_reading_pauses_while_messages_wait_and_unread_ones_can_be_taken_back() -> None:
    async def scenario(stream: PDUStream, peer: socket.socket) -> None:
        stream.deliver_pdata_to(_assemble)  # type: ignore[arg-type]
        peer.sendall(_pdu(4, b"m0") + _pdu(4, b"m1"))  # one receive
        while len(stream._ready) < 2:
            await asyncio.sleep(0.01)
        peer.sendall(_pdu(4, b"m2"))
        await asyncio.sleep(0.2)
        assert len(stream._ready) == 2  # paused: m2 waits in the socket
        assert await stream.read_pdu(5) == (MESSAGE, b"m0")  # one left: reading resumes
        assert await stream.read_pdu(5) == (MESSAGE, b"m1")
        peer.sendall(_pdu(4, b"m3"))
        while len(stream._ready) < 2:
            await asyncio.sleep(0.01)
        assert stream.queued_messages() == [b"m2", b"m3"]
        assert stream._ready == collections.deque()

    _run(scenario)


def test_a_dataset_still_arriving_keeps_the_wait_for_its_message_alive() -> None:
    """The idle timeout counts from the last byte received, not from the start of the wait: a message whose
    PDUs take longer than the timeout to arrive, but never pause that long, is not cut off."""
    async def scenario(stream: PDUStream, peer: socket.socket) -> None:
        stream.deliver_pdata_to(lambda body: [bytes(body)] if bytes(body).endswith(b"!") else [])  # type: ignore
        loop = asyncio.get_running_loop()

        def trickle() -> None:
            for _ in range(8):
                time.sleep(0.1)
                peer.sendall(_pdu(4, b"part"))
            peer.sendall(_pdu(4, b"end!"))

        sending = loop.run_in_executor(None, trickle)
        assert await stream.read_pdu(0.3) == (MESSAGE, b"end!")  # 0.8 s of PDUs, never 0.3 s without one
        await sending

    _run(scenario)


def test_a_pdu_of_a_kind_not_accepted_is_refused_from_its_header() -> None:
    async def scenario(stream: PDUStream, peer: socket.socket) -> None:
        stream.set_limits(1024, 1024, frozenset({1, 7}))
        peer.sendall(struct.pack(">BxI", 4, 10) + b"abc")
        with pytest.raises(PDURefused) as refused:
            await stream.read_pdu(5)
        assert (refused.value.kind, refused.value.length) == (4, 10)

    _run(scenario)


def test_a_pdu_longer_than_the_limit_is_refused_and_one_within_it_arrives_whole() -> None:
    async def scenario(stream: PDUStream, peer: socket.socket) -> None:
        stream.set_limits(RECV_BUFFER * 2, RECV_BUFFER, None)
        body = os.urandom(RECV_BUFFER * 2)
        peer.sendall(_pdu(1, body))
        assert await stream.read_pdu(5) == (1, bytearray(body))
        peer.sendall(struct.pack(">BxI", 1, RECV_BUFFER * 2 + 1))
        with pytest.raises(PDURefused):
            await stream.read_pdu(5)

    _run(scenario)


def test_a_claimed_length_is_allocated_only_as_its_bytes_arrive() -> None:
    """A PDU longer than the stream's reserve gets a buffer of the reserve at first, grown as the rest of it
    arrives; it is delivered whole, of its exact length."""
    async def scenario(stream: PDUStream, peer: socket.socket) -> None:
        reserve = SHARED_PDU_MAX + 1
        stream.set_limits(64 * 1024 * 1024, reserve, None)
        body = os.urandom(8 * reserve + 123)
        wire = _pdu(4, body)
        peer.sendall(wire[:1000])
        while stream._body is None:
            await asyncio.sleep(0.01)
        assert len(stream._body) == reserve  # not the 2 MB the header claims
        got = await _send_cut_and_read(stream, peer, wire[1000:], 65536, 1)
        assert got == [(4, bytearray(body))]

    _run(scenario)


def test_a_working_association_is_not_idle() -> None:
    """While ``working`` says so, a wait receives nothing for several of its timeouts and is not ended; once the
    work is done, the timeout runs again."""
    async def scenario(stream: PDUStream, peer: socket.socket) -> None:
        busy = {"now": True}
        stream.working = lambda: busy["now"]
        loop = asyncio.get_running_loop()

        def done() -> None:
            busy["now"] = False
            stream.note_activity()

        loop.call_later(1.6, done)  # working for over three timeouts, receiving nothing
        loop.call_later(1.7, peer.sendall, _pdu(4, b"late"))  # well within a timeout of the end of the work
        assert await stream.read_pdu(0.5) == (4, bytearray(b"late"))
        with pytest.raises(TimeoutError):
            await stream.read_pdu(0.5)  # idle, not working: times out

    _run(scenario)


def test_a_peer_that_reads_nothing_fails_the_send_after_the_send_timeout() -> None:
    async def scenario(stream: PDUStream, peer: socket.socket) -> None:
        stream.send_timeout = 0.3
        with pytest.raises(TimeoutError):
            for _ in range(1000):  # far more than the socket buffers and the transport's high-water mark
                stream.write(b"x" * 65536)
                await stream.drain()

    _run(scenario)
