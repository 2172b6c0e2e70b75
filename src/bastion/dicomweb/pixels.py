"""Frames and bulk data read from stored objects (PS3.18 10.4.1.1.3 Frames, 10.4.1.1.5 Bulkdata).

Frames of compressed objects are returned as stored (one encapsulated frame each, PS3.5
A.4) or decoded to native little-endian pixels with pydicom's decoders; frames of native
objects are slices of Pixel Data. Bulk data is addressed by a tag path such as
``7FE00010`` or ``00540016/0/00181072`` (sequence tag / item index / tag).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import pack_bits

from bastion.errors import InvalidQuery, NotFound, UnsupportedTransferSyntax
from bastion.model.records import InstanceRecord
from bastion.model.uids import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    is_compressed,
)
from bastion.query.retrieve import Retriever

#: Stored syntaxes whose Pixel Data bytes are already native little-endian.
NATIVE_LE = frozenset({EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN})
PIXEL_DATA = 0x7FE00010


def load_dataset(retriever: Retriever, record: InstanceRecord) -> Dataset:
    """The stored object, parsed in full."""
    with retriever.open(record) as fh:
        data = fh.read()
    return pydicom.dcmread(io.BytesIO(data))


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames, 1 when absent, 0 when the object has no Pixel Data."""
    if "PixelData" not in ds:
        return 0
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def parse_frame_list(text: str) -> list[int]:
    """``"1,3,5"`` -> ``[1, 3, 5]`` (frame numbers start at 1, PS3.18 8.3.3.1.1)."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise InvalidQuery(f"frame number {item!r} is not a positive integer")
        out.append(int(item))
    if not out:
        raise InvalidQuery("no frame numbers given")
    return out


def decodable(transfer_syntax: str) -> bool:
    """True if pydicom has a working decoder for ``transfer_syntax``."""
    try:
        return bool(get_decoder(transfer_syntax).is_available)
    except (NotImplementedError, ValueError, KeyError):
        return False


def _frame_bits(ds: Dataset) -> int:
    """Bits of one native frame (1-bit frames need not end on a byte boundary)."""
    pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
    return pixels * int(ds.BitsAllocated)


def frame_array(ds: Dataset, index: int) -> np.ndarray:
    """Frame ``index`` (0-based) decoded to pixel values (colour as RGB)."""
    ts = str(ds.file_meta.TransferSyntaxUID)
    try:
        arr, _ = get_decoder(ts).as_array(ds, index=index)
    except Exception as exc:  # a codec missing or a broken stream
        raise UnsupportedTransferSyntax(f"cannot decode frame {index + 1}: {exc}", uid=ts) from exc
    return arr


def frames(ds: Dataset, numbers: Sequence[int], *, as_stored: bool) -> list[bytes]:
    """The bytes of frames ``numbers`` (1-based), as stored or as native little-endian pixels.

    Raises NotFound for a frame number past NumberOfFrames.
    """
    count = number_of_frames(ds)
    if count == 0:
        raise NotFound("the instance has no Pixel Data")
    bad = [n for n in numbers if n > count]
    if bad:
        raise NotFound(f"frame {bad[0]} does not exist (the instance has {count})")
    ts = str(ds.file_meta.TransferSyntaxUID)
    out = []
    for n in numbers:
        if is_compressed(ts) and as_stored:
            out.append(get_frame(ds.PixelData, n - 1, number_of_frames=count))
        elif ts in NATIVE_LE and _frame_bits(ds) % 8 == 0:
            size = _frame_bits(ds) // 8
            out.append(bytes(ds.PixelData[(n - 1) * size: n * size]))
        elif int(ds.BitsAllocated) == 1:
            out.append(pack_bits(frame_array(ds, n - 1)))  # frames of 1-bit data are bit-packed too
        else:
            arr = frame_array(ds, n - 1)
            out.append(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    return out


def parse_tag_path(path: str) -> list[int | str]:
    """``"00540016/0/00181072"`` -> ``[0x00540016, 0, 0x00181072]``; InvalidQuery if malformed."""
    parts = [p for p in path.strip("/").split("/") if p]
    out: list[int | str] = []
    for i, p in enumerate(parts):
        if i % 2 == 0:
            if len(p) != 8:
                raise InvalidQuery(f"bulk data path element {p!r} is not an 8-digit tag")
            try:
                out.append(int(p, 16))
            except ValueError as exc:
                raise InvalidQuery(f"bulk data path element {p!r} is not an 8-digit tag") from exc
        else:
            if not p.isdigit():
                raise InvalidQuery(f"bulk data path element {p!r} is not an item index")
            out.append(p)
    if not out or len(out) % 2 == 0:
        raise InvalidQuery("a bulk data path must end with a tag")
    return out


def bulk_value(ds: Dataset, path: str) -> bytes:
    """The raw value of the element at ``path`` (as stored; Pixel Data encapsulated if so)."""
    node: Any = ds
    steps = parse_tag_path(path)
    for i, step in enumerate(steps):
        if i % 2 == 0:
            assert isinstance(step, int)
            if step not in node:
                raise NotFound(f"no bulk data at {path}")
            node = node[step]
            if i == len(steps) - 1:
                break
            if node.VR != "SQ":
                raise NotFound(f"no bulk data at {path}")
        else:
            idx = int(step)
            if idx >= len(node.value):
                raise NotFound(f"no bulk data at {path}")
            node = node.value[idx]
    value = node.value
    if isinstance(value, bytes):
        return value
    if node.VR in ("OF", "OD", "OL", "OV", "FL", "FD", "SL", "UL", "SS", "US", "SV", "UV"):
        raise NotFound(f"the element at {path} is not stored as bulk data")
    if isinstance(value, str):
        return value.encode("utf-8")
    raise NotFound(f"the element at {path} is not bulk data")
