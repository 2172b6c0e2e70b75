"""Deadlines on what an HTTP client sends: its request line and headers, and its request body.

A client that stalls or trickles would otherwise hold a connection, a task and (for STOW-RS) a half-received
object for ever. Two settings bound it:

* ``http_header_timeout``: the request line and header fields must arrive within this many seconds of the
  connection's first byte being awaited (a new connection, or the first byte of the next request on a kept-alive
  one). :func:`header_deadline_protocol` builds the uvicorn protocol that enforces it: a connection that sent part
  of a request is answered ``408 Request Timeout`` (RFC 9110 15.5.9) and closed; one that sent nothing is closed.
* ``http_body_timeout``: a request body that receives less than :data:`BODY_MIN_BYTES` in any window of this many
  seconds that the application spends waiting for it is abandoned (:class:`BodyDeadline`). The handler's read
  raises :class:`RequestBodyTimeout`, so what it was receiving is dropped (STOW-RS aborts its pending object);
  the client gets ``408`` if nothing was answered yet, and the connection is closed. Time the application spends
  working between reads (storing a part) is not counted: the client is not the one stalling then.

Each timeout is logged in one line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from bastion.errors import BastionError

log = logging.getLogger("bastion.http")

#: A request body must bring at least this much in every window of ``http_body_timeout`` seconds.
BODY_MIN_BYTES = 1024

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


class RequestBodyTimeout(BastionError):
    """The request body stalled or trickled past ``http_body_timeout`` (HTTP 408, RFC 9110 15.5.9)."""

    http_status = 408


def _peer(scope: MutableMapping[str, Any]) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "a client"


class _BodyClock:
    """The receive channel of one request, with the body deadline of :class:`BodyDeadline`.

    Only time spent inside :meth:`receive` counts towards a window. Once the body is complete (a message without
    ``more_body``) or the client is gone, receive passes straight through: a streamed response listening for the
    disconnect is not timed.
    """

    def __init__(self, receive: Receive, timeout: float, scope: MutableMapping[str, Any]) -> None:
        self._receive = receive
        self._timeout = timeout
        self._scope = scope
        self._waited = 0.0  # seconds spent waiting in the current window
        self._got = 0  # body bytes received in the current window
        self.complete = False
        self.expired = False

    async def receive(self) -> Message:
        if self.complete or self.expired:
            return await self._receive()
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            message: Message | None
            try:
                message = await asyncio.wait_for(self._receive(), max(0.0, self._timeout - self._waited))
            except TimeoutError:
                message = None
            self._waited += loop.time() - started
            if message is not None:
                if message.get("type") != "http.request" or not message.get("more_body", False):
                    self.complete = True
                    return message
                self._got += len(message.get("body", b""))
            if self._waited >= self._timeout:
                if self._got < BODY_MIN_BYTES:
                    self._expire()
                self._waited, self._got = 0.0, 0  # the window brought enough: a new one starts
            if message is not None:
                return message

    def _expire(self) -> None:
        self.expired = True
        why = (f"the request body brought less than {BODY_MIN_BYTES} bytes in {self._timeout:g} s "
               f"(http_body_timeout)")
        log.warning("%s %s from %s: %s; dropped", self._scope.get("method"), self._scope.get("path"),
                    _peer(self._scope), why)
        raise RequestBodyTimeout(why)


class BodyDeadline:
    """ASGI middleware: abandon a request body that stalls or trickles (see the module docstring).

    Parameters
    ----------
    app
        The application wrapped.
    timeout
        ``http_body_timeout``: the window in seconds in which at least :data:`BODY_MIN_BYTES` must arrive.
    """

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        clock = _BodyClock(receive, self.timeout, scope)
        started = False

        async def send_closing(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if clock.expired:  # the rest of the body may still come: the connection cannot be reused
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, clock.receive, send_closing)
        except RequestBodyTimeout as exc:
            if started:
                raise  # the answer has begun: the server closes the connection
            body = exc.message.encode()
            await send({"type": "http.response.start", "status": 408,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on each request's line and header fields.

    The deadline starts when the connection is made, and again when the first byte of a request on a kept-alive
    connection arrives (before that, uvicorn's keep-alive timeout applies); it ends when h11 has parsed the whole
    request head. Use :func:`header_deadline_protocol` to set ``header_timeout``.
    """

    header_timeout: float = 30.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self._header_timer is None:
                self._arm_header_deadline()
        else:
            self._cancel_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline_passed)

    def _cancel_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline_passed(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        pending, _ = self.conn.trailing_data
        if not pending:  # nothing sent (a browser's spare connection, say): closed without an answer
            log.debug("HTTP connection from %s sent no request within %g s: closed", peer, self.header_timeout)
            self.transport.close()
            return
        why = f"the request line and headers did not arrive within {self.header_timeout:g} s (http_header_timeout)"
        log.warning("HTTP request from %s: %s; dropped after %d bytes", peer, why, len(pending))
        body = why.encode()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def header_deadline_protocol(header_timeout: float) -> type[HeaderDeadlineProtocol]:
    """The uvicorn ``http`` protocol class enforcing ``header_timeout`` seconds (``http_header_timeout``)."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout": header_timeout})
