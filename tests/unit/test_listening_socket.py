"""The sockets ``bastion serve`` listens on hand their connections ``TCP_NODELAY``.

asyncio sets it only on sockets it created itself; uvicorn, given the supervisor's socket, then wrote a small
response's headers and body in two sends, and on a kept-alive connection the second waited for the client's
delayed ACK: 44 ms for every QIDO answer of a few results after the first (the DICOMweb benchmark, 2026-11-29).
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from bastion.cli.serve import listening_socket

pytestmark = pytest.mark.timeout(20)


def test_accepted_connections_have_tcp_nodelay() -> None:
    server = listening_socket("127.0.0.1", 0, "HTTP")
    client = socket.create_connection(server.getsockname())
    try:
        server.setblocking(True)
        conn, _ = server.accept()
        with conn:
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        client.close()
        server.close()


def test_asyncio_transports_of_its_connections_have_tcp_nodelay() -> None:
    """Through asyncio, as uvicorn serves it: the transport of an accepted connection has the option set."""
    seen: list[int] = []

    async def main() -> None:
        sock = listening_socket("127.0.0.1", 0, "HTTP")

        def made(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(made, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname())
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.01)
            writer.close()

    asyncio.run(main())
    assert seen == [1]
