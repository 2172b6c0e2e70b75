"""The index columns of a record, derived from each level's DICOM JSON (:data:`bastion.model.attributes.COLUMNS`).

Shared by the SQLite index's record path and the bulk loader (``benchmarks/bulkload.py``).
"""

from __future__ import annotations

from typing import Any

from bastion.index.sqlcompile import INTEGER_COLUMNS, INTEGER_RANGE
from bastion.model.attributes import COLUMNS, tag_hex, tag_of
from bastion.model.levels import QueryLevel
from bastion.model.records import JsonDataset

#: Per level: (DICOM JSON key, column, integer?) of :data:`COLUMNS`, worked out once.
_COLUMN_KEYS = {level: [(tag_hex(tag_of(keyword)), column, column in INTEGER_COLUMNS)
                        for keyword, column in columns.items()] for level, columns in COLUMNS.items()}

#: The DICOM JSON keys of the two columns the record path reads on every store.
MODALITY = tag_hex(tag_of("Modality"))
INSTANCE_NUMBER = tag_hex(tag_of("InstanceNumber"))


def _first_value(attrs: JsonDataset, key: str) -> Any:
    el = attrs.get(key)
    values = el.get("Value") if el else None
    if not values:
        return None
    v = values[0]
    return v.get("Alphabetic", "") if isinstance(v, dict) else v


def column_value(attrs: JsonDataset, key: str, integer: bool) -> Any:
    """One column's value: the first value of ``key`` as text, or as an integer in the sortable range
    (None where it is absent or not such a number)."""
    v = _first_value(attrs, key)
    if integer:
        try:
            number = int(v) if v is not None else None
        except (TypeError, ValueError):
            number = None
        return number if number is None or number in INTEGER_RANGE else None  # unsortable: as if absent
    return "" if v is None else str(v)


def columns_for(level: QueryLevel, attrs: JsonDataset) -> dict[str, Any]:
    """The index columns of ``level`` derived from that level's DICOM JSON (:data:`COLUMNS`)."""
    return {column: column_value(attrs, key, integer) for key, column, integer in _COLUMN_KEYS[level]}
