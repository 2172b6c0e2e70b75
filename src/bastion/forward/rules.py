"""Which destinations a newly stored instance goes to: the ``[[forward]]`` rules' ``match`` (PS3.4 C.2.2.2
matching, :mod:`bastion.model.matching`) applied to attributes the change log does not carry.

Where each attribute is read from:

* ``Modality``, ``StationName``, ``StudyDescription``: the index's series row (with its study's attributes),
  one query per series, cached;
* ``SOPClassUID``: the index's current version of the instance;
* ``CallingAETitle``: the stored object's File Meta Source Application Entity Title (0002,0016), which ingest
  sets to the calling AE title of the association that stored it (C-STORE). An object stored by STOW-RS or
  ``bastion import`` keeps the Source AE Title it arrived with, if any. Read (its first bytes) only when a rule
  needs it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from bastion.blobs.base import BlobStore
from bastion.errors import BastionError
from bastion.index.base import Change, Index
from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition, MatchType, matches
from bastion.model.part10 import file_meta_elements
from bastion.model.records import JsonDataset
from bastion.model.remotes import ForwardRule

log = logging.getLogger("bastion.forward")

#: Series whose attributes are kept in memory (the instances of a series arrive together).
SERIES_CACHE = 256
_SOURCE_AE = 0x00020016
_SOP_CLASS = 0x00080016
_HEAD = 4096  # the File Meta Information fits easily


def source_aet(head: bytes) -> str:
    """The Source Application Entity Title (0002,0016) in the File Meta Information at the start of Part 10
    ``head``; ``""`` when absent or not a Part 10 file."""
    for tag, start, length in file_meta_elements(head):
        if tag == _SOURCE_AE:
            return head[start: start + length].decode("ascii", "replace").strip(" \x00")
    return ""


class Router:
    """The destinations of each change, by the rules (see the module docstring)."""

    def __init__(self, rules: Sequence[ForwardRule], index: Index, blobs: BlobStore) -> None:
        self.rules = [(rule.name, rule.conditions()) for rule in rules]
        self.index = index
        self.blobs = blobs
        self._series: OrderedDict[str, JsonDataset] = OrderedDict()

    @property
    def destinations(self) -> list[str]:
        """Every destination's name, in the rules' order."""
        return list(dict.fromkeys(name for name, _ in self.rules))

    def route(self, change: Change) -> list[str]:
        """The destinations whose rules ``change``'s instance matches (none for an instance gone meanwhile)."""
        attributes: dict[int, Any] = {}
        out: list[str] = []
        for name, conditions in self.rules:
            if name not in out and all(matches(c, self._element(c, change, attributes)) for c in conditions):
                out.append(name)
        return out

    def _element(self, cond: Condition, change: Change, found: dict[int, Any]) -> Any:
        """The DICOM JSON element ``cond`` tests, for ``change``'s instance (looked up once per change)."""
        if cond.kind is MatchType.UNIVERSAL:
            return None
        if cond.tag not in found:
            if cond.tag == _SOURCE_AE:
                aet = self._source_aet(change)
                found[cond.tag] = {"vr": "AE", "Value": [aet]} if aet else None
            elif cond.tag == _SOP_CLASS:
                record = self.index.current(change.sop_uid)
                found[cond.tag] = None if record is None else {"vr": "UI", "Value": [record.sop_class_uid]}
            else:
                found[cond.tag] = self._series_attributes(change).get(f"{cond.tag:08X}")
        return found[cond.tag]

    def _source_aet(self, change: Change) -> str:
        """The stored object's Source AE Title; ``""`` (no match) when the object cannot be read, logged: one
        unreadable object must not hold up the change log behind it."""
        try:
            with self.blobs.open(change.blob_key) as fh:
                return source_aet(fh.read(_HEAD))
        except (OSError, BastionError) as exc:
            log.warning("forwarding: cannot read %s for its calling AE title: %s", change.blob_key, exc)
            return ""

    def _series_attributes(self, change: Change) -> JsonDataset:
        """The index's row of the change's series, with its study's attributes (cached)."""
        attrs = self._series.get(change.series_uid)
        if attrs is None:
            rows = self.index.find(QueryLevel.SERIES, [
                Condition("StudyInstanceUID", 0x0020000D, "UI", MatchType.SINGLE, (change.study_uid,)),
                Condition("SeriesInstanceUID", 0x0020000E, "UI", MatchType.SINGLE, (change.series_uid,))], limit=1)
            attrs = rows[0] if rows else {}
            self._series[change.series_uid] = attrs
            if len(self._series) > SERIES_CACHE:
                self._series.popitem(last=False)
        return attrs
