"""Retention planning for the SQLite store: fair shares by size, and expiry notices.

Pure functions of a connection: sqlite.SqliteMessageStore.sweep plans on a read snapshot
with plan() and applies the plan in one write transaction with apply().
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Collection

from broker.store.base import Eligibility, ExpiryReason, Notice, NoticeRecords, Sweep
from broker.store.outbox import insert_records
from broker.store.schema import GET, stored


def fair_level(usage: Collection[int], target: int) -> int:
    """The largest level L with sum(min(u, L) for u in usage) <= target (max-min fairness).

    Retention by size trims each sender above L down to L and leaves the others alone:
    a sender holding no more than an equal share of what remains is never trimmed
    because of another's volume. Returns max(usage) when everything fits.
    """
    ordered = sorted(usage)
    remaining = target
    for i, u in enumerate(ordered):
        share = remaining // (len(ordered) - i)
        if u > share:
            return share
        remaining -= u
    return ordered[-1] if ordered else 0


NOTICE_COLUMNS = (
    "subscriber, msg_offset, sender, message_id, sequence, recipient_sequence, topic, reason,"
    " stored_ms, removed_ms"
)


def notice(row: tuple[object, ...]) -> Notice:
    return Notice(*row)  # type: ignore[arg-type]  # columns are in field order


def _waiting(conn: sqlite3.Connection, low: int, high: int) -> dict[str, tuple[int, set[int]]]:
    """Subscribers whose cursor is below high, with their settled offsets in low..high."""
    out: dict[str, tuple[int, set[int]]] = {}
    for subscriber, cursor in conn.execute(
        "SELECT subscriber, cursor FROM cursors WHERE cursor < ?", (high,)
    ).fetchall():
        settled = {
            int(o)
            for (o,) in conn.execute(
                "SELECT msg_offset FROM settled"
                " WHERE subscriber = ? AND msg_offset BETWEEN ? AND ?",
                (subscriber, low, high),
            )
        }
        out[str(subscriber)] = (int(cursor), settled)
    return out


def _still_waiting(conn: sqlite3.Connection, proposed: list[Notice]) -> list[Notice]:
    """The proposed notices whose subscriber still has not settled the message."""
    if not proposed:
        return []
    offsets = [n.offset for n in proposed]
    waiting = _waiting(conn, min(offsets), max(offsets))
    out = []
    for n in proposed:
        state = waiting.get(n.subscriber)
        if state is not None and state[0] < n.offset and n.offset not in state[1]:
            out.append(n)
    return out


def plan(
    conn: sqlite3.Connection,
    now_ms: int,
    eligible: Eligibility | None,
    *,
    max_age_ms: int,
    retention_bytes: int,
) -> tuple[dict[int, str], list[Notice]]:
    """What a sweep removes (offset -> reason) and the notices it would record."""
    victims: dict[int, str] = {}
    if max_age_ms > 0:
        for (offset,) in conn.execute(
            "SELECT msg_offset FROM messages WHERE stored_ms < ?",
            (now_ms - max_age_ms,),
        ):
            victims[int(offset)] = "retention_age"
    for (offset,) in conn.execute(
        "SELECT msg_offset FROM messages WHERE expiry_ms > 0 AND expiry_ms <= ?", (now_ms,)
    ):
        victims.setdefault(int(offset), "label_expired")
    if retention_bytes > 0:
        _size_victims(conn, victims, retention_bytes)
    notices: list[Notice] = []
    if eligible is not None:
        notices = _notices_for(conn, victims, eligible, now_ms)
    return victims, notices


def _size_victims(conn: sqlite3.Connection, victims: dict[int, str], target: int) -> None:
    """Add to victims what retention by size removes, after what is already in it."""
    gone: dict[str, int] = {}
    if victims:
        sql = "SELECT sender, size FROM messages WHERE msg_offset IN ({})"
        chosen = sorted(victims)
        for i in range(0, len(chosen), 500):
            part = chosen[i : i + 500]
            for sender, size in conn.execute(sql.format(",".join("?" * len(part))), part):
                gone[sender] = gone.get(sender, 0) + int(size)
    usage = {
        str(sender): int(size) - gone.get(str(sender), 0)
        for sender, size in conn.execute("SELECT sender, bytes FROM usage WHERE bytes > 0")
    }
    if sum(usage.values()) <= target:
        return
    level = fair_level(list(usage.values()), target)
    over = {s: u - level for s, u in usage.items() if u > level}
    # Oldest first among the senders above the level, until each is down to it.
    marks = ",".join("?" * len(over))
    rows = conn.execute(
        f"SELECT msg_offset, sender, size FROM messages WHERE sender IN ({marks})"
        " ORDER BY msg_offset",
        list(over),
    )
    for offset, sender, size in rows:
        if offset in victims or over.get(sender, 0) <= 0:
            continue
        victims[int(offset)] = "retention_size"
        over[sender] -= int(size)
        if all(v <= 0 for v in over.values()):
            break


def _notices_for(
    conn: sqlite3.Connection,
    victims: dict[int, str],
    eligible: Eligibility,
    now_ms: int,
) -> list[Notice]:
    """Notices for the subscribers that had not settled a removed message and may
    have received it (eligible), label expiry aside."""
    candidates = sorted(o for o, r in victims.items() if r != "label_expired")
    if not candidates:
        return []
    waiting = _waiting(conn, candidates[0], candidates[-1])
    out: list[Notice] = []
    for offset in candidates:
        who = {
            s
            for s, (cursor, settled) in waiting.items()
            if cursor < offset and offset not in settled
        }
        if not who:
            continue
        m = stored(conn.execute(GET, (offset,)).fetchone())
        expiry: ExpiryReason = (
            "retention_age" if victims[offset] == "retention_age" else "retention_size"
        )
        for subscriber, recipient_sequence in sorted(eligible(m).items()):
            if subscriber in who and subscriber != m.sender:
                out.append(
                    Notice(
                        subscriber=subscriber,
                        offset=offset,
                        sender=m.sender,
                        message_id=m.message_id,
                        sequence=m.sequence,
                        recipient_sequence=recipient_sequence,
                        topic=m.topic,
                        reason=expiry,
                        stored_ms=m.stored_ms,
                        removed_ms=now_ms,
                    )
                )
    return out


def apply(
    conn: sqlite3.Connection,
    victims: dict[int, str],
    proposed: list[Notice],
    records: NoticeRecords | None,
    now_ms: int,
) -> Sweep:
    """Remove the victims; record the proposed notices whose subscriber still has not
    settled the message, and records(those notices) in the outbox (one transaction)."""
    notices = _still_waiting(conn, proposed)
    cur = conn.executemany(
        "DELETE FROM messages WHERE msg_offset = ?", ((o,) for o in sorted(victims))
    )
    conn.executemany(
        f"INSERT OR IGNORE INTO notices ({NOTICE_COLUMNS}, audited)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
        (dataclasses.astuple(n) for n in notices),
    )
    if records is not None and notices:
        insert_records(conn, records(notices), now_ms)
    by_reason: dict[str, int] = {}
    for reason in victims.values():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    return Sweep(removed=int(cur.rowcount), by_reason=by_reason, notices=notices)
