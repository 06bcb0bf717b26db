"""Deliveries held back because the node's clock disagrees with a sender's certificate.

A message whose only fault is time (the sender's signing certificate or key bundle not
yet valid, or expired, by this node's clock) is not refused: it is kept here, whole,
acknowledged to the broker only once kept, and tried again until it verifies (the
clock was put right) or fails for another reason (then quarantined as usual).
"""

from __future__ import annotations

import sqlite3

from clients.node.db import transaction
from coalition.v1 import exchange_pb2


def park(
    conn: sqlite3.Connection,
    d: exchange_pb2.Delivery,
    *,
    sender: str,
    message_id: str,
    detail: str,
    now_ms: int,
) -> None:
    """Keep d (once per sender and message id: a redelivery replaces the reason)."""
    with transaction(conn) as c:
        c.execute("DELETE FROM parked WHERE sender = ? AND message_id = ?", (sender, message_id))
        c.execute(
            "INSERT INTO parked (broker_offset, sender, message_id, detail, parked_ms, delivery)"
            " VALUES (?,?,?,?,?,?)",
            (d.offset, sender, message_id, detail, now_ms, d.SerializeToString()),
        )


def held(conn: sqlite3.Connection) -> list[tuple[int, exchange_pb2.Delivery]]:
    """Every held delivery, oldest first, with its row id."""
    rows = conn.execute("SELECT id, delivery FROM parked ORDER BY id").fetchall()
    return [(int(i), exchange_pb2.Delivery.FromString(bytes(b))) for i, b in rows]


def release(conn: sqlite3.Connection, row_id: int) -> None:
    with transaction(conn) as c:
        c.execute("DELETE FROM parked WHERE id = ?", (row_id,))


def summary(conn: sqlite3.Connection) -> list[dict[str, object]]:
    """What `coalition-node status` shows: one dict per held delivery."""
    rows = conn.execute(
        "SELECT broker_offset, sender, message_id, detail, parked_ms FROM parked ORDER BY id"
    ).fetchall()
    keys = ("offset", "sender", "message_id", "detail", "parked_ms")
    return [dict(zip(keys, r, strict=True)) for r in rows]
