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

#: The levels whose text an :class:`IndexRow` holds, in the order of :attr:`IndexRow.texts`.
TEXT_LEVELS = (QueryLevel.SERIES, QueryLevel.STUDY, QueryLevel.PATIENT, QueryLevel.IMAGE)


@dataclass(frozen=True, slots=True)
class IndexRow:
    """One stored object as the index records it."""

    instance: InstanceRecord
    patient_id: str
    stamp: str
    texts: tuple[str, str, str, str]  # the DICOM JSON of its series, study, patient and image levels
    instance_number: int | None
    modality: str
    attrs: dict[QueryLevel, JsonDataset] | None = None  # the level dicts where they are at hand

    @classmethod
    def of(cls, obj: StoredObject) -> IndexRow:
        a = obj.attrs
        # the image level is the instance's own: remembering its text would only push out its series' and study's
        texts = (dicom_json.level_text(a[QueryLevel.SERIES]), dicom_json.level_text(a[QueryLevel.STUDY]),
                 dicom_json.level_text(a[QueryLevel.PATIENT]), dicom_json.dumps(a[QueryLevel.IMAGE]).decode())
        return cls(obj.instance, obj.patient_id, obj.stamp, texts,
                   column_value(a[QueryLevel.IMAGE], INSTANCE_NUMBER, True),
                   column_value(a[QueryLevel.SERIES], MODALITY, False), a)

    def level(self, level: QueryLevel) -> JsonDataset:
        """One level's DICOM JSON (parsed from its text for a row that came over the wire)."""
        if self.attrs is not None:
            return self.attrs[level]
        return dicom_json.loads(self.texts[TEXT_LEVELS.index(level)])  # type: ignore[no-any-return]
