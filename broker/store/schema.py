"""The SQLite message store's schema, its constant queries, and small row helpers."""

from __future__ import annotations

import sqlite3

from broker.store.base import StoredMessage, StoreError, StoreFull
from broker.store.writer import is_disk_full

SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    head INTEGER NOT NULL, messages INTEGER NOT NULL, bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO state (id, head, messages, bytes) VALUES (1, 0, 0, 0);
CREATE TABLE IF NOT EXISTS messages (
    msg_offset INTEGER PRIMARY KEY, stored_ms INTEGER NOT NULL,
    message_id TEXT NOT NULL, sender TEXT NOT NULL, sequence INTEGER NOT NULL,
    topic TEXT NOT NULL, precedence INTEGER NOT NULL, classification INTEGER NOT NULL,
    label BLOB NOT NULL, created_ms INTEGER NOT NULL, expiry_ms INTEGER NOT NULL,
    envelope BLOB NOT NULL, digest BLOB NOT NULL, size INTEGER NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_id ON messages (sender, message_id);
CREATE INDEX IF NOT EXISTS messages_by_precedence ON messages (precedence, msg_offset);
CREATE INDEX IF NOT EXISTS messages_by_time ON messages (stored_ms);
CREATE INDEX IF NOT EXISTS messages_by_expiry ON messages (expiry_ms) WHERE expiry_ms > 0;
CREATE TABLE IF NOT EXISTS senders (
    sender TEXT PRIMARY KEY, last_sequence INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cursors (
    subscriber TEXT PRIMARY KEY, cursor INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS settled (
    subscriber TEXT NOT NULL, msg_offset INTEGER NOT NULL,
    PRIMARY KEY (subscriber, msg_offset)) WITHOUT ROWID;
DROP TRIGGER IF EXISTS message_added;
CREATE TRIGGER IF NOT EXISTS message_removed AFTER DELETE ON messages BEGIN
    UPDATE state SET messages = messages - 1, bytes = bytes - old.size WHERE id = 1; END;
CREATE TABLE IF NOT EXISTS usage (
    sender TEXT PRIMARY KEY, bytes INTEGER NOT NULL, messages INTEGER NOT NULL) WITHOUT ROWID;
DROP TRIGGER IF EXISTS usage_added;
CREATE TRIGGER IF NOT EXISTS usage_removed AFTER DELETE ON messages BEGIN
    UPDATE usage SET bytes = bytes - old.size, messages = messages - 1
    WHERE sender = old.sender; END;
CREATE TABLE IF NOT EXISTS notices (
    subscriber TEXT NOT NULL, msg_offset INTEGER NOT NULL, sender TEXT NOT NULL,
    message_id TEXT NOT NULL, sequence INTEGER NOT NULL, recipient_sequence INTEGER NOT NULL,
    topic TEXT NOT NULL, reason TEXT NOT NULL, stored_ms INTEGER NOT NULL,
    removed_ms INTEGER NOT NULL, audited INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (subscriber, msg_offset)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time_ms INTEGER NOT NULL, record TEXT NOT NULL);
"""
# state.messages/bytes and usage: stored messages and bytes, in all and per sender (for the
# per-sender quota and retention's fair shares), kept in the same transaction as the
# messages: an append adds its totals once (ADD_STATE, ADD_USAGE; a trigger per row cost
# two statements per message), the triggers subtract what a delete removes.
# notices: messages retention removed before an eligible subscriber had them, kept until
# that subscriber acknowledges the notice. Their audit records are written by the sweep
# that records them (audited = 1); audited = 0 only in a store from before the outbox.
# outbox: audit records written in the same transaction as what they record (see
# MessageStore); AUTOINCREMENT, so an id is never reused after the drainer forgot it.
# state.audited: unused since the outbox (the audited mark of a store from before it).

# Columns in StoredMessage field order. Every query below is a constant; values are bound.
INSERT = (
    "INSERT INTO messages (msg_offset, stored_ms, message_id, sender, sequence, topic,"
    " precedence, classification, label, created_ms, expiry_ms, envelope, digest, size)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# A message whose (sender, message_id) is stored already is not inserted (rowcount 0).
INSERT_NEW = INSERT + " ON CONFLICT (sender, message_id) DO NOTHING"
DUPLICATE = "SELECT 1 FROM messages WHERE sender = ? AND message_id = ?"
ADD_STATE = "UPDATE state SET head = ?, messages = messages + ?, bytes = bytes + ? WHERE id = 1"
ADD_USAGE = (
    "INSERT INTO usage (sender, bytes, messages) VALUES (?, ?, ?) ON CONFLICT (sender)"
    " DO UPDATE SET bytes = bytes + excluded.bytes, messages = messages + excluded.messages"
)
# A sender's last sequence and stored bytes in one statement (NULL: none yet).
SENDER = (
    "SELECT (SELECT last_sequence FROM senders WHERE sender = ?1),"
    " (SELECT bytes FROM usage WHERE sender = ?1)"
)
# A subscriber's cursor and the head offset in one statement (no row: no cursor).
CURSOR_AND_HEAD = "SELECT c.cursor, s.head FROM cursors c, state s WHERE c.subscriber = ?"
GET = (
    "SELECT msg_offset, stored_ms, message_id, sender, sequence, topic, precedence,"
    " classification, label, created_ms, expiry_ms, envelope, digest"
    " FROM messages WHERE msg_offset = ?"
)
PENDING_AT_PRECEDENCE = (
    "SELECT msg_offset"
    " FROM messages m INDEXED BY messages_by_precedence"
    " WHERE m.precedence = ? AND m.msg_offset > ? AND NOT EXISTS"
    " (SELECT 1 FROM settled s WHERE s.subscriber = ? AND s.msg_offset = m.msg_offset)"
    " ORDER BY m.msg_offset LIMIT ?"
)
ROWS_BY_OFFSET = (
    "SELECT msg_offset, stored_ms, message_id, sender, sequence, topic, precedence,"
    " classification, label, created_ms, expiry_ms, envelope, digest"
    " FROM messages WHERE msg_offset IN ({})"
)
FIRST_UNSETTLED = (
    "SELECT m.msg_offset FROM messages m WHERE m.msg_offset > ? AND NOT EXISTS"
    " (SELECT 1 FROM settled s WHERE s.subscriber = ? AND s.msg_offset = m.msg_offset)"
    " ORDER BY m.msg_offset LIMIT 1"
)
BACKLOG = (
    "SELECT COUNT(*) FROM messages m WHERE m.msg_offset > ? AND NOT EXISTS"
    " (SELECT 1 FROM settled s WHERE s.subscriber = ? AND s.msg_offset = m.msg_offset)"
)


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def map_error(exc: BaseException) -> Exception:
    if isinstance(exc, StoreError):
        return exc
    if is_disk_full(exc):
        return StoreFull(
            f"message store is full: the disk or database file is full ({exc}); "
            "refusing new messages"
        )
    return StoreError(f"message store failed: {exc}")


def stored(row: tuple[object, ...]) -> StoredMessage:
    return StoredMessage(*row)  # type: ignore[arg-type]  # columns are in field order


def no_cursor(subscriber: str) -> StoreError:
    """The error for a subscriber without a cursor."""
    return StoreError(f"subscriber {subscriber!r} has no cursor; call ensure_cursor first")


def cursor_of(conn: sqlite3.Connection, subscriber: str) -> int:
    row = conn.execute("SELECT cursor FROM cursors WHERE subscriber = ?", (subscriber,)).fetchone()
    if row is None:
        raise no_cursor(subscriber)
    return int(row[0])


def state(conn: sqlite3.Connection) -> tuple[int, int, int]:
    head, messages, size = conn.execute("SELECT head, messages, bytes FROM state").fetchone()
    return int(head), int(messages), int(size)


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a store made by an older version up to this schema (in the open transaction)."""
    (counted,) = conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM usage").fetchone()
    if int(counted) != state(conn)[2]:
        # A store from before per-sender usage: count it once.
        conn.execute("DELETE FROM usage")
        conn.execute(
            "INSERT INTO usage (sender, bytes, messages)"
            " SELECT sender, SUM(size), COUNT(*) FROM messages GROUP BY sender"
        )
