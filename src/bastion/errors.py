"""Bastion's exception tree.

Every error carries the protocol data an adapter needs to answer: a DIMSE status
(PS3.7 Annex C) and an HTTP status (PS3.18 8.x). Adapters never guess from prose.

::

    BastionError                      status 0xC000, HTTP 500
    ├── InvalidObject                 status 0xC000 (cannot understand), HTTP 400
    │   ├── MissingAttribute          a required attribute is absent or empty
    │   ├── InvalidUID                a UID breaks PS3.5 9.1
    │   └── CommandMismatch           dataset UIDs disagree with the C-STORE command (0xA900)
    ├── UnsupportedTransferSyntax     0xC000, HTTP 415
    ├── StorageFull                   0xA700 (out of resources), HTTP 507
    ├── StorageError                  0xA701, HTTP 503: the blob store failed
    │   └── CorruptObject             no copy of an object matches its digest
    ├── IndexFailure                 0xA702, HTTP 503: the index failed
    │   └── CommitOutcomeUnknown      the connection was lost during the commit: it may have happened
    ├── NotFound                      0xC000, HTTP 404: no such study / series / instance
    ├── StudyDeleted                  0x0124 (refused: not authorized), HTTP 409: the study is deleted
    ├── InvalidQuery                  0xA900 (identifier does not match SOP class), HTTP 400
    ├── UnknownDestination            0xA801 (move destination unknown), HTTP 400
    └── SettingsError                 a setting has a value Bastion cannot use (bastion.settings)
"""

from __future__ import annotations


class BastionError(Exception):
    """Base of every error Bastion raises on purpose."""

    dimse_status: int = 0xC000
    http_status: int = 500
    #: Seconds after which the same request may succeed (HTTP ``Retry-After``); None: it would fail again.
    retry_after: int | None = None

    def __init__(self, message: str, *, tag: int | None = None, uid: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.tag = tag
        self.uid = uid


class InvalidObject(BastionError):
    """The object cannot be understood or breaks a rule of PS3.3 / PS3.5."""

    dimse_status = 0xC000
    http_status = 400


class MissingAttribute(InvalidObject):
    """A required attribute is missing or empty."""


class InvalidUID(InvalidObject):
    """A UID is not a valid PS3.5 9.1 UID."""


class CommandMismatch(InvalidObject):
    """The dataset's SOP Class/Instance UID disagrees with the C-STORE command (PS3.4 B.2.3)."""

    dimse_status = 0xA900


class UnsupportedTransferSyntax(BastionError):
    """A transfer syntax Bastion cannot store or convert."""

    dimse_status = 0xC000
    http_status = 415


class StorageFull(BastionError):
    """No space left in the blob store (PS3.4 B.2.3 Refused: Out of Resources)."""

    dimse_status = 0xA700
    http_status = 507


class StorageError(BastionError):
    """The blob store failed to write or read."""

    dimse_status = 0xA701
    http_status = 503
    retry_after: int | None = 5  # a database or store failing over, a network blip


class CorruptObject(StorageError):
    """No copy of a stored object holds the bytes its digest names (bit rot, a damaged disk): nothing is served."""

    retry_after = None  # a repair from another copy, or a re-send of the original, is needed


class IndexFailure(BastionError):
    """The index failed to commit or answer."""

    dimse_status = 0xA702
    http_status = 503
    retry_after = 5  # a database or store failing over, a network blip


class CommitOutcomeUnknown(IndexFailure):
    """The index's connection was lost while it committed (a database failing over): the record may or may not
    be in the index. The store is answered as failed (the sender sends it again: a duplicate, if it was recorded),
    and its object is kept: were it recorded, removing it would leave the index naming an object that is gone."""


class NotFound(BastionError):
    """No such patient, study, series or instance."""

    dimse_status = 0xC000
    http_status = 404


class StudyDeleted(BastionError):
    """The study is deleted (tombstoned, :mod:`bastion.ingest.deletion`): a store into it is refused (PS3.7 C.5:
    0x0124 Refused: Not Authorized), and so is deleting it again (HTTP 409 Conflict)."""

    dimse_status = 0x0124
    http_status = 409


class InvalidQuery(BastionError):
    """A query identifier or QIDO parameter is malformed (PS3.4 C.4.1.1.4 0xA900)."""

    dimse_status = 0xA900
    http_status = 400


class UnknownDestination(BastionError):
    """A C-MOVE destination AE title is not configured (PS3.4 C.4.2.1.4 0xA801)."""

    dimse_status = 0xA801
    http_status = 400


class SettingsError(BastionError):
    """A setting has a value Bastion cannot use."""
