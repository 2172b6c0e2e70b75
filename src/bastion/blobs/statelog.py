"""The state log: archive state that is not an object, kept in the blob store(s) beside the objects.

The stored files are the truth and the index is rebuilt from them; a study's deletion (its tombstone), its
undeletion and its purge are archive state, so they are written where ``bastion index rebuild`` and the rebuild at
start find them again: as write-once objects of the blob store, one per entry, under

    ``state/<node>/<time ns, 20 digits>-<uuid>.json``

written through :meth:`BlobStore.put` (on a :class:`bastion.blobs.copies.Copies`: into every store, as an object
is), never changed and never removed by Bastion. A node writes under its own name, so nodes sharing a blob store
never write the same key. The log is read whole (:meth:`StateLog.entries`) and folded per study in the order of
the entries' times (:func:`fold`): the latest entry of a study says its state.

Entry (JSON object): ``action`` (``delete``, ``undelete`` or ``purge``), ``study``, ``time_ns``, ``at`` (ISO 8601
UTC), ``node``, ``user``, ``role``, ``via``, ``address``, ``reason``, ``patient_id``, ``count`` (instances).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from bastion.blobs.base import BlobStore
from bastion.errors import BastionError

log = logging.getLogger("bastion.blobs")

#: The key prefix of the state log's objects (never an object key: :func:`bastion.model.records.parse_object_key`
#: does not parse it, so the rebuild and the repair's listing of objects leave them out).
STATE_PREFIX = "state/"
#: The actions an entry records.
DELETE, UNDELETE, PURGE = "delete", "undelete", "purge"
ACTIONS = (DELETE, UNDELETE, PURGE)


@dataclass(frozen=True)
class StateEntry:
    """One entry of the state log (see the module docstring)."""

    action: str
    study: str
    time_ns: int
    at: str
    node: str = ""
    user: str = ""
    role: str = ""
    via: str = ""
    address: str = ""
    reason: str = ""
    patient_id: str = ""
    count: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StateEntry:
        """The entry ``data`` holds; ValueError if it is not one."""
        if not isinstance(data, dict) or data.get("action") not in ACTIONS or not isinstance(data.get("study"), str):
            raise ValueError("not a state-log entry")
        fields = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        fields["time_ns"] = int(fields.get("time_ns", 0))
        fields["count"] = int(fields.get("count", 0))
        return cls(**fields)


class StateLog:
    """The append-only state log of the blob store ``blobs``, written by node ``node_id``."""

    def __init__(self, blobs: BlobStore, node_id: str = "", clock: Callable[[], int] = time.time_ns) -> None:
        self.blobs = blobs
        self.node_id = node_id or "node"
        self._clock = clock

    def append(self, action: str, study: str, **fields: Any) -> StateEntry:
        """Write a new entry, durably in the blob store(s) when this returns (StorageError otherwise); the entry."""
        if action not in ACTIONS:
            raise ValueError(f"unknown state-log action {action!r}")
        now = self._clock()
        at = datetime.fromtimestamp(now / 1e9, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        entry = StateEntry(action, study, now, at, node=self.node_id, **fields)
        key = f"{STATE_PREFIX}{self.node_id}/{now:020d}-{uuid.uuid4().hex}.json"
        self.blobs.put(key, json.dumps(entry.to_json(), sort_keys=True).encode())
        return entry

    def keys(self) -> list[str]:
        """Every entry's key, oldest first (by the time in its name, then the name)."""
        found = [key for key in self.blobs.keys(STATE_PREFIX) if key.endswith(".json")]
        return sorted(found, key=lambda k: (k.rsplit("/", 1)[-1], k))

    def entries(self) -> list[StateEntry]:
        """Every entry, oldest first; one that cannot be read is logged and left out."""
        out: list[StateEntry] = []
        for key in self.keys():
            try:
                out.append(StateEntry.from_json(json.loads(self.blobs.get(key))))
            except (BastionError, OSError, ValueError) as exc:
                log.error("state log: %s cannot be read: %s", key, exc)
        out.sort(key=lambda e: (e.time_ns, e.node))
        return out


def fold(entries: Iterable[StateEntry]) -> dict[str, tuple[StateEntry, StateEntry | None]]:
    """The state of each study the log names: its latest entry, and the ``delete`` entry it follows (its tombstone:
    None after an undelete). A study whose latest entry is ``undelete`` is live again and left out."""
    state: dict[str, tuple[StateEntry, StateEntry | None]] = {}
    for entry in entries:
        if entry.action == DELETE:
            state[entry.study] = (entry, entry)
        elif entry.action == UNDELETE:
            state.pop(entry.study, None)
        else:
            state[entry.study] = (entry, state.get(entry.study, (entry, None))[1])
    return state
