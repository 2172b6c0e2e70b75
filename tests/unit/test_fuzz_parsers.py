"""Fuzzing the parsers that read what a client sends, in process: the ingest header scan (its C and pure-Python
twins, and :func:`~bastion.ingest.header.read_header` over them) on pydicom's sample files damaged by hypothesis,
and the multipart parser (:mod:`bastion.dicomweb.multipart`) on well-formed and broken bodies fed in chunks of
any size.

Properties:

* header scan: the two twins give the same result or refuse alike (``NotSimple`` / ``ValueError``);
  ``read_header`` answers with a Header or a :class:`~bastion.errors.BastionError` (a 4xx / DIMSE failure), never
  another exception;
* multipart: a well-formed body gives back exactly its parts (header names lower-cased, values stripped), a broken
  one raises :class:`~bastion.dicomweb.multipart.MultipartError` (HTTP 400) and nothing else; the outcome does not
  depend on how the body is cut into chunks; the parser never holds more than one header block
  (:data:`~bastion.dicomweb.multipart.MAX_HEADER_BYTES`) and a delimiter between two ``feed`` calls.

The example budget is ``BASTION_FUZZ_EXAMPLES`` (tests/fuzzing.py); ``benchmarks/fuzz.py`` runs these harnesses
at 10,000 examples and more.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import pytest
from fuzzing import MultipartCase, fuzz_settings, multipart_cases, mutated, seed_files
from hypothesis import given
from hypothesis import strategies as st

from bastion.dicomweb.multipart import MAX_HEADER_BYTES, PART_END, MultipartError, MultipartStream, PartStart
from bastion.errors import BastionError, InvalidObject
from bastion.ingest import header as H
from bastion.ingest import scan as S

SEEDS = seed_files()


# -- the header scan -------------------------------------------------------------------------------------------
def _scan_outcome(fn: Any, data: bytes) -> tuple[str, ...]:
    try:
        return ("ok", repr(fn(data, H._WANTED)))
    except S.NotSimple:
        return ("not simple",)
    except ValueError:
        return ("ValueError",)


def check_header(data: bytes) -> None:
    """The properties of the header scan for one input (see the module)."""
    if S.SPEEDUPS is not None:
        assert _scan_outcome(S._scan_header_c, data) == _scan_outcome(S.scan_header_py, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of what it reads in damaged objects
        try:
            H.read_header(io.BytesIO(data))
        except BastionError:
            pass


def test_there_are_seeds() -> None:
    assert len(SEEDS) > 50


@given(data=mutated(SEEDS))
@fuzz_settings()
def test_damaged_sample_files_are_read_or_refused(data: bytes) -> None:
    check_header(data)


@pytest.mark.parametrize("extra", range(0, 9))
def test_an_object_cut_inside_its_transfer_syntax_uid_is_invalid(extra: int) -> None:
    """Found by the fuzzing: an object ending just after the Transfer Syntax UID's tag and VR made the nesting
    check before pydicom raise struct.error, which STOW answered as a processing failure (0x0110) with a traceback
    in the log, not as an object it cannot understand (0xC000)."""
    data = SEEDS[0]
    at = data.find(b"\x02\x00\x10\x00UI")
    with warnings.catch_warnings(), pytest.raises(InvalidObject):
        warnings.simplefilter("ignore")
        H.read_header(io.BytesIO(data[: at + extra]))


DEFLATED = b"1.2.840.10008.1.2.1.99"


@pytest.mark.parametrize("at", [0, 10, 100, 400])
def test_a_corrupt_deflated_dataset_is_invalid(at: int) -> None:
    """Found by the fuzzing (benchmarks/fuzz.py): a Deflated Explicit VR Little Endian object (PS3.5 A.5) whose
    deflate stream is damaged raised zlib.error out of read_header, which STOW answered as a processing failure
    (0x0110) with a traceback in the log, not as an object it cannot understand (0xC000)."""
    data = next(seed for seed in SEEDS if DEFLATED in seed[:1024])
    meta_end = data.index(DEFLATED) + len(DEFLATED)
    damaged = bytearray(data)
    start = meta_end + 64 + at
    damaged[start: start + 16] = b"\xff" * 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            H.read_header(io.BytesIO(bytes(damaged)))
        except InvalidObject:
            pass  # refused: damage that zlib notices; damage it does not notice may still decode


# -- the multipart parser --------------------------------------------------------------------------------------
def _parse(boundary: str, body: bytes, cuts: list[int]) -> tuple[str, Any]:
    """Parse ``body`` fed in pieces cut at ``cuts``: ("parts", [(headers, content)]) or ("refused", message)."""
    stream = MultipartStream(boundary)
    limit = MAX_HEADER_BYTES + len(boundary) + 8  # a header block, or a delimiter that may straddle two feeds
    parts: list[tuple[dict[str, str], bytes]] = []
    content = bytearray()
    headers: dict[str, str] = {}
    bounds = [0, *sorted(set(cuts)), len(body)]
    try:
        for start, end in zip(bounds, bounds[1:], strict=False):
            for event in stream.feed(body[start:end]):
                if isinstance(event, PartStart):
                    headers, content = event.headers, bytearray()
                elif event is PART_END:
                    parts.append((headers, bytes(content)))
                else:
                    assert isinstance(event, bytes)
                    content += event
            assert len(stream._buffer) <= limit, f"the parser holds {len(stream._buffer)} bytes between feeds"
            if stream.finished:
                break
        stream.close()
    except MultipartError as exc:
        return ("refused", type(exc).__name__)
    return ("parts", parts)


def check_multipart(case: MultipartCase, cuts: list[int]) -> None:
    """The properties of the multipart parser for one body (see the module)."""
    whole = _parse(case.boundary, case.body, [])
    assert _parse(case.boundary, case.body, cuts) == whole, (case.malformation, cuts)
    if len(case.body) <= 4096:  # byte by byte (each feed searches the buffer: quadratic on large bodies)
        assert _parse(case.boundary, case.body, list(range(1, len(case.body)))) == whole, case.malformation
    if case.parts is not None:
        assert whole == ("parts", case.parts), case.malformation


@st.composite
def multipart_inputs(draw: st.DrawFn) -> tuple[MultipartCase, list[int]]:
    case = draw(multipart_cases())
    cuts = draw(st.lists(st.integers(0, max(len(case.body), 1)), max_size=8))
    return case, cuts


@given(given_input=multipart_inputs())
@fuzz_settings()
def test_multipart_bodies_parse_the_same_in_any_chunks(given_input: tuple[MultipartCase, list[int]]) -> None:
    check_multipart(*given_input)


@pytest.mark.parametrize("size", [MAX_HEADER_BYTES - 1, MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1, 1024 * 1024])
def test_a_header_block_over_the_bound_is_refused_however_it_arrives(size: int) -> None:
    """Whole or in pieces, a part's header block of up to MAX_HEADER_BYTES is read and a longer one refused (found
    by the fuzzing: a longer one was accepted when it arrived in one chunk, refused when it came in pieces)."""
    field = b"X-Big: " + b"a" * (size - 7)
    body = b"--b\r\n" + field + b"\r\n\r\ncontent\r\n--b--\r\n"
    expected = ("parts", [({"x-big": "a" * (size - 7)}, b"content")]) if size <= MAX_HEADER_BYTES else (
        "refused", "MultipartError")
    assert _parse("b", body, []) == expected
    assert _parse("b", body, list(range(0, len(body), 1000))) == expected
    assert _parse("b", body, [len(body) - 25, len(body) - 23, len(body) - 22]) == expected
