"""The multipart/related parser and writer (RFC 2046 5.1, PS3.18 8.6.1.2)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.dicomweb.multipart import (
    MAX_BOUNDARY,
    PART_END,
    MultipartError,
    MultipartParser,
    MultipartStream,
    PartStart,
    encode_multipart,
    parse_multipart,
    part_header,
)
from bastion.dicomweb.negotiation import multipart_syntaxes, parse_accept, parse_media_type

BOUNDARY_CHARS = st.characters(whitelist_categories=("Lu", "Ll", "Nd"), max_codepoint=127)
boundaries = st.text(BOUNDARY_CHARS, min_size=1, max_size=MAX_BOUNDARY)
# Bodies are drawn from bytes that often form near-delimiters: CR, LF, dashes and boundary-ish letters.
bodies = st.binary(max_size=300) | st.lists(
    st.sampled_from([b"\r", b"\n", b"-", b"--", b"\r\n--", b"a", b"b", b"\x00"]), max_size=60
).map(b"".join)


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


@settings(max_examples=300, deadline=None)
@given(boundary=boundaries, parts=st.lists(bodies, min_size=1, max_size=5),
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
       leading_crlf=st.booleans())
def test_parse_round_trips_any_chunking(boundary: str, parts: list[bytes], cuts: list[int],
                                        leading_crlf: bool) -> None:
    delimiter = b"\r\n--" + boundary.encode()
    parts = [p for p in parts if delimiter not in b"\r\n" + p + b"\r\n"]
    if not parts:
        return
    body = encode_multipart([("application/dicom", p) for p in parts], boundary)
    if leading_crlf:  # dicomweb-client starts its bodies with CRLF
        body = b"\r\n" + body
    parser = MultipartParser(boundary)
    got = []
    for chunk in _chunked(body, cuts):
        got += parser.feed(chunk)
    parser.close()
    assert [p.body for p in got] == parts
    assert all(p.content_type == "application/dicom" for p in got)


@settings(max_examples=200, deadline=None)
@given(boundary=boundaries, parts=st.lists(bodies, min_size=1, max_size=3),
       cut=st.integers(min_value=0, max_value=10_000))
def test_truncated_bodies_are_rejected(boundary: str, parts: list[bytes], cut: int) -> None:
    body = encode_multipart([("application/dicom", p) for p in parts], boundary)
    end = len(body) - len(f"--{boundary}--\r\n")
    truncated = body[: cut % end]
    with pytest.raises(MultipartError):
        parse_multipart(truncated, boundary)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400), boundary=boundaries)
def test_arbitrary_bytes_never_raise_anything_but_multipart_error(data: bytes, boundary: str) -> None:
    try:
        parse_multipart(data, boundary)
    except MultipartError:
        pass


def test_preamble_epilogue_headers_and_padding() -> None:
    body = (b"preamble\r\n--xyz  \r\nContent-Type: application/dicom\r\nContent-Location: a\r\n\r\n"
            b"ONE\r\n--xyz\r\n\r\nTWO\r\n--xyz--\r\nepilogue")
    parts = parse_multipart(body, "xyz")
    assert [p.body for p in parts] == [b"ONE", b"TWO"]
    assert parts[0].headers == {"content-type": "application/dicom", "content-location": "a"}
    assert parts[1].content_type == ""


@pytest.mark.parametrize("body", [b"--xyz\r\nno colon here\r\n\r\nX\r\n--xyz--",
                                  b"--xyz junk\r\n\r\nX\r\n--xyz--", b"", b"--xyz\r\n\r\nX"])
def test_malformed_bodies(body: bytes) -> None:
    with pytest.raises(MultipartError):
        parse_multipart(body, "xyz")


def test_part_size_limit() -> None:
    parser = MultipartParser("b", max_part_bytes=10)
    with pytest.raises(MultipartError):
        parser.feed(b"--b\r\n\r\n" + b"x" * 100)


def test_response_body_starts_with_the_boundary() -> None:
    assert part_header("b", "application/octet-stream; transfer-syntax=1.2", first=True).startswith(b"--b\r\n")
    body = encode_multipart([("a/b", b"1"), ("a/b", b"2")], "b")
    assert body == b"--b\r\nContent-Type: a/b\r\n\r\n1\r\n--b\r\nContent-Type: a/b\r\n\r\n2\r\n--b--\r\n"


@pytest.mark.parametrize("header,expected", [
    ('multipart/related; type="application/dicom"; transfer-syntax=*', ["*"]),
    ("multipart/related; type=application/dicom; transfer-syntax=1.2.840.10008.1.2.4.90",
     ["1.2.840.10008.1.2.4.90"]),
    ('multipart/related; type="application/dicom"', ["1.2.840.10008.1.2.1"]),
    ("*/*", ["*"]),
    (None, ["*"]),
    ("image/jpeg", []),
    ('multipart/related; type="application/dicom"; transfer-syntax=*;q=0.5, '
     'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2', ["1.2.840.10008.1.2", "*"]),
])
def test_accept_negotiation(header: str | None, expected: list[str]) -> None:
    assert multipart_syntaxes(parse_accept(header), "application/dicom", "1.2.840.10008.1.2.1") == expected


def test_media_type_parameters_with_and_without_quotes() -> None:
    a = parse_media_type('multipart/related; type="application/octet-stream"; transfer-syntax="*"')
    b = parse_media_type("Multipart/Related; Type=application/octet-stream; transfer-syntax=*")
    assert (a.media_type, a.related_type, a.transfer_syntax) == (b.media_type, b.related_type, b.transfer_syntax)


def _parts_from_events(events: list[object]) -> list[tuple[str, bytes]]:
    """(content type, content) of each part, from a stream's events, checking their order."""
    out: list[tuple[str, bytes]] = []
    current: bytearray | None = None
    ctype = ""
    for event in events:
        if isinstance(event, PartStart):
            assert current is None, "a part started inside another"
            current, ctype = bytearray(), event.content_type
        elif isinstance(event, bytes):
            assert current is not None, "content outside a part"
            current += event
        else:
            assert event is PART_END and current is not None
            out.append((ctype, bytes(current)))
            current = None
    assert current is None
    return out


@settings(max_examples=300, deadline=None)
@given(boundary=boundaries, parts=st.lists(bodies, min_size=1, max_size=5),
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20))
def test_stream_events_round_trip_any_chunking(boundary: str, parts: list[bytes], cuts: list[int]) -> None:
    delimiter = b"\r\n--" + boundary.encode()
    parts = [p for p in parts if delimiter not in b"\r\n" + p + b"\r\n"]
    if not parts:
        return
    body = encode_multipart([("application/dicom", p) for p in parts], boundary)
    stream = MultipartStream(boundary)
    events: list[object] = []
    for chunk in _chunked(body, cuts):
        events += stream.feed(chunk)
    stream.close()
    assert _parts_from_events(events) == [("application/dicom", p) for p in parts]


def test_a_large_part_is_handed_on_as_it_arrives_never_held() -> None:
    """Each chunk's content comes back from the feed that brought it, less at most a delimiter's length that may
    straddle two chunks: what the stream keeps stays that small whatever the part's size."""
    boundary = "x" * 73
    content = bytes(range(256)) * (40 * 1024 * 1024 // 256)  # 40 MiB
    body = encode_multipart([("application/dicom", content)], boundary)
    stream = MultipartStream(boundary)
    got = bytearray()
    chunk = 64 * 1024
    held_most = 0
    for start in range(0, len(body), chunk):
        fed = min(start + chunk, len(body))
        for event in stream.feed(body[start:fed]):
            if isinstance(event, bytes):
                got += event
        if stream.in_part:
            held_most = max(held_most, fed - len(got))  # bytes fed but not handed on (headers included)
    stream.close()
    assert bytes(got) == content
    assert held_most < 200 + len(boundary) + 8


@pytest.mark.parametrize("length", [1, 70, 73, MAX_BOUNDARY])
def test_boundaries_up_to_the_bound_are_accepted(length: int) -> None:
    boundary = "b" * length
    assert [p.body for p in parse_multipart(encode_multipart([("a/b", b"x")], boundary), boundary)] == [b"x"]


@pytest.mark.parametrize("length", [0, MAX_BOUNDARY + 1, 10_000])
def test_boundaries_past_the_bound_are_refused(length: int) -> None:
    with pytest.raises(MultipartError, match=f"1 to {MAX_BOUNDARY} characters"):
        MultipartStream("b" * length)
