"""The Minimal Lower Layer Protocol (HL7 v2 Implementation Guide, appendix C.4): one message over TCP, framed as
``<VT> message <FS><CR>``, answered by an acknowledgment in the same framing.

:func:`send` delivers one message and reads its ACK (HL7 v2.5.1 2.9, original acknowledgment mode): MSA-1 ``AA``
or ``CA`` for the message's control id is delivery; ``AE``, ``AR``, ``CE``, ``CR``, no answer within the timeout,
a refused or broken connection, or an answer that is not an ACK of this message raise :class:`MllpError`.
"""

from __future__ import annotations

import asyncio
import contextlib

from bastion.errors import BastionError
from bastion.reporting.hl7 import ack_code

START, END = b"\x0b", b"\x1c\x0d"
#: The largest acknowledgment read (bytes).
MAX_ACK = 1 << 20
ACCEPTED = ("AA", "CA")


class MllpError(BastionError):
    """A message was not delivered (its receiver refused it, or could not be reached): try again later."""

    http_status = 502


def frame(message: str) -> bytes:
    """``message`` in MLLP framing (UTF-8, as MSH-18 ``UNICODE UTF-8`` says)."""
    return START + message.encode("utf-8") + END


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as host and port; ValueError if it is not one."""
    host, sep, port = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host, int(port)


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    data = await reader.readuntil(END)
    start = data.find(START)
    if start < 0:
        raise MllpError("the answer is not MLLP-framed (no start block)")
    return data[start + 1:-len(END)]


async def send(address: str, message: str, control_id: str, timeout: float) -> str:
    """Send ``message`` to ``address`` (``HOST:PORT``) and wait up to ``timeout`` seconds for its ACK; the
    acknowledgment code (``AA`` or ``CA``). MllpError when it was not delivered."""
    host, port = parse_address(address)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=MAX_ACK)
            try:
                writer.write(frame(message))
                await writer.drain()
                answer = await _read_frame(reader)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        raise MllpError(f"{address}: no acknowledgment within {timeout:g} s") from None
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise MllpError(f"{address}: {exc or type(exc).__name__}") from None
    try:
        code, acked, text = ack_code(answer.decode("utf-8", "replace"))
    except Exception as exc:  # hl7apy raises its own tree and more for an answer that is no HL7 message
        raise MllpError(f"{address}: the answer is not an HL7 ACK ({type(exc).__name__}: {exc})") from None
    if acked != control_id:
        raise MllpError(f"{address}: the ACK is for message {acked!r}, not {control_id!r}")
    if code not in ACCEPTED:
        raise MllpError(f"{address}: {code or 'no MSA-1'}{': ' + text if text else ''}")
    return code
