"""What recording one stored object writes into the index, worked out before the index transaction.

A :class:`IndexRow` holds the texts of its four levels' DICOM JSON and the two column values every record
needs; the level dicts themselves are needed only when a level row is (re)written, which most instances of a
series do not cause.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bastion.index.columns import INSTANCE_NUMBER, MODALITY, column_value
from bastion.index.schema import SUMMARY_SEP
from bastion.model import dicom_json
from bastion.model.digest import BLAKE3_PREFIX
from bastion.model.levels import QueryLevel
from bastion.model.records import InstanceRecord, JsonDataset, StoredObject, StoreStatus


@dataclass(frozen=True, slots=True)
class IndexRow:
    """One stored object as the index records it."""

    instance: InstanceRecord
    patient_id: str
    stamp: str
    texts: tuple[str, str, str, str]  # the DICOM JSON of its series, study, patient and image levels
    instance_number: int | None
    modality: str
    attrs: dict[QueryLevel, JsonDataset]  # the level dicts, for a level row that is (re)written

    @classmethod
    def of(cls, obj: StoredObject) -> IndexRow:
        a = obj.attrs
        # the image level is the instance's own: remembering its text would only push out its series' and study's
        texts = (dicom_json.level_text(a[QueryLevel.SERIES]), dicom_json.level_text(a[QueryLevel.STUDY]),
                 dicom_json.level_text(a[QueryLevel.PATIENT]), dicom_json.dumps(a[QueryLevel.IMAGE]).decode())
        return cls(obj.instance, obj.patient_id, obj.stamp, texts,
                   column_value(a[QueryLevel.IMAGE], INSTANCE_NUMBER, True),
                   column_value(a[QueryLevel.SERIES], MODALITY, False), a)


def status_against(row: IndexRow, current: tuple[str, str, str] | None,
                   same_content: Callable[[str], bool] | None = None) -> StoreStatus:
    """What recording ``row`` does, given the instance's current version (its blob key, digest and stamp; None:
    not indexed), in every index backend:

    * STORED: the instance is new;
    * DUPLICATE: the current version holds the same content (same digest; one of another algorithm, SHA-256 from
      before BLAKE3, is compared by ``same_content`` where it is given, and is superseded where it is not);
    * OUTDATED: ``row`` is older than the current version by stamp, then key, the order of ``bastion index rebuild``:
      it is kept as a superseded version, so the live index and a rebuilt one agree;
    * SUPERSEDED: ``row`` becomes the current version.
    """
    if current is None:
        return StoreStatus.STORED
    key, digest, stamp = current
    inst = row.instance
    if digest == inst.digest or (same_content is not None and not digest.startswith(BLAKE3_PREFIX)
                                 and same_content(digest)):
        return StoreStatus.DUPLICATE
    if (stamp, key) > (row.stamp, inst.blob_key):
        return StoreStatus.OUTDATED
    return StoreStatus.SUPERSEDED


#: The series row (modality, same attrs, study_uid), the study row (modalities, sop_classes, same attrs,
#: patient_id) and the patient row (same attrs,) of a :data:`~bastion.index.sqlite_record.LOOKUP`-shaped result; None where the row does not exist.
Levels = tuple[tuple[Any, ...] | None, tuple[Any, ...] | None, tuple[Any, ...] | None]


def levels_of(row: tuple[Any, ...]) -> Levels:
    """The level rows of a :data:`~bastion.index.sqlite_record.LOOKUP`-shaped row (the instance's current version, then its series, study and
    patient rows), None where a row does not exist."""
    return (row[6:9] if row[7] is not None else None, row[9:13] if row[11] is not None else None,
            row[13:14] if row[13] is not None else None)


def joined_summary(values: set[str]) -> str:
    """ModalitiesInStudy / SOPClassesInStudy as their column holds them: sorted, ``\\``-joined."""
    return SUMMARY_SEP.join(sorted(v for v in values if v))


def split_summary(text: str) -> set[str]:
    """The values of a summary column (:func:`joined_summary`)."""
    return set(text.split(SUMMARY_SEP)) if text else set()


@functools.lru_cache(maxsize=4)
def _iso_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def now_iso() -> str:
    """Now in UTC as ``datetime.isoformat(timespec="milliseconds")`` writes it (the form of ``changes.at``)."""
    second, ns = divmod(time.time_ns(), 1_000_000_000)
    return f"{_iso_second(second)}.{ns // 1_000_000:03d}+00:00"
