"""``multipart/related`` bodies (RFC 2387, RFC 2046 5.1) as DICOMweb uses them (PS3.18 8.6.1.2).

:class:`MultipartStream` is incremental and keeps no part in memory: feed it the request body in
chunks of any size and it hands back, in order, each part's header fields (:class:`PartStart`), its
content in pieces as they arrive (``bytes``) and its end (:class:`PART_END`). It holds at most one
chunk plus a delimiter's length (or one part's header block, at most :data:`MAX_HEADER_BYTES`), so
STOW-RS streams a part of any size into the store pipeline. :class:`MultipartParser` collects whole
parts on top of it, for small bodies. :func:`part_header` and :func:`closing` build response bodies
that start with the boundary line, as OHIF requires.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Final

from bastion.errors import InvalidQuery

#: The longest header block of a part (and line after a boundary), from its first byte to its CRLF CRLF; a longer
#: one is refused however the body is cut into chunks.
MAX_HEADER_BYTES = 16 * 1024
#: The longest boundary accepted. RFC 2046 5.1.1 allows 70 characters, but senders in the field use longer ones
#: (Orthanc's DICOMweb client: 73); a bound still keeps a hostile one from costing a search per byte of its size.
MAX_BOUNDARY = 200


class MultipartError(InvalidQuery):
    """The body is not a well-formed multipart message (HTTP 400)."""


@dataclass(frozen=True)
class PartStart:
    """The header fields (lower-case names) of the part whose content follows."""

    headers: dict[str, str]

    @property
    def content_type(self) -> str:
        """The part's Content-Type, or ``""`` when it has none."""
        return self.headers.get("content-type", "")


class _PartEnd:
    """The type of :data:`PART_END`."""

    def __repr__(self) -> str:
        return "PART_END"


#: The event that ends a part's content.
PART_END: Final = _PartEnd()

#: What :meth:`MultipartStream.feed` returns: a part's start, a piece of its content, or its end.
Event = PartStart | bytes | _PartEnd


@dataclass
class Part:
    """One whole body part: header fields (lower-case names) and content."""

    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def content_type(self) -> str:
        """The part's Content-Type, or ``""`` when it has none."""
        return self.headers.get("content-type", "")


def check_boundary(boundary: str) -> None:
    """Raise :class:`MultipartError` unless ``boundary`` has 1 to :data:`MAX_BOUNDARY` characters."""
    if not 1 <= len(boundary) <= MAX_BOUNDARY:
        raise MultipartError(f"the multipart boundary must be 1 to {MAX_BOUNDARY} characters, "
                             f"not {len(boundary)}")


_PREAMBLE, _AFTER_DELIMITER, _HEADERS, _BODY, _END = range(5)


class MultipartStream:
    """Incremental parser of a multipart body with a known boundary, yielding events (see the module).

    Parameters
    ----------
    boundary
        The ``boundary`` parameter of the Content-Type: 1 to :data:`MAX_BOUNDARY` characters (RFC 2046 5.1.1
        says at most 70; longer ones are accepted).

    Raises
    ------
    MultipartError
        The boundary is empty or too long; from :meth:`feed` and :meth:`close`, the body is malformed.

    Examples
    --------
    >>> s = MultipartStream("b")
    >>> s.feed(b"--b\\r\\nContent-Type: text/plain\\r\\n\\r\\nhi\\r\\n--b--")
    [PartStart(headers={'content-type': 'text/plain'}), b'hi', PART_END]
    """

    def __init__(self, boundary: str) -> None:
        check_boundary(boundary)
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        # A CRLF in front lets a body that starts with the boundary line match the delimiter.
        self._buffer = bytearray(b"\r\n")
        self._state = _PREAMBLE

    @property
    def finished(self) -> bool:
        """True once the closing delimiter has been seen."""
        return self._state == _END

    @property
    def in_part(self) -> bool:
        """True between a :class:`PartStart` and its :data:`PART_END`."""
        return self._state == _BODY

    def feed(self, data: bytes) -> list[Event]:
        """Add bytes; return the events they complete, in order."""
        if self._state == _END:
            return []  # the epilogue is ignored (RFC 2046 5.1.1)
        self._buffer += data
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def close(self) -> None:
        """Declare the end of the body; raises MultipartError if it ended early."""
        if self._state == _PREAMBLE:
            raise MultipartError("the body holds no multipart boundary")
        if self._state != _END:
            raise MultipartError("the multipart body ends before its closing boundary")

    def _step(self, events: list[Event]) -> bool:
        """Advance the state machine once; False when more input is needed."""
        buf = self._buffer
        if self._state == _PREAMBLE:
            idx = buf.find(self._delimiter)
            if idx < 0:
                del buf[: max(0, len(buf) - len(self._delimiter))]
                return False
            del buf[: idx + len(self._delimiter)]
            self._state = _AFTER_DELIMITER
            return True
        if self._state == _AFTER_DELIMITER:
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self._state = _END
                buf.clear()
                return False
            eol = buf.find(b"\r\n", 0, MAX_HEADER_BYTES + 2)  # the same bound however the body is cut up
            if eol < 0:
                if len(buf) >= MAX_HEADER_BYTES + 2:
                    raise MultipartError("a boundary line is not followed by CRLF")
                return False
            if buf[:eol].strip(b" \t"):
                raise MultipartError("unexpected text after a multipart boundary")
            del buf[: eol + 2]
            self._state = _HEADERS
            return True
        if self._state == _HEADERS:
            return self._headers(events)
        if self._state == _BODY:
            return self._body_step(events)
        return False

    def _headers(self, events: list[Event]) -> bool:
        buf = self._buffer
        if buf[:2] == b"\r\n":  # no header fields at all
            del buf[:2]
            events.append(PartStart({}))
            self._state = _BODY
            return True
        end = buf.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES + 4)  # the same bound however the body is cut up
        if end < 0:
            if len(buf) >= MAX_HEADER_BYTES + 4:
                raise MultipartError("multipart part headers are too long or not terminated")
            return False
        headers: dict[str, str] = {}
        for line in bytes(buf[:end]).decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if not colon or not name.strip():
                raise MultipartError(f"malformed multipart header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        del buf[: end + 4]
        events.append(PartStart(headers))
        self._state = _BODY
        return True

    def _body_step(self, events: list[Event]) -> bool:
        buf = self._buffer
        idx = buf.find(self._delimiter)
        if idx < 0:
            keep = len(self._delimiter) - 1  # a delimiter may straddle two chunks
            if len(buf) > keep:
                events.append(bytes(buf[: len(buf) - keep]))
                del buf[: len(buf) - keep]
            return False
        if idx:
            events.append(bytes(buf[:idx]))
        del buf[: idx + len(self._delimiter)]
        events.append(PART_END)
        self._state = _AFTER_DELIMITER
        return True


class MultipartParser:
    """Whole parts of a multipart body fed in chunks (:class:`MultipartStream` underneath).

    Parameters
    ----------
    boundary
        The ``boundary`` parameter of the Content-Type (see :class:`MultipartStream`).
    max_part_bytes
        Parts larger than this raise :class:`MultipartError`; None for no limit.

    Examples
    --------
    >>> p = MultipartParser("b")
    >>> parts = p.feed(b"--b\\r\\nContent-Type: text/plain\\r\\n\\r\\nhi\\r\\n--b--")
    >>> p.close(); parts[0].body
    b'hi'
    """

    def __init__(self, boundary: str, *, max_part_bytes: int | None = None) -> None:
        self._stream = MultipartStream(boundary)
        self._max = max_part_bytes
        self._headers: dict[str, str] = {}
        self._body = bytearray()

    @property
    def finished(self) -> bool:
        """True once the closing delimiter has been seen."""
        return self._stream.finished

    def feed(self, data: bytes) -> list[Part]:
        """Add bytes; return the parts completed by them."""
        done: list[Part] = []
        for event in self._stream.feed(data):
            if isinstance(event, PartStart):
                self._headers, self._body = event.headers, bytearray()
            elif isinstance(event, bytes):
                self._body += event
                if self._max is not None and len(self._body) > self._max:
                    raise MultipartError(f"a multipart part is larger than {self._max} bytes")
            else:
                done.append(Part(self._headers, bytes(self._body)))
                self._body = bytearray()
        return done

    def close(self) -> None:
        """Declare the end of the body; raises MultipartError if it ended early."""
        self._stream.close()


def parse_multipart(body: bytes, boundary: str) -> list[Part]:
    """Parse a whole multipart body (see :class:`MultipartParser`)."""
    parser = MultipartParser(boundary)
    parts = parser.feed(body)
    parser.close()
    return parts


def new_boundary() -> str:
    """A fresh random boundary."""
    return "bastion-" + secrets.token_hex(16)


def part_header(boundary: str, content_type: str, *, first: bool,
                extra: dict[str, str] | None = None) -> bytes:
    """The delimiter and header fields in front of one part's content."""
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return (b"" if first else b"\r\n") + ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def closing(boundary: str) -> bytes:
    """The closing delimiter after the last part."""
    return f"\r\n--{boundary}--\r\n".encode("latin-1")


def encode_multipart(parts: list[tuple[str, bytes]], boundary: str) -> bytes:
    """A whole multipart body from ``(content_type, content)`` pairs."""
    out = bytearray()
    for i, (ctype, content) in enumerate(parts):
        out += part_header(boundary, ctype, first=i == 0)
        out += content
    out += closing(boundary)
    return bytes(out)


def content_type(boundary: str, part_type: str, transfer_syntax: str | None = None) -> str:
    """The response Content-Type ``multipart/related; type="..."; boundary=...``."""
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    if transfer_syntax:
        value += f"; transfer-syntax={transfer_syntax}"
    return value
