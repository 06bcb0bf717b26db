"""What the broker records: AuditItem, and how an item travels through an outbox.

An outbox (the message store's, the registry's) holds each record as text made by
encode() in the transaction of the change it records; the drainer (broker.audit.drainer)
turns it back into an AuditItem with decode() and appends it to the hash chain.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from broker.store.base import StoredMessage
from coalition.audit_chain import canonical_json
from coalition.v1 import audit_pb2

# json.dumps(fields, sort_keys=True, allow_nan=False), the same text, with the encoder
# built once: json.dumps with options constructs a new encoder on every call.
_OUTBOX_JSON = json.JSONEncoder(sort_keys=True, allow_nan=False)


@dataclass(frozen=True)
class AuditItem:
    """One entry to append (see AuditLog.record for the rules on detail)."""

    kind: str
    actor: str
    partner: str = ""
    message_id: str = ""
    decision: str = "allow"
    detail: Mapping[str, object] | None = None


def encode(item: AuditItem) -> str:
    """item as outbox text; raises ValueError if its detail is not plain JSON."""
    if not item.kind:
        raise ValueError("audit entry needs a kind")
    fields = {  # not dataclasses.asdict: it deep-copies detail, and this runs per record
        "kind": item.kind,
        "actor": item.actor,
        "partner": item.partner,
        "message_id": item.message_id,
        "decision": item.decision,
        "detail": item.detail,
    }
    try:
        return _OUTBOX_JSON.encode(fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit detail is not plain JSON: {exc}") from exc


def decode(text: str) -> AuditItem:
    """The AuditItem encode() made; raises ValueError for anything else."""
    try:
        fields = json.loads(text)
        detail = fields.get("detail")
        if detail is not None and not isinstance(detail, dict):
            raise TypeError("detail is not an object")
        return AuditItem(
            kind=str(fields["kind"]),
            actor=str(fields["actor"]),
            partner=str(fields.get("partner", "")),
            message_id=str(fields.get("message_id", "")),
            decision=str(fields.get("decision", "allow")),
            detail=detail,
        )
    except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not an encoded audit entry: {exc}") from exc


def entry_fields(item: AuditItem, now_ms: int) -> audit_pb2.AuditEntry:
    """The entry of item at now_ms, before it is chained; raises ValueError for an empty
    kind or a detail that is not plain JSON."""
    if not item.kind:
        raise ValueError("audit entry needs a kind")
    try:
        detail_json = canonical_json(item.detail)
        detail_json.encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit detail is not plain JSON: {exc}") from exc
    return audit_pb2.AuditEntry(
        time_ms=now_ms,
        kind=item.kind,
        actor=item.actor,
        partner=item.partner,
        message_id=item.message_id,
        decision=item.decision,
        detail_json=detail_json,
    )


def acceptance_item(m: StoredMessage, **extra: object) -> AuditItem:
    """The publish.accepted entry of a stored message (extra joins its detail)."""
    return AuditItem(
        "publish.accepted",
        m.sender,
        m.sender,
        m.message_id,
        "allow",
        {
            "offset": m.offset,
            "topic": m.topic,
            "sequence": m.sequence,
            "digest": m.digest.hex(),
            "classification": m.classification,
            **extra,
        },
    )
