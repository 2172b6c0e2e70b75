"""What the fuzz harnesses (``tests/*/test_fuzz_*.py``, ``benchmarks/fuzz.py``) share: the example budget, the
seed objects, byte mutations, and a snapshot of what a server holds.

The budget: ``BASTION_FUZZ_EXAMPLES`` examples per harness (default :data:`DEFAULT_EXAMPLES`, small enough for
CI); ``benchmarks/fuzz.py`` runs the same harnesses at 10,000 and more.
"""

from __future__ import annotations

import hashlib
import os
import string
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom.data
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

#: Examples per harness in CI unless ``BASTION_FUZZ_EXAMPLES`` says otherwise.
DEFAULT_EXAMPLES = 200
#: The largest pydicom sample file used as a seed (the big multi-frame ones only cost time).
MAX_SEED_BYTES = 256 * 1024


def examples() -> int:
    """The number of examples each harness runs (``BASTION_FUZZ_EXAMPLES``)."""
    return int(os.environ.get("BASTION_FUZZ_EXAMPLES", str(DEFAULT_EXAMPLES)))


def fuzz_settings(max_examples: int | None = None) -> settings:
    """Hypothesis settings of a harness: the budget, no deadline (the machine is shared), no example database
    (every run explores afresh; a failure prints its input)."""
    return settings(max_examples=max_examples or examples(), deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


def seed_files() -> list[bytes]:
    """pydicom's sample Part 10 files (``pydicom.data.get_testdata_files``) up to :data:`MAX_SEED_BYTES`."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that the downloadable samples are missing
        paths = sorted(pydicom.data.get_testdata_files("*.dcm"))
    for path in paths:
        data = Path(path).read_bytes()
        if len(data) <= MAX_SEED_BYTES and data[128:132] == b"DICM":
            out.append(data)
    return out


#: 4-byte lengths a mutation writes over a value length: empty, odd, undefined, huge.
LENGTHS = [0, 1, 3, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes], *, head: int = 4096) -> bytes:
    """One seed, damaged: cut short, bytes overwritten (mostly in its first ``head`` bytes, where the header is),
    a length field set to an absurd value, bytes spliced in or cut out, or a stretch repeated."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        kind = draw(st.sampled_from(["truncate", "flip", "length", "splice", "delete", "repeat"]))
        at = draw(st.integers(0, min(len(data), head) - 1))
        if kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif kind == "flip":
            for _ in range(draw(st.integers(1, 8))):
                data[draw(st.integers(0, min(len(data), head) - 1))] = draw(st.integers(0, 255))
        elif kind == "length":
            width = draw(st.sampled_from([2, 4]))
            value = draw(st.sampled_from(LENGTHS)) & (0xFFFF if width == 2 else 0xFFFFFFFF)
            data[at:at + width] = value.to_bytes(width, "little")
        elif kind == "splice":
            data[at:at] = draw(st.binary(max_size=64))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        else:
            piece = bytes(data[at:at + draw(st.integers(1, 256))])
            data[at:at] = piece * draw(st.integers(1, 16))
    return bytes(data)


@dataclass(frozen=True)
class StoreSnapshot:
    """What a server holds: each stored object's file (relative name) and SHA-256, and the index's counts."""

    blobs: dict[str, str]
    counts: dict[str, int]

    def unchanged_in(self, later: StoreSnapshot) -> list[str]:
        """Objects of this snapshot missing or changed in ``later`` (empty when every one is intact)."""
        return [name for name, digest in self.blobs.items() if later.blobs.get(name) != digest]


COUNTED = ("patients", "studies", "series", "instances", "versions")


def snapshot(server: Any) -> StoreSnapshot:
    """The :class:`StoreSnapshot` of a running ``BastionServer`` (tests/conftest.py): the stored objects' files,
    not the blob store's journal (``.journal``) or spool."""
    files = server.blob_files()
    root = server.data
    blobs = {}
    for path in files:
        name = str(path.relative_to(root)) if path.is_relative_to(root) else path.name
        if any(part.startswith(".") for part in Path(name).parts):
            continue  # the blob store's journal and spool, not stored objects
        blobs[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    stats = server.stats()
    return StoreSnapshot(blobs, {key: int(stats[key]) for key in COUNTED})


# -- multipart bodies (RFC 2046 5.1) -----------------------------------------------------------------------------
#: Characters of a boundary (RFC 2046 5.1.1 bchars, without the space, which may not end one).
BOUNDARY_CHARS = string.ascii_letters + string.digits + "'()+_,-./:=?"
_NAME_CHARS = string.ascii_letters + string.digits + "-_"
_VALUE_CHARS = string.printable.replace("\r", "").replace("\n", "").replace("\x0b", "").replace("\x0c", "") + "éü"
#: How a body is broken (``none``: it is well formed).
MALFORMATIONS = ("none", "none", "none", "truncate", "no-close", "missing-crlf", "lf-only", "huge-header",
                 "header-without-colon", "zero-parts", "text-after-boundary", "garbage", "flip", "nested-same-boundary")


@dataclass(frozen=True)
class MultipartCase:
    """A multipart body, its boundary, and the parts it holds if it is well formed (None if it is broken)."""

    boundary: str
    body: bytes
    parts: list[tuple[dict[str, str], bytes]] | None
    malformation: str


def encode_parts(boundary: str, parts: list[tuple[list[tuple[str, str]], bytes]]) -> bytes:
    """A multipart body: each part's delimiter line, header fields and content, then the closing delimiter."""
    out = bytearray()
    for i, (headers, content) in enumerate(parts):
        out += (b"\r\n" if i else b"") + b"--" + boundary.encode("latin-1") + b"\r\n"
        out += b"".join(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers) + b"\r\n" + content
    return bytes(out) + b"\r\n--" + boundary.encode("latin-1") + b"--\r\n"


@st.composite
def multipart_cases(draw: st.DrawFn, contents: st.SearchStrategy[bytes] | None = None,
                    content_type: str = "application/dicom") -> MultipartCase:
    """A multipart body (RFC 2046 5.1), well formed or broken in one of :data:`MALFORMATIONS`."""
    boundary = draw(st.text(BOUNDARY_CHARS, min_size=1, max_size=80))
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    contents = contents if contents is not None else st.binary(max_size=300)
    header_lists = st.lists(st.tuples(st.text(_NAME_CHARS, min_size=1, max_size=20),
                                      st.text(_VALUE_CHARS, max_size=60)), max_size=3)
    malformation = draw(st.sampled_from(MALFORMATIONS))
    parts = []
    for _ in range(draw(st.integers(0 if malformation == "zero-parts" else 1, 4))):
        headers = [("Content-Type", content_type)] if draw(st.booleans()) else []
        headers += draw(header_lists)
        content = draw(contents)
        if delimiter in b"\r\n" + content + b"\r\n":
            continue  # a content holding the delimiter is not a part of this body
        parts.append((headers, content))
    if malformation == "zero-parts":
        parts = []
    body = encode_parts(boundary, parts)
    if malformation == "zero-parts":
        body = b"--" + boundary.encode("latin-1") + b"--\r\n"
    expected = [({name.strip().lower(): value.strip() for name, value in headers}, content)
                for headers, content in parts]
    if malformation in ("none", "zero-parts"):
        return MultipartCase(boundary, body, expected, malformation)
    bad = bytearray(body)
    first_line = len(boundary) + 2
    if malformation == "truncate":
        del bad[draw(st.integers(0, max(len(bad) - 3, 0))):]
    elif malformation == "no-close":
        del bad[len(bad) - len(boundary) - 8:]
    elif malformation == "missing-crlf":  # no CRLF before the delimiters: a part that never ends, mostly
        bad = bytearray(bytes(bad).replace(b"\r\n--" + boundary.encode("latin-1"), b"--" + boundary.encode("latin-1")))
    elif malformation == "lf-only":
        bad = bytearray(bytes(bad).replace(b"\r\n", b"\n"))
    elif malformation == "huge-header":
        bad[first_line + 2: first_line + 2] = b"X-Big: " + b"a" * draw(st.sampled_from([16 * 1024, 70_000])) + b"\r\n"
    elif malformation == "header-without-colon":
        bad[first_line + 2: first_line + 2] = b"no colon here\r\n"
    elif malformation == "text-after-boundary":
        bad[first_line: first_line] = b" trailing words"
    elif malformation == "garbage":
        bad = bytearray(draw(st.binary(max_size=400)))
    elif malformation == "flip":
        for _ in range(draw(st.integers(1, 6))):
            bad[draw(st.integers(0, len(bad) - 1))] = draw(st.integers(0, 255))
    else:  # a part whose content is a multipart body with the same boundary
        inner = encode_parts(boundary, [([("Content-Type", content_type)], b"inner")])
        bad[first_line + 2: first_line + 2] = b"Content-Type: multipart/related\r\n\r\n" + inner
    return MultipartCase(boundary, bytes(bad), None, malformation)


def first_traceback(log: str) -> str:
    """The first traceback in a server's log and what led to it ("" if there is none)."""
    at = log.find("Traceback")
    return "" if at < 0 else log[max(0, at - 1500): at + 3000]
