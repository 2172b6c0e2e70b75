"""One DICOM association over a :class:`~bastion.dimse.stream.PDUStream` (its socket: whole PDUs in, bytes out):
message assembly and fragmentation, sending, releasing and aborting.

Shared by the acceptor (:mod:`bastion.dimse.server`) and the requestor (:mod:`bastion.dimse.scu`).
PS3.8 9 (PDUs), PS3.7 E.2 / PS3.8 E (message fragments in PDVs).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from bastion.dimse.messages import decode_command, encode_command, has_dataset
from bastion.dimse.pdu import (
    A_ABORT,
    A_RELEASE_RP,
    P_DATA_TF,
    PDUError,
    encode_abort,
    encode_release,
    iter_pdvs,
    pdv_header,
)
from bastion.dimse.stream import MAX_INCOMING_PDU, MESSAGE, AssociationClosed, PDUStream

#: The longest command set (PS3.7 E.1) assembled; a longer one is refused (the peer's fragments never end it).
MAX_COMMAND = 1024 * 1024
#: The longest dataset held in memory (:class:`BytesSink`: identifiers, not C-STORE datasets, which are spooled).
MAX_DATASET_IN_MEMORY = 16 * 1024 * 1024


@dataclass
class AcceptedContext:
    """A presentation context both sides agreed on."""

    id: int
    abstract_syntax: str
    transfer_syntax: str
    scu_role: bool = True
    scp_role: bool = True


class DatasetSink(Protocol):
    """Where the fragments of an incoming dataset go."""

    def write(self, data: bytes | memoryview) -> None: ...


class BytesSink:
    """Collects a (small) dataset in memory: at most :data:`MAX_DATASET_IN_MEMORY` bytes, PDUError beyond."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes | memoryview) -> None:
        if len(self.buffer) + len(data) > MAX_DATASET_IN_MEMORY:
            raise PDUError(f"a dataset longer than the {MAX_DATASET_IN_MEMORY} bytes accepted here")
        self.buffer += data


@dataclass
class Message:
    """A complete incoming DIMSE message."""

    context: AcceptedContext
    command: dict[str, Any]
    sink: DatasetSink | None = None


@dataclass
class Association:
    """The transport of one association; the caller drives negotiation and services."""

    stream: PDUStream
    peer_max_pdu: int = 16384
    contexts: dict[int, AcceptedContext] = field(default_factory=dict)
    calling_aet: str = ""
    called_aet: str = ""
    _send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _message_id: int = 0
    # message assembly state
    _cmd_buf: bytearray = field(default_factory=bytearray)
    _pending: Message | None = None
    _abandoned: list[Message] = field(default_factory=list)  # completed in a P-DATA-TF body that then failed

    def next_message_id(self) -> int:
        """A fresh Message ID for requests we send (PS3.7 9.1.1.1)."""
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    @property
    def peername(self) -> str:
        peer = self.stream.transport.get_extra_info("peername") if self.stream.transport else None
        return f"{peer[0]}:{peer[1]}" if peer else "?"

    async def read_pdu(self, timeout: float | None = None) -> tuple[int, Any]:
        """Read one PDU: (type, body), or a message (see :meth:`PDUStream.read_pdu`). Raises AssociationClosed
        on EOF."""
        return await self.stream.read_pdu(timeout)

    async def send_raw(self, data: bytes) -> None:
        """Send an already-encoded PDU."""
        async with self._send_lock:
            self.stream.write(data)
            await self.stream.drain()

    async def abort(self) -> None:
        """A-ABORT (service-provider, PS3.8 7.3, 9.3.8) and close. While another PDU of ours is half sent, or the
        peer no longer reads what we send, the connection is dropped without it: an A-ABORT must not land inside
        another PDU, and a peer that does not read would hold the connection open."""
        if self._send_lock.locked() or self.stream.write_blocked:
            self.stream.close(hard=True)
            return
        try:
            self.stream.write(encode_abort(2, 0))
        except AssociationClosed:
            pass
        self.close()

    def close(self) -> None:
        self.stream.close()

    async def response_to(self, message_id: int, timeout: float) -> dict[str, Any]:
        """On an association we requested, the command of the peer's response to our request ``message_id`` (other
        messages are skipped). Raises AssociationClosed for an A-ABORT, PDUError for a PDU other than P-DATA-TF, and
        TimeoutError when the peer sends nothing for ``timeout`` s."""
        while True:
            kind, body = await self.read_pdu(timeout)
            if kind == A_ABORT:
                raise AssociationClosed("aborted (A-ABORT)")
            if kind != P_DATA_TF:
                raise PDUError(f"PDU 0x{kind:02x} instead of the response to message {message_id}")
            for msg in self.feed_pdata(body, lambda _msg: BytesSink()):
                if msg.command.get("MessageIDBeingRespondedTo") == message_id:
                    return msg.command

    async def release(self, timeout: float) -> None:
        """A-RELEASE of an association we requested (PS3.8 7.2), then close; an A-ABORT or a closed connection
        instead of A-RELEASE-RP ends it too, and a peer silent for ``timeout`` s is aborted."""
        try:
            await self.send_raw(encode_release(rp=False))
            while (await self.read_pdu(timeout))[0] not in (A_RELEASE_RP, A_ABORT):
                pass
        except TimeoutError:
            await self.abort()
        except Exception:  # noqa: BLE001 - the association is over either way
            pass
        self.close()

    def _max_data(self) -> int:
        """The most dataset or command bytes one PDV carries: what the peer's maximum PDU length leaves after the
        PDV's header, rounded down to even (PS3.8 Annex E: fragments of even length, whatever the peer offers)."""
        peer = self.peer_max_pdu or MAX_INCOMING_PDU
        return max((peer - 6) & ~1, 256)

    async def send_message(self, context_id: int, command: dict[str, Any], dataset: bytes | None = None,
                           stream: BinaryIO | None = None) -> None:
        """Send a DIMSE message, fragmenting to the peer's maximum PDU (PS3.8 9.3.5)."""
        if dataset is not None or stream is not None:
            command = {**command, "CommandDataSetType": 0x0000}
        else:
            command.setdefault("CommandDataSetType", 0x0101)
        cmd = encode_command(command)
        limit = self._max_data()
        async with self._send_lock:
            w = self.stream
            for off in range(0, len(cmd), limit):
                part = cmd[off: off + limit]
                w.write(pdv_header(context_id, True, off + limit >= len(cmd), len(part)) + part)
            if dataset is not None:
                view = memoryview(dataset)
                total = len(view)
                if total == 0:
                    w.write(pdv_header(context_id, False, True, 0))
                for off in range(0, total, limit):
                    fragment = view[off: off + limit]
                    w.write(pdv_header(context_id, False, off + limit >= total, len(fragment)))
                    w.write(fragment)
                    await w.drain()
            elif stream is not None:
                chunk = stream.read(limit)
                while True:
                    nxt = stream.read(limit)
                    w.write(pdv_header(context_id, False, not nxt, len(chunk)))
                    w.write(chunk)
                    await w.drain()
                    if not nxt:
                        break
                    chunk = nxt
            await w.drain()

    def feed_pdata(self, body: bytes | bytearray | memoryview, open_sink: Callable[[Message], DatasetSink]) -> list[Message]:
        """Feed one P-DATA-TF body; return the messages it completed.

        ``open_sink`` is called when a command that carries a dataset is complete, to choose
        where the dataset's fragments go (a blob writer for C-STORE, memory otherwise).
        """
        done: list[Message] = []
        try:
            self._assemble(body, open_sink, done)
        except BaseException:  # the messages completed before the failing PDV are never served
            self._abandoned += done
            raise
        return done

    def _assemble(self, body: bytes | bytearray | memoryview, open_sink: Callable[[Message], DatasetSink],
                  done: list[Message]) -> None:
        for ctx_id, is_command, last, data in iter_pdvs(body):
            context = self.contexts.get(ctx_id)
            if context is None:
                raise PDUError(f"PDV on presentation context {ctx_id}, which was not accepted")
            if is_command:
                if self._pending is not None:
                    raise PDUError("command fragment received while a dataset was expected")
                if len(self._cmd_buf) + len(data) > MAX_COMMAND:
                    raise PDUError(f"a command set longer than {MAX_COMMAND} bytes")
                self._cmd_buf += data
                if last:
                    command = decode_command(bytes(self._cmd_buf))
                    self._cmd_buf.clear()
                    msg = Message(context, command)
                    if has_dataset(command):
                        msg.sink = open_sink(msg)
                        self._pending = msg
                    else:
                        done.append(msg)
            else:
                pending = self._pending
                if pending is None or pending.sink is None:
                    raise PDUError("dataset fragment without a command")
                if ctx_id != pending.context.id:
                    raise PDUError("dataset fragment on a different presentation context")
                pending.sink.write(data)
                if last:
                    self._pending = None
                    done.append(pending)

    def pending_message(self) -> Message | None:
        """The message whose dataset is still arriving (to abort its sink on failure)."""
        return self._pending

    def abandoned_messages(self) -> list[Message]:
        """Remove and return the messages completed in a P-DATA-TF body whose assembly then failed: never
        served (their datasets' sinks are the caller's, to abort)."""
        abandoned, self._abandoned = self._abandoned, []
        return abandoned


__all__ = ["A_ABORT", "MESSAGE", "P_DATA_TF", "AcceptedContext", "Association", "AssociationClosed", "BytesSink",
           "Message", "PDUStream"]
