"""Content digests of stored objects: BLAKE3, written ``b3-<64 hex digits>``.

Every stored object is named by a digest of its bytes (its blob key ends with it), which ``verify`` and
crash recovery check the bytes against, and which tells an identical re-send from a new version.

New objects are hashed with BLAKE3 (256-bit output): a cryptographic hash like SHA-256, much faster in
software on CPUs without SHA instructions, and the hash is on the path of every store (see BENCHMARKS.md,
"Content digests"). ``b3sum`` computes the same digest from the command line.

Objects stored by earlier versions of Bastion carry a bare 64-digit SHA-256; they are still checked
with SHA-256. The form of a digest names its algorithm, so no other record is needed.
"""

from __future__ import annotations

import hashlib
from typing import Any, BinaryIO

import blake3

#: The prefix of a BLAKE3 digest; a bare 64-digit hex digest is a SHA-256 (objects from before BLAKE3).
BLAKE3_PREFIX = "b3-"
#: A digest as it appears in a blob key (regular expression).
DIGEST_PATTERN = r"(?:b3-)?[0-9a-f]{64}"


def hasher() -> Any:
    """A new incremental BLAKE3 hasher (``update``, ``digest``, ``hexdigest``)."""
    return blake3.blake3()


def text(raw: bytes) -> str:
    """The written form of a raw 32-byte BLAKE3 digest."""
    return BLAKE3_PREFIX + raw.hex()


def of_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """The raw BLAKE3 digest of ``data``."""
    return blake3.blake3(data).digest()


def of_bytes_like(data: bytes | bytearray | memoryview, like: str) -> str:
    """The digest of ``data`` in the algorithm and form of the digest ``like``."""
    if like.startswith(BLAKE3_PREFIX):
        return text(of_bytes(data))
    return hashlib.sha256(data).hexdigest()


def of_file(fh: BinaryIO, like: str) -> str:
    """The digest of what ``fh`` holds, in the algorithm and form of the digest ``like``."""
    h = hasher() if like.startswith(BLAKE3_PREFIX) else hashlib.sha256()
    while chunk := fh.read(1 << 20):
        h.update(chunk)
    return text(h.digest()) if like.startswith(BLAKE3_PREFIX) else h.hexdigest()


__all__ = ["BLAKE3_PREFIX", "DIGEST_PATTERN", "hasher", "of_bytes", "of_bytes_like", "of_file", "text"]
