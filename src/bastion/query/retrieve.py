"""Retrieve: the one path that reads stored objects for C-MOVE, C-GET and WADO.

Objects are sent as stored when the peer accepts the stored transfer syntax; otherwise they
are converted (decompressed to Explicit/Implicit VR Little Endian) with pydicom. A conversion
changes the transfer syntax and the pixel encoding only: the SOP Instance UID and every other
identifying attribute stay those of the stored object.

What goes out over DIMSE is a valid encoding even where the stored bytes are not: a dataset
with an element of odd length (PS3.5 7.1.1) is re-encoded with those values padded to even
length, and a deflated stream of odd length gets one trailing zero byte (PS3.5 A.5), so that
every PDV fragment has even length too (PS3.8 9.3.5.1). The
stored bytes are never changed, and WADO serves them as stored.
"""

from __future__ import annotations

import io
import logging
import zlib
from collections.abc import Sequence
from typing import BinaryIO

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from bastion.blobs.base import BlobStore
from bastion.errors import UnsupportedTransferSyntax
from bastion.index.base import Index
from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition
from bastion.model.part10 import dataset_offset, file_meta_bytes
from bastion.model.records import InstanceRecord
from bastion.model.uids import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    UNCOMPRESSED,
)
from bastion.query.odd_lengths import has_odd_length_element

log = logging.getLogger("bastion.retrieve")

#: The attributes that identify an object (PS3.3 C.12.1, C.7.1.1, C.7.2.1, C.7.3.1): a conversion never changes them.
IDENTIFYING_KEYWORDS = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID")
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010


class Retriever:
    """Finds the instances a retrieve names and reads them in the syntax the peer accepts."""

    def __init__(self, index: Index, blobs: BlobStore) -> None:
        self.index = index
        self.blobs = blobs

    def select(self, level: QueryLevel, conditions: Sequence[Condition]) -> list[InstanceRecord]:
        """Current instances at or under the entities matching ``conditions``."""
        return self.index.instances(level, conditions)

    def open(self, record: InstanceRecord) -> BinaryIO:
        """The stored Part 10 file, for streaming: a copy whose bytes match its digest
        (:meth:`BlobStore.open_verified`; with several blob stores the first good one)."""
        return self.blobs.open_verified(record.blob_key)

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
        """The stored Part 10 file, whole (checked as :meth:`open` checks it)."""
        with self.open(record) as fh:
            return fh.read()

    def choose_syntax(self, record: InstanceRecord, accepted: Sequence[str]) -> str | None:
        """The transfer syntax to send ``record`` in, from those a peer accepts; None if none works."""
        if record.transfer_syntax in accepted:
            return record.transfer_syntax
        for ts in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN):
            if ts in accepted:
                return ts
        return None

    def dataset_bytes(self, record: InstanceRecord, transfer_syntax: str) -> bytes:
        """The dataset (no File Meta) encoded in ``transfer_syntax``; as stored when that is the stored syntax.

        Deflated Explicit VR Little Endian is made from the Explicit VR Little Endian encoding (PS3.5 A.5).
        """
        if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN and record.transfer_syntax != transfer_syntax:
            plain = self.dataset_bytes(record, EXPLICIT_VR_LITTLE_ENDIAN)
            return deflate(even_dataset(plain, EXPLICIT_VR_LITTLE_ENDIAN) if len(plain) % 2 else plain)
        data = self.read(record)
        if transfer_syntax == record.transfer_syntax:
            return data[dataset_offset(data):]
        return encode_dataset(convert(data, transfer_syntax), transfer_syntax)

    def open_for_dimse(self, record: InstanceRecord, transfer_syntax: str) -> BinaryIO:
        """The dataset of a C-STORE-RQ sending ``record`` in ``transfer_syntax``, ready to stream.

        Its length is even, so every PDV fragment is (PS3.8 9.3.5.1), and so is every element's (PS3.5 7.1.1).
        In the stored syntax it is the stored file's dataset, streamed, when that has even length and none of
        its elements has odd length (:func:`~bastion.query.odd_lengths.has_odd_length_element` reads the element
        headers only); otherwise it is re-encoded by :func:`even_dataset`. In another syntax it is converted
        (:func:`convert`), which pads every value to even length.
        """
        if transfer_syntax != record.transfer_syntax:
            return io.BytesIO(self.dataset_bytes(record, transfer_syntax))
        fh = self.open_dataset(record)
        try:
            start = fh.tell()
            odd = (fh.seek(0, io.SEEK_END) - start) % 2
            fh.seek(start)
            if not odd:
                odd = has_odd_length_element(fh, transfer_syntax)
                fh.seek(start)
                if not odd:
                    return fh
            data = fh.read()
        except BaseException:
            fh.close()
            raise
        fh.close()
        log.info("instance %s has an element or a dataset of odd length: re-encoded to send it", record.sop_uid)
        return io.BytesIO(even_dataset(data, transfer_syntax))

    def part10_bytes(self, record: InstanceRecord, transfer_syntax: str | None = None) -> bytes:
        """The object as a Part 10 file, converted to ``transfer_syntax`` if given and different."""
        if transfer_syntax in (None, record.transfer_syntax):
            return self.read(record)
        body = self.dataset_bytes(record, transfer_syntax)
        return file_meta_bytes(record.sop_class_uid, record.sop_uid, transfer_syntax) + body


def identity(ds: pydicom.Dataset) -> dict[str, str | None]:
    """The identifying attributes of ``ds`` (:data:`IDENTIFYING_KEYWORDS`), as text."""
    return {k: (str(ds[k].value) if k in ds else None) for k in IDENTIFYING_KEYWORDS}


def convert(data: bytes, transfer_syntax: str) -> pydicom.Dataset:
    """Decode Part 10 ``data`` and re-express it for ``transfer_syntax`` (uncompressed only).

    Decompression (PS3.5 8.2, A.4) replaces Pixel Data and the Image Pixel attributes that describe its encoding
    (Photometric Interpretation, Planar Configuration) and nothing else: the SOP Instance UID stays the stored
    one (pydicom's ``decompress`` would mint a new one by default), and a conversion that changed any of
    :data:`IDENTIFYING_KEYWORDS` raises instead of sending another object. Every value of odd length is padded
    to even length when the result is encoded (:func:`pad_odd_lengths`).
    """
    if transfer_syntax not in UNCOMPRESSED and transfer_syntax != EXPLICIT_VR_BIG_ENDIAN:
        raise UnsupportedTransferSyntax(f"cannot convert to {transfer_syntax}", uid=transfer_syntax)
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        before = identity(ds)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress(generate_instance_uid=False)
        pad_odd_lengths(ds)
    except Exception as exc:  # a codec missing or a broken stream
        raise UnsupportedTransferSyntax(f"cannot decode the stored object for conversion: {exc}") from exc
    if identity(ds) != before:
        raise UnsupportedTransferSyntax(f"converting {before['SOPInstanceUID']} to {transfer_syntax} would change "
                                        f"its identifying attributes", uid=transfer_syntax)
    return ds


def pad_odd_lengths(ds: pydicom.Dataset) -> None:
    """Make pydicom write every element of ``ds`` with an even value length (PS3.5 7.1.1), nested ones too.

    pydicom writes an element it has not decoded exactly as read, odd length included, and pads a decoded
    one (text with a space, UIDs and OB with 00H); a binary value of odd length (UN, and so any private value
    in Implicit VR) is padded with 00H here. Only the elements of odd length are decoded here,
    and sequences to reach their items: every other element keeps its stored bytes. Encapsulated Pixel Data
    (undefined length) is left alone.
    """
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement):
            length = elem.length
            vr = elem.VR
            if vr is None:  # implicit VR: a sequence is known by the data dictionary only
                try:
                    vr = dictionary_VR(tag)
                except KeyError:
                    vr = None
            if tag == _PIXEL_DATA and length == _UNDEFINED_LENGTH:
                continue
            if not (length % 2 or vr == "SQ" or length == _UNDEFINED_LENGTH):
                continue
            elem = ds[tag]  # decoded: written padded, or a sequence whose items are walked next
            if isinstance(elem.value, bytes) and len(elem.value) % 2:
                elem.value += b"\x00"  # pydicom pads OB but writes UN (and a private tag in Implicit VR) as is
        if elem is not None and elem.VR == "SQ":
            for item in elem.value:
                pad_odd_lengths(item)


def even_dataset(data: bytes, transfer_syntax: str) -> bytes:
    """Dataset bytes ``data`` (no File Meta) in ``transfer_syntax``, re-encoded to even length for DIMSE.

    Deflated (PS3.5 A.5): the deflated stream followed by one 00H byte, which the standard allows for exactly
    this. Otherwise the dataset is decoded with pydicom and written again in the same syntax with every
    element of odd length padded (:func:`pad_odd_lengths`); every other element keeps its bytes.
    """
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        return data + b"\x00" if len(data) % 2 else data
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    little = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    try:
        ds = read_dataset(io.BytesIO(data), implicit, little)
        pad_odd_lengths(ds)
    except Exception as exc:
        raise UnsupportedTransferSyntax(f"cannot re-encode a dataset of odd length: {exc}",
                                        uid=transfer_syntax) from exc
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = little, implicit
    write_dataset(fp, ds)
    out = fp.getvalue()
    if len(out) % 2:
        raise UnsupportedTransferSyntax("a dataset of odd length stays odd when re-encoded", uid=transfer_syntax)
    return out


def deflate(dataset: bytes) -> bytes:
    """Explicit VR Little Endian ``dataset`` as Deflated Explicit VR Little Endian: raw deflate (RFC 1951), one
    00H byte added to an odd-length stream (PS3.5 A.5)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = compressor.compress(dataset) + compressor.flush()
    return out + b"\x00" if len(out) % 2 else out


def encode_dataset(ds: pydicom.Dataset, transfer_syntax: str) -> bytes:
    """Encode ``ds`` (without File Meta) in an uncompressed ``transfer_syntax``."""
    fp = DicomBytesIO()
    fp.is_little_endian = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    fp.is_implicit_VR = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    ds = ds.copy()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    write_dataset(fp, ds)
    return fp.getvalue()
