"""The SQLite store's audit outbox: records written in the transaction of what they record.

See MessageStore for the contract; the audit drainer (broker.audit.drainer) reads the
rows in id order and forgets them once the audit log holds them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from broker.store.base import OutboxRow


def insert_records(conn: sqlite3.Connection, records: Sequence[str], now_ms: int) -> None:
    """Add records to the outbox, in order, at now_ms (in the caller's transaction)."""
    conn.executemany(
        "INSERT INTO outbox (time_ms, record) VALUES (?, ?)", ((now_ms, r) for r in records)
    )


def read(conn: sqlite3.Connection, after: int, limit: int) -> list[OutboxRow]:
    """Up to limit rows with id above after, oldest first."""
    rows = conn.execute(
        "SELECT id, time_ms, record FROM outbox WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
    )
    return [OutboxRow(int(i), int(t), str(r)) for i, t, r in rows]


def forget(conn: sqlite3.Connection, through: int) -> int:
    """Delete the rows with id at or below through; return how many."""
    return int(conn.execute("DELETE FROM outbox WHERE id <= ?", (through,)).rowcount)
