"""The audit trail: who did what to which patient's images, on a record that cannot be edited unnoticed.

Adapters (DIMSE, DICOMweb, the JSON API, the CLI) describe each access as an :class:`AuditEvent` and hand it to
the archive's :class:`AuditLog` (``archive.audit.record(event)``); recording never blocks or fails the access it
describes. The events carry the fields of a DICOM audit message (PS3.15 A.5).
"""

from bastion.audit.events import AuditEvent, AuditKind, Outcome
from bastion.audit.log import AuditLog

__all__ = ["AuditEvent", "AuditKind", "AuditLog", "Outcome"]
