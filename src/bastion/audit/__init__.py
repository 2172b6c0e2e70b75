"""The audit trail: who did what to which patient's images, on a record that cannot be edited unnoticed.

Adapters (DIMSE, DICOMweb, the JSON API, the CLI) describe each access as an :class:`AuditEvent` and hand it to
the archive's :class:`AuditLog` (``archive.audit.record(event)``); recording never blocks or fails the access it
describes. The events carry the fields of a DICOM audit message (PS3.15 A.5).

:mod:`~bastion.audit.chain` (the hash chain and its check), :mod:`~bastion.audit.log` (the batched writer),
:mod:`~bastion.audit.messages` (the PS3.15 A.5 message of an entry), :mod:`~bastion.audit.export` (JSON lines,
RFC 5424 syslog, RFC 5425 over TLS), :mod:`~bastion.audit.tally` (stores counted per study, recorded once).
"""

from bastion.audit.events import AuditEvent, AuditKind, Outcome
from bastion.audit.log import AuditLog
from bastion.audit.tally import StoreTally

#: The audit log's directory inside the data directory (:mod:`bastion.audit.chain` describes its files).
AUDIT_DIR = "audit"

__all__ = ["AUDIT_DIR", "AuditEvent", "AuditKind", "AuditLog", "Outcome", "StoreTally"]
