"""Retention for the JetStream store: which messages a sweep removes, and whose notices.

The same rules as the SQLite store (broker.store.sweeping): by age, by label expiry,
then by size down to retention_bytes taking only from the senders above their fair
share (``fair_level``), oldest first. Pure functions of a StoreView and of cursor
states; the store does the I/O (reading cursors and envelopes, committing the result).
"""

from __future__ import annotations

from collections.abc import Mapping

from broker.jetstream.cursors import CursorState
from broker.jetstream.view import StoreView
from broker.store.base import Eligibility, ExpiryReason, Notice, StoredMessage
from broker.store.sweeping import fair_level


def victims(
    view: StoreView, now_ms: int, *, max_age_ms: int, retention_bytes: int
) -> dict[int, str]:
    """offset -> why it goes ("retention_age", "label_expired", "retention_size")."""
    out: dict[int, str] = {}
    for offset, meta in view.live.items():
        if max_age_ms > 0 and meta.stored_ms < now_ms - max_age_ms:
            out[offset] = "retention_age"
        elif 0 < meta.expiry_ms <= now_ms:
            out[offset] = "label_expired"
    if retention_bytes > 0:
        _by_size(view, out, retention_bytes)
    return out


def _by_size(view: StoreView, out: dict[int, str], target: int) -> None:
    usage = dict(view.usage)
    for offset in out:
        meta = view.live[offset]
        usage[meta.sender] -= meta.size
    usage = {s: u for s, u in usage.items() if u > 0}
    if sum(usage.values()) <= target:
        return
    level = fair_level(list(usage.values()), target)
    over = {s: u - level for s, u in usage.items() if u > level}
    for offset in view.offsets:  # oldest first
        meta = view.live[offset]
        if offset in out or over.get(meta.sender, 0) <= 0:
            continue
        out[offset] = "retention_size"
        over[meta.sender] -= meta.size
        if all(v <= 0 for v in over.values()):
            break


def waiting(cursors: Mapping[str, CursorState], offset: int) -> set[str]:
    """Subscribers that had not settled offset (cursor below it, no settled mark)."""
    return {s for s, st in cursors.items() if st.cursor < offset and offset not in st.settled}


def notices_for(
    m: StoredMessage,
    reason: str,
    who: set[str],
    eligible: Eligibility,
    now_ms: int,
) -> list[Notice]:
    """Notices for the subscribers in who that may have received m (label expiry: none)."""
    if reason == "label_expired" or not who:
        return []
    expiry: ExpiryReason = "retention_age" if reason == "retention_age" else "retention_size"
    return [
        Notice(
            subscriber=subscriber,
            offset=m.offset,
            sender=m.sender,
            message_id=m.message_id,
            sequence=m.sequence,
            recipient_sequence=recipient_sequence,
            topic=m.topic,
            reason=expiry,
            stored_ms=m.stored_ms,
            removed_ms=now_ms,
        )
        for subscriber, recipient_sequence in sorted(eligible(m).items())
        if subscriber in who and subscriber != m.sender
    ]
