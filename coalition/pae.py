"""Pre-authentication encoding (DSSE) for domain-separated signatures.

Every signature in Coalition is over ``pae(payload_type, body)`` where body is
the exact serialized bytes that travel; structures are never re-serialized
before verification.
"""

from __future__ import annotations

HEADER_TYPE = "application/vnd.coalition.header.v1+proto"
KEY_BUNDLE_TYPE = "application/vnd.coalition.key-bundle.v1+proto"
AUDIT_CHECKPOINT_TYPE = "application/vnd.coalition.audit-checkpoint.v1"
# Envelope v2: the batch root a publisher signs (coalition.envelope_v2).
BATCH_ROOT_TYPE = "application/vnd.coalition.batch-root.v2+proto"
# Federation: a receiving broker's custody receipt (coalition.federation).
CUSTODY_RECEIPT_TYPE = "application/vnd.coalition.custody-receipt.v1+proto"


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSEv1 PAE: "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)
