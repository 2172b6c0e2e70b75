"""PDUStream over a real socket pair: whole PDUs however the bytes arrive, and the per-wait timeout."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import pytest

from bastion.dimse.association import RECV_BUFFER, PDUStream
from bastion.dimse.pdu import PDUError


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


@pytest.mark.parametrize("chunk", [5, 4096, 65536, 10 ** 7])
def test_pdus_arrive_whole_and_in_order_however_the_bytes_are_cut(chunk: int) -> None:
    async def scenario(stream: PDUStream, peer: socket.socket) -> None:
        expected = _bodies()
        wire = b"".join(_pdu(kind, body) for kind, body in expected)
        loop = asyncio.get_running_loop()

        def send() -> None:
            for off in range(0, len(wire), chunk):
                peer.sendall(wire[off: off + chunk])

        sending = loop.run_in_executor(None, send)
        got = [await stream.read_pdu(10) for _ in expected]
        await sending
        assert [(k, bytes(b)) for k, b in got] == expected

    _run(scenario)


def test_a_silent_peer_times_out_after_the_wait_s_own_timeout() -> None:
    async def scenario(stream: PDUStream, peer: socket.socket) -> None:
        peer.sendall(_pdu(4, b"x" * 10))
        assert (await stream.read_pdu(600))[0] == 4  # arms a long timer
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            await stream.read_pdu(0.3)  # a shorter timeout is not held up by the longer timer
        assert 0.25 < time.monotonic() - start < 2

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
