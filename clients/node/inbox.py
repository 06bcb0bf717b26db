"""The inbox: verified messages stored once each, quarantined refusals, sequence gaps."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from clients.node.db import connect, get_meta, set_meta, transaction

# The columns of a listing; payloads are read only by show().
_LIST_COLUMNS = (
    "message_id, sender, sequence, recipient_sequence, topic, precedence, label, created_ms,"
    " received_ms, broker_offset, content_type, title, hook_status"
)


@dataclass(frozen=True)
class Entry:
    """One stored message's metadata (the payload stays in the database)."""

    message_id: str
    sender: str
    sequence: int
    recipient_sequence: int
    topic: str
    precedence: str
    label: str
    created_ms: int
    received_ms: int
    offset: int
    content_type: str
    title: str
    hook_status: str | None = None


@dataclass(frozen=True)
class Gap:
    """Sequences first..last from sender that were never received."""

    sender: str
    first: int
    last: int
    detected_ms: int

    def describe(self) -> str:
        seqs = (
            f"sequence {self.first}"
            if self.first == self.last
            else (f"sequences {self.first}..{self.last}")
        )
        return f"gap from {self.sender}: {seqs} missing (the broker may be withholding messages)"


@dataclass(frozen=True)
class Expired:
    """A message the broker says its retention removed before we had it (its claim)."""

    sender: str
    message_id: str
    sequence: int
    recipient_sequence: int
    topic: str
    reason: str
    offset: int
    stored_ms: int
    removed_ms: int
    noticed_ms: int

    def describe(self) -> str:
        to_us = f", #{self.recipient_sequence} to us" if self.recipient_sequence else ""
        why = {"retention_age": "too old", "retention_size": "store over its size"}.get(
            self.reason, self.reason
        )
        return (
            f"expired at the broker before delivery: {self.message_id} from {self.sender} "
            f"on {self.topic}{to_us} (removed by retention, {why})"
        )


_EXPIRED_COLUMNS = (
    "sender, message_id, sequence, recipient_sequence, topic, reason, broker_offset,"
    " stored_ms, removed_ms, noticed_ms"
)
_SQLITE_MAX = 2**63 - 1
# A hole in a sender's numbers seen while the stream is caught up (live) is warned about
# once it has stayed open this long: concurrent publishers' envelopes may be stored a
# little out of their numbering, and a refused number comes with the sender's next one.
GAP_GRACE_S = 10.0
# While the stream is behind (a backlog, FLASH first), holes wait for caught_up; but not
# longer than this, so a broker that never says it caught up cannot hide one for ever.
GAP_BEHIND_S = 300.0


@dataclass(frozen=True)
class Stored:
    """What store() did: ``new`` is False for a duplicate; ``gap`` is "opened", "filled" or ""."""

    new: bool
    gap: str = ""


class Inbox:
    """The node database seen by the daemon and the commands."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: sqlite3.Connection = connect(path)

    def close(self) -> None:
        self.conn.close()

    # -- writing --------------------------------------------------------------------------
    def store(self, e: Entry, payload: bytes) -> Stored:
        """Insert unless (sender, message_id) is already held; account for its sequence."""
        with transaction(self.conn) as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO inbox (sender, message_id, sequence, recipient_sequence,"
                " topic, precedence, label, created_ms, received_ms, broker_offset, content_type,"
                " title, payload, hook_status) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    e.sender,
                    e.message_id,
                    e.sequence,
                    e.recipient_sequence,
                    e.topic,
                    e.precedence,
                    e.label,
                    e.created_ms,
                    e.received_ms,
                    e.offset,
                    e.content_type,
                    e.title,
                    payload,
                    e.hook_status,
                ),
            )
            if cur.rowcount == 0:
                return Stored(new=False)
            # Reported expired at the broker, yet here after all (it was in flight).
            c.execute(
                "DELETE FROM expired WHERE sender = ? AND message_id = ?", (e.sender, e.message_id)
            )
            set_meta(c, "last_offset", str(e.offset))
            gap = _account(c, e.sender, e.recipient_sequence, e.received_ms)
        return Stored(new=True, gap=gap)

    def quarantine(
        self,
        *,
        offset: int,
        sender: str,
        message_id: str,
        topic: str,
        reason: str,
        detail: str,
        envelope: bytes,
        now_ms: int,
    ) -> None:
        """Keep a refused delivery with the reason; sender and id are unverified claims."""
        with transaction(self.conn) as c:
            c.execute(
                "INSERT INTO quarantine (received_ms, broker_offset, sender, message_id, topic,"
                " reason, detail, envelope) VALUES (?,?,?,?,?,?,?,?)",
                (now_ms, offset, sender, message_id, topic, reason, detail, envelope),
            )
            set_meta(c, "last_offset", str(offset))

    def set_hook_status(self, sender: str, message_id: str, status: str) -> None:
        with transaction(self.conn) as c:
            c.execute(
                "UPDATE inbox SET hook_status = ? WHERE sender = ? AND message_id = ?",
                (status, sender, message_id),
            )

    def note(self, key: str, value: str) -> None:
        """Record a status fact (last_connected_ms, broker ...)."""
        with transaction(self.conn) as c:
            set_meta(c, key, value)

    def record_expired(self, notices: list[Expired]) -> list[Expired]:
        """Keep the broker's expiry notices; return the new ones (a message that reached
        the inbox after all, or a notice seen before, is left out)."""
        new: list[Expired] = []
        with transaction(self.conn) as c:
            for n in notices:
                if not all(0 <= v <= _SQLITE_MAX for v in (n.sequence, n.recipient_sequence)):
                    continue  # not a number we could have been sent
                have = c.execute(
                    "SELECT 1 FROM inbox WHERE sender = ? AND message_id = ?",
                    (n.sender, n.message_id),
                ).fetchone()
                if have:
                    continue
                cur = c.execute(
                    f"INSERT OR IGNORE INTO expired ({_EXPIRED_COLUMNS})"
                    " VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        n.sender,
                        n.message_id,
                        n.sequence,
                        n.recipient_sequence,
                        n.topic,
                        n.reason,
                        n.offset,
                        n.stored_ms,
                        n.removed_ms,
                        n.noticed_ms,
                    ),
                )
                if cur.rowcount:
                    new.append(n)
        return new

    def expired(self, limit: int | None = None) -> list[Expired]:
        """Expiry notices received, oldest removal first (the newest `limit`)."""
        rows = self.conn.execute(
            f"SELECT {_EXPIRED_COLUMNS} FROM expired ORDER BY removed_ms DESC, broker_offset DESC"
            " LIMIT ?",
            (-1 if limit is None else limit,),
        ).fetchall()
        return [_expired(r) for r in reversed(rows)]

    def take_unreported_gaps(self, *, opened_by_ms: int | None = None) -> list[Gap]:
        """Open gaps not yet warned about (only those opened at or before opened_by_ms,
        if given), marked as reported.

        When to ask is the caller's judgement (see GAP_GRACE_S): a hole is only
        suspicious once the stream caught up after it opened, or after the grace period,
        because a backlog arrives FLASH first and so out of per-recipient order.
        """
        cut = _SQLITE_MAX if opened_by_ms is None else opened_by_ms
        with transaction(self.conn) as c:
            gaps = _gaps(c, "WHERE reported = 0 AND detected_ms <= ?", (cut,))
            c.execute(
                "UPDATE gaps SET reported = 1 WHERE reported = 0 AND detected_ms <= ?", (cut,)
            )
        return gaps

    # -- reading --------------------------------------------------------------------------
    def entries(
        self, *, since_ms: int = 0, limit: int | None = None, pending_hook: bool = False
    ) -> list[Entry]:
        """Stored messages received at or after since_ms, oldest first (the newest `limit`)."""
        where = "WHERE received_ms >= ?" + (" AND hook_status = 'pending'" if pending_hook else "")
        rows = self.conn.execute(
            f"SELECT {_LIST_COLUMNS} FROM inbox {where} ORDER BY id DESC LIMIT ?",
            (since_ms, -1 if limit is None else limit),
        ).fetchall()
        return [_entry(r) for r in reversed(rows)]

    def last_row_id(self) -> int:
        """The newest row's id (0 when empty): where `inbox --follow` starts."""
        return int(self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM inbox").fetchone()[0])

    def entries_after(self, row_id: int, limit: int = 1000) -> list[tuple[int, Entry]]:
        """Rows stored after row_id, oldest first, with their ids."""
        rows = self.conn.execute(
            f"SELECT id, {_LIST_COLUMNS} FROM inbox WHERE id > ? ORDER BY id LIMIT ?",
            (row_id, limit),
        ).fetchall()
        return [(int(r[0]), _entry(r[1:])) for r in rows]

    def find(self, prefix: str) -> list[tuple[Entry, bytes]]:
        """Messages whose id starts with prefix (show takes a unique prefix)."""
        rows = self.conn.execute(
            f"SELECT {_LIST_COLUMNS}, payload FROM inbox WHERE message_id >= ? AND message_id < ?"
            " ORDER BY id LIMIT 10",
            (prefix, prefix + "\U0010ffff"),
        ).fetchall()
        return [(_entry(r[:-1]), bytes(r[-1])) for r in rows]

    def counts(self) -> tuple[int, int]:
        """(inbox messages, quarantined deliveries)."""
        n = self.conn.execute("SELECT COUNT(*) FROM inbox").fetchone()[0]
        q = self.conn.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]
        return int(n), int(q)

    def gaps(self) -> list[Gap]:
        return _gaps(self.conn, "")

    def quarantined(self, limit: int = 20) -> list[dict[str, object]]:
        rows = self.conn.execute(
            "SELECT received_ms, broker_offset, sender, message_id, topic, reason, detail"
            " FROM quarantine ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        keys = ("received_ms", "offset", "sender", "message_id", "topic", "reason", "detail")
        return [dict(zip(keys, r, strict=True)) for r in reversed(rows)]

    def senders(self) -> dict[str, int]:
        """Highest per-recipient sequence seen from each sender."""
        rows = self.conn.execute("SELECT sender, high FROM rx_senders ORDER BY sender").fetchall()
        return {str(s): int(h) for s, h in rows}

    def meta(self, key: str) -> str | None:
        return get_meta(self.conn, key)


def _account(c: sqlite3.Connection, sender: str, seq: int, now_ms: int) -> str:
    """Advance sender's high mark; open a gap for a jump, close one for a late arrival."""
    if seq <= 0:
        return ""  # the sender does not number its messages to us
    row = c.execute("SELECT high FROM rx_senders WHERE sender = ?", (sender,)).fetchone()
    high = 0 if row is None else int(row[0])
    if seq > high:
        # Numbers start at 1, so a first message numbered 5 means 1..4 never came.
        if seq > high + 1:
            c.execute(
                "INSERT INTO gaps (sender, first_seq, last_seq, detected_ms) VALUES (?,?,?,?)",
                (sender, high + 1, seq - 1, now_ms),
            )
        c.execute(
            "INSERT INTO rx_senders (sender, high) VALUES (?, ?) "
            "ON CONFLICT (sender) DO UPDATE SET high = excluded.high",
            (sender, seq),
        )
        return "opened" if seq > high + 1 else ""
    hit = c.execute(
        "SELECT first_seq, last_seq, detected_ms, reported FROM gaps"
        " WHERE sender = ? AND first_seq <= ? AND last_seq >= ?",
        (sender, seq, seq),
    ).fetchone()
    if hit is None:
        return ""  # a sequence seen before under another message id: not ours to judge
    first, last, detected, reported = (int(x) for x in hit)
    c.execute("DELETE FROM gaps WHERE sender = ? AND first_seq = ?", (sender, first))
    for lo, hi in ((first, seq - 1), (seq + 1, last)):
        if lo <= hi:
            c.execute(
                "INSERT INTO gaps (sender, first_seq, last_seq, detected_ms, reported)"
                " VALUES (?,?,?,?,?)",
                (sender, lo, hi, detected, reported),
            )
    return "filled"


def _gaps(c: sqlite3.Connection, where: str, params: tuple[int, ...] = ()) -> list[Gap]:
    rows = c.execute(
        f"SELECT sender, first_seq, last_seq, detected_ms FROM gaps {where}"
        " ORDER BY sender, first_seq",
        params,
    ).fetchall()
    return [Gap(str(s), int(f), int(la), int(d)) for s, f, la, d in rows]


def _expired(r: tuple[object, ...]) -> Expired:
    return Expired(
        sender=str(r[0]),
        message_id=str(r[1]),
        sequence=int(str(r[2])),
        recipient_sequence=int(str(r[3])),
        topic=str(r[4]),
        reason=str(r[5]),
        offset=int(str(r[6])),
        stored_ms=int(str(r[7])),
        removed_ms=int(str(r[8])),
        noticed_ms=int(str(r[9])),
    )


def _entry(r: tuple[object, ...]) -> Entry:
    return Entry(
        message_id=str(r[0]),
        sender=str(r[1]),
        sequence=int(str(r[2])),
        recipient_sequence=int(str(r[3])),
        topic=str(r[4]),
        precedence=str(r[5]),
        label=str(r[6]),
        created_ms=int(str(r[7])),
        received_ms=int(str(r[8])),
        offset=int(str(r[9])),
        content_type=str(r[10]),
        title=str(r[11]),
        hook_status=None if r[12] is None else str(r[12]),
    )
