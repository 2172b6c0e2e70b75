"""What recording one stored object writes into the index, worked out before the index transaction.

A :class:`IndexRow` holds the texts of its four levels' DICOM JSON and the two column values every record
needs; the level dicts themselves are needed only when a level row is (re)written, which most instances of a
series do not cause.
"""

from __future__ import annotations

from dataclasses import dataclass

from bastion.index.columns import INSTANCE_NUMBER, MODALITY, column_value
from bastion.model import dicom_json
from bastion.model.levels import QueryLevel
from bastion.model.records import InstanceRecord, JsonDataset, StoredObject


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
