"""Find: the one search service behind C-FIND (PS3.4 C.4.1) and QIDO-RS (PS3.18 10.6)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bastion.errors import InvalidQuery
from bastion.index.base import Index
from bastion.model.attributes import tag_hex, vr_of
from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition, parse_condition
from bastion.model.records import JsonDataset

MAX_LIMIT = 10_000


@dataclass(frozen=True)
class QueryKey:
    """One attribute of a query: tag, keyword, VR and the value as text (``\\``-separated)."""

    tag: int
    keyword: str
    vr: str
    value: str


def conditions_for(keys: Iterable[QueryKey], *, fuzzy: bool = False, comma_lists: bool = False) -> list[Condition]:
    """Parse query keys into matching conditions (PS3.4 C.2.2.2)."""
    out = []
    for key in keys:
        vr = key.vr if key.vr not in ("", "UN") else vr_of(key.tag)
        out.append(parse_condition(key.keyword, key.tag, vr, key.value, fuzzy=fuzzy, comma_lists=comma_lists))
    return out


class Finder:
    """Searches the index at one level; adapters pick the return keys."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def find(self, level: QueryLevel, conditions: list[Condition], *, limit: int | None = None,
             offset: int = 0) -> list[JsonDataset]:
        """Matches at ``level`` as DICOM JSON, in a stable order."""
        if limit is not None and (limit < 0 or limit > MAX_LIMIT):
            raise InvalidQuery(f"limit must be between 0 and {MAX_LIMIT}")
        if offset < 0:
            raise InvalidQuery("offset must not be negative")
        return self.index.find(level, conditions, limit=limit, offset=offset)


def select_keys(result: JsonDataset, tags: Iterable[int], *, empty_for_missing: bool) -> JsonDataset:
    """The elements of ``result`` named by ``tags``; missing ones empty (C-FIND) or left out (QIDO)."""
    out: JsonDataset = {}
    for tag in tags:
        key = tag_hex(tag)
        element = result.get(key)
        if element is not None:
            out[key] = element
        elif empty_for_missing:
            out[key] = {"vr": vr_of(tag)}
    return out
