"""The SQLite store's message writes and reads: append's transaction, pending reads."""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Sequence

from broker.store import outbox
from broker.store.base import (
    PRECEDENCES,
    AcceptanceRecords,
    Appended,
    NewMessage,
    Rejected,
    StoredMessage,
    StoreFull,
    stored_message,
)
from broker.store.schema import (
    INSERT,
    PENDING_AT_PRECEDENCE,
    ROWS_BY_OFFSET,
    cursor_of,
    mib,
    state,
    stored,
)


def append_messages(
    conn: sqlite3.Connection,
    batch: Sequence[NewMessage],
    now_ms: int,
    *,
    max_bytes: int,
    quota: int,
    records: AcceptanceRecords | None,
    also: Sequence[str],
) -> list[Appended | Rejected]:
    """SqliteMessageStore.append's transaction: store what may be stored, one result
    per message, and the outbox records; raises StoreFull past max_bytes."""
    head, _, size = state(conn)
    results: list[Appended | Rejected] = []
    last: dict[str, int] = {}
    used: dict[str, int] = {}
    added = 0
    for m in batch:
        if m.sender not in last:
            row = conn.execute(
                "SELECT last_sequence FROM senders WHERE sender = ?", (m.sender,)
            ).fetchone()
            last[m.sender] = int(row[0]) if row else 0
            if quota:
                row = conn.execute(
                    "SELECT bytes FROM usage WHERE sender = ?", (m.sender,)
                ).fetchone()
                used[m.sender] = int(row[0]) if row else 0
        duplicate = conn.execute(
            "SELECT 1 FROM messages WHERE sender = ? AND message_id = ?",
            (m.sender, m.message_id),
        ).fetchone()
        if duplicate:
            results.append(Rejected("duplicate_id"))
            continue
        if m.sequence <= last[m.sender] and not m.forwarded:
            results.append(Rejected("sequence_not_increasing"))
            continue
        if quota and used[m.sender] + len(m.envelope) > quota:
            results.append(Rejected("quota_exceeded", used[m.sender], quota))
            continue
        if quota:
            used[m.sender] += len(m.envelope)
        head += 1
        conn.execute(
            INSERT,
            (
                head,
                now_ms,
                m.message_id,
                m.sender,
                m.sequence,
                m.topic,
                m.precedence,
                m.classification,
                m.label,
                m.created_ms,
                m.expiry_ms,
                m.envelope,
                m.digest,
                len(m.envelope),
            ),
        )
        last[m.sender] = max(m.sequence, last[m.sender])
        added += len(m.envelope)
        results.append(Appended(head))
    if size + added > max_bytes:
        raise StoreFull(
            f"message store is full ({mib(size)} of {mib(max_bytes)}, "
            f"this batch needs {mib(added)} more); refusing new messages"
        )
    conn.executemany(
        "INSERT INTO senders (sender, last_sequence) VALUES (?, ?) "
        "ON CONFLICT (sender) DO UPDATE SET last_sequence = excluded.last_sequence",
        last.items(),
    )
    conn.execute("UPDATE state SET head = ?", (head,))
    fresh = [
        stored_message(m, r.offset, now_ms)
        for m, r in zip(batch, results, strict=True)
        if isinstance(r, Appended)
    ]
    if records is not None and fresh:
        outbox.insert_records(conn, records(fresh), now_ms)
    outbox.insert_records(conn, also, now_ms)
    return results


def pending_and_head(
    conn: sqlite3.Connection, subscriber: str, limit: int, skip: Collection[int]
) -> tuple[list[StoredMessage], int]:
    """SqliteMessageStore.pending_and_head's read (one snapshot); raises StoreError."""
    cursor = cursor_of(conn, subscriber)
    head = state(conn)[0]
    chosen: list[int] = []
    for precedence in PRECEDENCES:
        if len(chosen) >= limit:
            break
        rows = conn.execute(
            PENDING_AT_PRECEDENCE,
            (precedence, cursor, subscriber, limit - len(chosen) + len(skip)),
        )
        chosen.extend(o for (o,) in rows if o not in skip)
    chosen = chosen[:limit]
    if not chosen:
        return [], head
    sql = ROWS_BY_OFFSET.format(",".join("?" * len(chosen)))
    by_offset = {row[0]: stored(row) for row in conn.execute(sql, chosen)}
    return [by_offset[o] for o in chosen if o in by_offset], head
