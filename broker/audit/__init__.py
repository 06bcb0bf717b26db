"""The audit log and what feeds it: the hash-chained log (log), the entries it records
(items), refusal summaries (refusals), and the outbox drainer (drainer)."""

from broker.audit.backend import AuditBackend
from broker.audit.items import AuditItem
from broker.audit.log import AuditError, AuditLog, VerifyResult
from broker.audit.refusals import RefusalSummary

__all__ = ["AuditBackend", "AuditError", "AuditItem", "AuditLog", "RefusalSummary", "VerifyResult"]
