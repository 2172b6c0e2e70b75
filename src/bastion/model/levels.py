"""Query/Retrieve levels and information models (PS3.4 C.3, C.6)."""

from __future__ import annotations

from enum import Enum


class QueryLevel(str, Enum):
    """The four levels of the Query/Retrieve information model (PS3.4 C.3)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"

    @property
    def unique_key(self) -> str:
        """The keyword of the level's unique key (PS3.4 C.6.1.1 / C.6.2.1)."""
        return _UNIQUE_KEYS[self]

    @property
    def depth(self) -> int:
        """0 for PATIENT down to 3 for IMAGE."""
        return _ORDER.index(self)

    def parents(self) -> tuple[QueryLevel, ...]:
        """The levels above this one, top first."""
        return _ORDER[: self.depth]

    @classmethod
    def parse(cls, text: str) -> QueryLevel:
        """Parse a QueryRetrieveLevel value (``INSTANCE`` is accepted for ``IMAGE``)."""
        value = text.strip().upper()
        if value == "INSTANCE":
            value = "IMAGE"
        return cls(value)


_ORDER = (QueryLevel.PATIENT, QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE)
_UNIQUE_KEYS = {
    QueryLevel.PATIENT: "PatientID",
    QueryLevel.STUDY: "StudyInstanceUID",
    QueryLevel.SERIES: "SeriesInstanceUID",
    QueryLevel.IMAGE: "SOPInstanceUID",
}
