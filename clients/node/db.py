"""The node's one SQLite file: inbox, quarantine, gaps, held-back deliveries, receive and
send state."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    id INTEGER PRIMARY KEY,
    sender TEXT NOT NULL,
    message_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    recipient_sequence INTEGER NOT NULL,
    topic TEXT NOT NULL,
    precedence TEXT NOT NULL,
    label TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    broker_offset INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    title TEXT NOT NULL,
    payload BLOB NOT NULL,
    hook_status TEXT,
    UNIQUE (sender, message_id));
CREATE INDEX IF NOT EXISTS inbox_received ON inbox (received_ms);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    received_ms INTEGER NOT NULL,
    broker_offset INTEGER NOT NULL,
    sender TEXT NOT NULL,
    message_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    envelope BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS gaps (
    sender TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    detected_ms INTEGER NOT NULL,
    reported INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (sender, first_seq));
CREATE TABLE IF NOT EXISTS expired (
    sender TEXT NOT NULL,
    message_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    recipient_sequence INTEGER NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    broker_offset INTEGER NOT NULL,
    stored_ms INTEGER NOT NULL,
    removed_ms INTEGER NOT NULL,
    noticed_ms INTEGER NOT NULL,
    PRIMARY KEY (sender, message_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rx_senders (
    sender TEXT PRIMARY KEY, high INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tx_sequences (
    scope TEXT PRIMARY KEY, last INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tx_free (
    scope TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (scope, n)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS parked (
    id INTEGER PRIMARY KEY,
    broker_offset INTEGER NOT NULL,
    sender TEXT NOT NULL,
    message_id TEXT NOT NULL,
    detail TEXT NOT NULL,
    parked_ms INTEGER NOT NULL,
    delivery BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the node database; raises OSError/sqlite3.Error."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        # The inbox holds decrypted content: readable by this user only, from the start.
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a row we acknowledged must survive a power cut, or the message is lost.
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(SCHEMA)
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT: writers in other processes wait instead of interleaving."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )
