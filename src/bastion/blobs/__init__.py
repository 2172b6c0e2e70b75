"""Blob stores: where the DICOM Part 10 files, the truth of the archive, live.

Every backend implements :class:`bastion.blobs.base.BlobStore`; the contract tests in
``tests/contract`` run against each of them.
"""

from bastion.blobs.base import BlobStore, BlobWriter, open_blob_store

__all__ = ["BlobStore", "BlobWriter", "open_blob_store"]
