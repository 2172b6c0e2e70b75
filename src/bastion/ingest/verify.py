"""Verify: re-hash every stored version against its recorded content digest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bastion.blobs.base import BlobStore
from bastion.errors import BastionError
from bastion.index.base import Index
from bastion.model import digest as content_digest
from bastion.model.records import parse_object_key


@dataclass
class VerifyReport:
    """Objects checked and the problems found."""

    checked: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    unindexed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt


def digest_of(blobs: BlobStore, key: str, like: str) -> str:
    """The digest of a stored object, streamed, in the algorithm of the digest ``like``."""
    with blobs.open(key) as fh:
        return content_digest.of_file(fh, like)


def verify(blobs: BlobStore, index: Index, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Check every version the index knows; list stored objects the index does not know."""
    report = VerifyReport()
    known: set[str] = set()
    for version in index.versions():
        known.add(version.blob_key)
        report.checked += 1
        try:
            actual = digest_of(blobs, version.blob_key, version.digest)
        except BastionError:
            report.missing.append(version.blob_key)
        else:
            parts = parse_object_key(version.blob_key)
            expected = {version.digest} | ({parts["digest"]} if parts else set())
            if {actual} != expected:
                report.corrupt.append(version.blob_key)
        if progress:
            progress(1)
    report.unindexed = sorted(k for k in blobs.keys() if parse_object_key(k) and k not in known)
    return report
