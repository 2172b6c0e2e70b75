"""Records passed between the ingest pipeline, the index and retrieval. Pure data."""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from bastion.model.digest import DIGEST_PATTERN
from bastion.model.levels import QueryLevel

#: DICOM JSON model (PS3.18 F.2) of one level's attributes: ``{"0020000D": {"vr": "UI", "Value": [...]}}``.
JsonDataset = dict[str, Any]


class StoreStatus(str, Enum):
    """What storing one object did. Maps to DIMSE 0x0000 and HTTP 200 in every case."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # same SOP Instance UID, identical bytes: nothing new stored
    SUPERSEDED = "superseded"  # same SOP Instance UID, different bytes: new current version
    #: Same SOP Instance UID, different bytes, but an older stamp than the current version's (another node's
    #: clock is ahead, or two nodes stored versions at once): indexed as a superseded version. Between the index
    #: and the ingest only: the ingest stores such an object again under a newer stamp (``Ingest``).
    OUTDATED = "outdated"


@dataclass(frozen=True)
class InstanceRecord:
    """Where one current instance lives, as retrieval needs it."""

    sop_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax: str
    blob_key: str
    digest: str  # of the stored bytes (bastion.model.digest)
    size: int


@dataclass(frozen=True)
class StoredObject:
    """Everything the index records for one stored version of an instance.

    Every field is derived from the stored file and its blob key, which is what makes the
    index rebuildable (``bastion index rebuild``).
    """

    instance: InstanceRecord
    patient_id: str
    stamp: str  # ingest stamp, orders versions (from the blob key)
    attrs: dict[QueryLevel, JsonDataset] = field(default_factory=dict)


@dataclass(frozen=True)
class StoreResult:
    """The answer of the ingest pipeline for one object."""

    status: StoreStatus
    record: InstanceRecord
    seq: int | None = None  # change-log sequence of the change, None for a duplicate
    #: Why the object was accepted only with a warning (``bastion.ingest.header.Header.warnings``).
    warnings: tuple[str, ...] = ()
    #: The instance's Patient ID (what an audit message names the patient by, PS3.15 A.5.3.2).
    patient_id: str = ""


#: A node id: the identity of one node among those sharing an archive's blob store (the ``node_id`` setting).
NODE_ID_PATTERN = r"[A-Za-z0-9-]{1,32}"
_NODE_ID_RE = re.compile(NODE_ID_PATTERN)

_KEY_RE = re.compile(
    r"^(?P<partition>\d{4}/\d{2}/\d{2}/\d{2})/"
    r"(?P<sop>[0-9.]{1,128})_(?P<stamp>\d{20})(?:_(?P<node>" + NODE_ID_PATTERN + r"))?"
    r"_(?P<digest>" + DIGEST_PATTERN + r")\.dcm$"
)


def is_node_id(text: str) -> bool:
    """Whether ``text`` is a valid node id: 1-32 characters ``A-Z a-z 0-9 -``."""
    return _NODE_ID_RE.fullmatch(text) is not None


def object_key(sop_uid: str, stamp: str, digest: str, node: str = "") -> str:
    """The blob key of one stored version: ``YYYY/MM/DD/HH/<sop>_<stamp>_<node>_<digest>.dcm``.

    The partition is the UTC hour of the ingest stamp (nanoseconds since the epoch), so the
    objects stored since a given time can be listed without walking the whole store (crash
    recovery, incremental backup). The stamp orders versions of the same SOP Instance UID;
    the content digest (``b3-<hex>``, :mod:`bastion.model.digest`) lets ``verify`` detect corruption even after the index was rebuilt. The UID
    must already be checked identifiable (:func:`bastion.model.uids.is_identifiable_uid`: digits and dots, at
    most 128 characters), so keys are safe paths and a file name stays under 255 bytes.

    ``node`` is the id of the node that stored it (:func:`is_node_id`), so crash recovery on one node never
    takes up another node's objects in a shared blob store; without one the key has the form of a single-node
    archive, ``<sop>_<stamp>_<digest>.dcm``, which :func:`parse_object_key` reads as well.
    """
    if node:
        return f"{partition_of(stamp)}/{sop_uid}_{stamp}_{node}_{digest}.dcm"
    return f"{partition_of(stamp)}/{sop_uid}_{stamp}_{digest}.dcm"


def partition_of(stamp: str) -> str:
    """``YYYY/MM/DD/HH`` (UTC) of a nanosecond stamp."""
    return _partition_of_hour(int(stamp) // 3_600_000_000_000)


@functools.lru_cache(maxsize=64)
def _partition_of_hour(hour: int) -> str:
    return time.strftime("%Y/%m/%d/%H", time.gmtime(hour * 3600))


def parse_object_key(key: str) -> dict[str, str] | None:
    """The parts of a key made by :func:`object_key` (``partition``, ``sop``, ``stamp``, ``node``, ``digest``),
    or None for any other key. ``node`` is ``""`` for a key without one (a single-node archive's)."""
    m = _KEY_RE.match(key)
    if m is None:
        return None
    return {name: value or "" for name, value in m.groupdict().items()}
