"""The SQLite store's message writes and reads: append's and settle's transactions,
pending reads.

The writer thread gives up the GIL for every step of a statement and waits for it again
while the event loop runs, so each statement a job saves also spares a wait."""

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
    ADD_STATE,
    ADD_USAGE,
    CURSOR_AND_HEAD,
    DUPLICATE,
    FIRST_UNSETTLED,
    INSERT_NEW,
    PENDING_AT_PRECEDENCE,
    ROWS_BY_OFFSET,
    SENDER,
    cursor_of,
    mib,
    no_cursor,
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
    added: dict[str, list[int]] = {}  # per sender: messages and bytes stored
    for m in batch:
        if m.sender not in last:
            seq, held = conn.execute(SENDER, (m.sender,)).fetchone()
            last[m.sender] = int(seq or 0)
            used[m.sender] = int(held or 0)
        # A stored (sender, message_id) is refused duplicate_id before any other check:
        # looked up here when another check fails, else by the insert itself (INSERT_NEW).
        # A forwarded sender's sequence may have gaps and arrive out of order (only what
        # is released crosses, and by more than one path): only its duplicates are refused.
        late = m.sequence <= last[m.sender] and not m.forwarded
        over = bool(quota) and used[m.sender] + len(m.envelope) > quota
        if (late or over) and conn.execute(DUPLICATE, (m.sender, m.message_id)).fetchone():
            results.append(Rejected("duplicate_id"))
            continue
        if late:
            results.append(Rejected("sequence_not_increasing"))
            continue
        if over:
            results.append(Rejected("quota_exceeded", used[m.sender], quota))
            continue
        inserted = conn.execute(
            INSERT_NEW,
            (
                head + 1,
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
        ).rowcount
        if not inserted:
            results.append(Rejected("duplicate_id"))
            continue
        head += 1
        if quota:
            used[m.sender] += len(m.envelope)
        last[m.sender] = max(m.sequence, last[m.sender])
        totals = added.setdefault(m.sender, [0, 0])
        totals[0] += 1
        totals[1] += len(m.envelope)
        results.append(Appended(head))
    count = sum(n for n, _ in added.values())
    grown = sum(b for _, b in added.values())
    if size + grown > max_bytes:
        raise StoreFull(
            f"message store is full ({mib(size)} of {mib(max_bytes)}, "
            f"this batch needs {mib(grown)} more); refusing new messages"
        )
    conn.executemany(
        "INSERT INTO senders (sender, last_sequence) VALUES (?, ?) "
        "ON CONFLICT (sender) DO UPDATE SET last_sequence = excluded.last_sequence",
        last.items(),
    )
    conn.execute(ADD_STATE, (head, count, grown))
    if added:
        conn.executemany(ADD_USAGE, ((s, b, n) for s, (n, b) in added.items()))
    fresh = [
        stored_message(m, r.offset, now_ms)
        for m, r in zip(batch, results, strict=True)
        if isinstance(r, Appended)
    ]
    if records is not None and fresh:
        outbox.insert_records(conn, records(fresh), now_ms)
    outbox.insert_records(conn, also, now_ms)
    return results


def settle_offsets(conn: sqlite3.Connection, subscriber: str, wanted: Sequence[int]) -> int:
    """SqliteMessageStore.settle's transaction: mark wanted done, advance the cursor over
    the settled (or removed) prefix, prune the marks below it; return the cursor."""
    row = conn.execute(CURSOR_AND_HEAD, (subscriber,)).fetchone()
    if row is None:
        raise no_cursor(subscriber)
    cursor, head = int(row[0]), int(row[1])
    mine = {o for o in wanted if cursor < o <= head}
    # The run just above the cursor is passed over without a settled mark (one would be
    # written and pruned at once): in order, that is every offset.
    run = cursor
    while run + 1 in mine:
        run += 1
    marks = [(subscriber, o) for o in mine if o > run]
    if marks:
        conn.executemany(
            "INSERT OR IGNORE INTO settled (subscriber, msg_offset) VALUES (?, ?)", marks
        )
    first = conn.execute(FIRST_UNSETTLED, (run, subscriber)).fetchone()
    new_cursor = max(cursor, int(first[0]) - 1 if first else head)
    if new_cursor != cursor:
        conn.execute("UPDATE cursors SET cursor = ? WHERE subscriber = ?", (new_cursor, subscriber))
        conn.execute(
            "DELETE FROM settled WHERE subscriber = ? AND msg_offset <= ?",
            (subscriber, new_cursor),
        )
    return new_cursor


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
