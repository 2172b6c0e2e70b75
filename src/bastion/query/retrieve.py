"""Retrieve: the one path that reads stored objects for C-MOVE, C-GET and WADO.

Objects are sent as stored when the peer accepts the stored transfer syntax; otherwise they
are converted (decompressed to Explicit/Implicit VR Little Endian) with pydicom.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import BinaryIO

import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from bastion.blobs.base import BlobStore
from bastion.errors import UnsupportedTransferSyntax
from bastion.index.base import Index
from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition
from bastion.model.part10 import dataset_offset, file_meta_bytes
from bastion.model.records import InstanceRecord
from bastion.model.uids import (
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    UNCOMPRESSED,
)

log = logging.getLogger("bastion.retrieve")


class Retriever:
    """Finds the instances a retrieve names and reads them in the syntax the peer accepts."""

    def __init__(self, index: Index, blobs: BlobStore) -> None:
        self.index = index
        self.blobs = blobs

    def select(self, level: QueryLevel, conditions: Sequence[Condition]) -> list[InstanceRecord]:
        """Current instances at or under the entities matching ``conditions``."""
        return self.index.instances(level, conditions)

    def open(self, record: InstanceRecord) -> BinaryIO:
        """The stored Part 10 file, for streaming."""
        return self.blobs.open(record.blob_key)

    def open_dataset(self, record: InstanceRecord) -> BinaryIO:
        """The stored dataset (after the File Meta Information), for streaming as stored."""
        fh = self.open(record)
        try:
            head = fh.read(144)
            fh.seek(dataset_offset(head) if head[128:132] == b"DICM" and len(head) == 144 else 0)
        except BaseException:
            fh.close()
            raise
        return fh

    def read(self, record: InstanceRecord) -> bytes:
        """The stored Part 10 file, whole."""
        return self.blobs.get(record.blob_key)

    def choose_syntax(self, record: InstanceRecord, accepted: Sequence[str]) -> str | None:
        """The transfer syntax to send ``record`` in, from those a peer accepts; None if none works."""
        if record.transfer_syntax in accepted:
            return record.transfer_syntax
        for ts in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN):
            if ts in accepted:
                return ts
        return None

    def dataset_bytes(self, record: InstanceRecord, transfer_syntax: str) -> bytes:
        """The dataset (no File Meta) encoded in ``transfer_syntax``."""
        data = self.read(record)
        if transfer_syntax == record.transfer_syntax:
            return data[dataset_offset(data):]
        return encode_dataset(convert(data, transfer_syntax), transfer_syntax)

    def part10_bytes(self, record: InstanceRecord, transfer_syntax: str | None = None) -> bytes:
        """The object as a Part 10 file, converted to ``transfer_syntax`` if given and different."""
        if transfer_syntax in (None, record.transfer_syntax):
            return self.read(record)
        body = self.dataset_bytes(record, transfer_syntax)
        return file_meta_bytes(record.sop_class_uid, record.sop_uid, transfer_syntax) + body


def convert(data: bytes, transfer_syntax: str) -> pydicom.Dataset:
    """Decode Part 10 ``data`` and re-express it for ``transfer_syntax`` (uncompressed only)."""
    if transfer_syntax not in UNCOMPRESSED and transfer_syntax != EXPLICIT_VR_BIG_ENDIAN:
        raise UnsupportedTransferSyntax(f"cannot convert to {transfer_syntax}", uid=transfer_syntax)
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
    except Exception as exc:  # a codec missing or a broken stream
        raise UnsupportedTransferSyntax(f"cannot decode the stored object for conversion: {exc}") from exc
    return ds


def encode_dataset(ds: pydicom.Dataset, transfer_syntax: str) -> bytes:
    """Encode ``ds`` (without File Meta) in an uncompressed ``transfer_syntax``."""
    fp = DicomBytesIO()
    fp.is_little_endian = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    fp.is_implicit_VR = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    ds = ds.copy()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    write_dataset(fp, ds)
    return fp.getvalue()
