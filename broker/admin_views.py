"""Operators' views of stored messages: metadata only, never contents (the broker holds
none; envelopes are end-to-end encrypted). ``broker.grpc.admin`` serves them as
``ListMessages``.

A message's recipients come from the audit log's ``deliver`` entries, which name the
partner and the offsets delivered to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from broker.audit import AuditBackend
from broker.store import MessageStore

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
# How many offsets one request reads at most while looking for matches of its filters.
MAX_SCAN = 5_000


@dataclass(frozen=True)
class MessageMeta:
    """What the broker knows of one stored message besides its (encrypted) envelope."""

    offset: int
    message_id: str
    sender: str
    topic: str
    precedence: int
    label: bytes  # serialized coalition.v1 Label
    size: int
    stored_ms: int
    expiry_ms: int
    delivered_to: list[str] = field(default_factory=list)


async def list_messages(
    store: MessageStore,
    audit: AuditBackend,
    *,
    before_offset: int = 0,
    limit: int = 0,
    sender: str = "",
    topic: str = "",
) -> list[MessageMeta]:
    """Stored messages below before_offset (0 = from the newest), newest first, that
    match sender (exact) and topic (prefix); at most limit (0 = DEFAULT_LIMIT, capped at
    MAX_LIMIT) and reading at most MAX_SCAN offsets."""
    want = min(limit or DEFAULT_LIMIT, MAX_LIMIT)
    head = await store.head()
    start = head if not before_offset else min(head, before_offset - 1)
    found: list[MessageMeta] = []
    offset = start
    while offset > 0 and len(found) < want and start - offset < MAX_SCAN:
        m = await store.get(offset)
        offset -= 1
        if m is None or (sender and m.sender != sender) or not m.topic.startswith(topic):
            continue
        found.append(
            MessageMeta(
                offset=m.offset,
                message_id=m.message_id,
                sender=m.sender,
                topic=m.topic,
                precedence=m.precedence,
                label=m.label,
                size=len(m.envelope),
                stored_ms=m.stored_ms,
                expiry_ms=m.expiry_ms,
            )
        )
    if not found:
        return found
    wanted = {m.offset: m for m in found}
    since = min(m.stored_ms for m in found)
    for entry in await audit.query(kind="deliver", since_ms=since):
        if entry.kind != "deliver":  # the prefix also matches deliver.denied
            continue
        offsets = json.loads(entry.detail_json or "{}").get("offsets", [])
        for o in offsets if isinstance(offsets, list) else []:
            meta = wanted.get(o) if isinstance(o, int) else None
            if meta is not None and entry.partner not in meta.delivered_to:
                meta.delivered_to.append(entry.partner)
    return found
