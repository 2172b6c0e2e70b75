"""The one store pipeline for every origin: parse → validate → hash → blobs → index → change."""

from bastion.ingest.pipeline import Ingest, PendingObject

__all__ = ["Ingest", "PendingObject"]
