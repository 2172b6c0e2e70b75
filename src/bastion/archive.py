"""Composition root: builds the index, blob store, ingest, find and retrieve services once."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from bastion.blobs import BlobStore, open_blob_store
from bastion.index import Index, open_index
from bastion.ingest import Ingest
from bastion.ingest.rebuild import recover
from bastion.ingest.rejections import RejectionLog
from bastion.query.find import Finder
from bastion.query.retrieve import Retriever
from bastion.settings import Settings

log = logging.getLogger("bastion")

#: Present while an archive is open; found at start-up it means the last run crashed.
RUNNING_MARKER = ".running"


@dataclass
class Archive:
    """Everything the adapters (DIMSE, DICOMweb, CLI) use; no adapter builds its own."""

    settings: Settings
    blobs: BlobStore
    index: Index
    ingest: Ingest
    finder: Finder
    retriever: Retriever

    primary: bool = True

    @classmethod
    def open(cls, settings: Settings, *, primary: bool = True) -> Archive:
        """Open (creating if needed) the archive the settings describe.

        The primary opener (one per data directory) recovers from an unclean shutdown and
        marks the archive as running; extra worker processes open it with ``primary=False``.
        """
        settings.data.mkdir(parents=True, exist_ok=True)
        blobs = open_blob_store(settings.blob_location)
        index = open_index(settings.index_location)
        if primary:
            marker = settings.data / RUNNING_MARKER
            if marker.exists():
                log.warning("the previous run did not shut down cleanly: checking for unindexed objects")
                recover(blobs, index)
            marker.write_text(str(os.getpid()))
        return cls(settings, blobs, index, Ingest(blobs, index, RejectionLog(str(settings.data / "rejected.jsonl"))), Finder(index), Retriever(index, blobs), primary)

    def close(self) -> None:
        """Flush and close the index and blob store; the primary marks the shutdown clean."""
        self.index.close()
        self.blobs.close()
        if self.primary:
            (self.settings.data / RUNNING_MARKER).unlink(missing_ok=True)
