"""The SQLite store's append, statement by statement: one INSERT per stored message (no
per-row trigger, no duplicate lookup unless another check fails), and counters that stay
exact (state, usage) in a new store and in one made with the per-row triggers."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from broker.store import Appended, Rejected, SqliteMessageStore
from broker.store.messages import append_messages
from broker.store.schema import SCHEMA
from broker.store.writer import open_write_connection
from tests.test_store import MiB, message

# The per-row triggers a store made before append kept its counters itself.
OLD_TRIGGERS = """
CREATE TRIGGER message_added AFTER INSERT ON messages BEGIN
    UPDATE state SET messages = messages + 1, bytes = bytes + new.size WHERE id = 1; END;
CREATE TRIGGER usage_added AFTER INSERT ON messages BEGIN
    INSERT INTO usage (sender, bytes, messages) VALUES (new.sender, new.size, 1)
    ON CONFLICT (sender) DO UPDATE SET bytes = bytes + new.size, messages = messages + 1; END;
"""


def _statements(conn: sqlite3.Connection, first: int, count: int, quota: int) -> list[str]:
    """The statements (trigger bodies included) of appending count messages from KOR."""
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    try:
        conn.execute("BEGIN IMMEDIATE")
        out = append_messages(
            conn,
            [message(sequence=i) for i in range(first, first + count)],
            1,
            max_bytes=64 * MiB,
            quota=quota,
            records=None,
            also=(),
        )
        conn.execute("COMMIT")
    finally:
        conn.set_trace_callback(None)
    assert all(isinstance(r, Appended) for r in out)
    return seen[1:-1]  # without BEGIN and COMMIT


def test_each_stored_message_costs_one_statement(tmp_path: Path) -> None:
    for quota in (0, 64 * MiB):
        conn = open_write_connection(tmp_path / f"s{quota}.db", SCHEMA)
        try:
            one = _statements(conn, 1, 1, quota)
            many = _statements(conn, 2, 17, quota)
        finally:
            conn.close()
        # Sixteen more messages: sixteen more INSERTs, nothing else per message.
        assert len(many) - len(one) == 16, many
        assert sum(s.startswith("INSERT INTO messages") for s in many) == 17
        assert not [s for s in many if "TRIGGER" in s or "FROM messages" in s]


async def test_a_duplicate_that_fails_another_check_is_refused_as_a_duplicate(
    tmp_path: Path,
) -> None:
    store = await SqliteMessageStore.open(tmp_path / "s.db", max_bytes=MiB, sender_bytes=1000)
    try:
        assert await store.append([message(sequence=5, size=600)], 1) == [Appended(1)]
        out = await store.append(
            [
                message(sequence=3, message_id="KOR-5"),  # also not above 5
                message(sequence=6, message_id="KOR-5", size=600),  # also over the quota
                message(sequence=6, size=600),  # over the quota only
                message(sequence=4),  # not above 5 only
            ],
            2,
        )
        assert out == [
            Rejected("duplicate_id"),
            Rejected("duplicate_id"),
            Rejected("quota_exceeded", 600, 1000),
            Rejected("sequence_not_increasing"),
        ]
        stats = await store.stats()
        assert (stats.messages, stats.bytes, stats.head) == (1, 600, 1)
        assert await store.usage() == {"KOR": 600}
    finally:
        await store.close()


async def test_counters_stay_exact_in_a_store_made_with_per_row_triggers(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    store = await SqliteMessageStore.open(path, max_bytes=MiB)
    assert await store.append([message(sequence=1, size=100)], 1) == [Appended(1)]
    await store.close()
    with sqlite3.connect(path) as raw:
        raw.executescript(OLD_TRIGGERS)
    store = await SqliteMessageStore.open(path, max_bytes=MiB, max_age_ms=10)
    try:
        batch = [message(sequence=2, size=200), message(sender="USA", sequence=1, size=300)]
        assert await store.append(batch, 5) == [Appended(2), Appended(3)]
        stats = await store.stats()
        assert (stats.messages, stats.bytes) == (3, 600)
        assert await store.usage() == {"KOR": 300, "USA": 300}
        assert await store.enforce_retention(12) == 1  # the first message, by age
        stats = await store.stats()
        assert (stats.messages, stats.bytes) == (2, 500)
        assert await store.usage() == {"KOR": 200, "USA": 300}
    finally:
        await store.close()


async def test_settling_in_order_writes_no_settled_marks(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = await SqliteMessageStore.open(path, max_bytes=MiB)
    seen: list[str] = []
    try:
        await store.append([message(sequence=i) for i in range(1, 9)], 1)
        assert await store.ensure_cursor("GBR", 0) == 0
        store._writer._conn.set_trace_callback(seen.append)
        assert await store.settle("GBR", [1, 2, 3]) == 3
        assert await store.settle("GBR", [4, 5]) == 5
        assert not [s for s in seen if "INTO settled" in s]
        # Out of order: marks for what lies beyond the first gap, pruned once it closes.
        assert await store.settle("GBR", [7, 8]) == 5
        assert sum("INTO settled" in s for s in seen) == 2
        with sqlite3.connect(path) as raw:
            assert raw.execute("SELECT msg_offset FROM settled").fetchall() == [(7,), (8,)]
        assert await store.settle("GBR", [6]) == 8
        with sqlite3.connect(path) as raw:
            assert raw.execute("SELECT COUNT(*) FROM settled").fetchone() == (0,)
    finally:
        store._writer._conn.set_trace_callback(None)
        await store.close()


async def test_a_settle_in_order_and_a_senders_lookup_take_one_statement_each(
    tmp_path: Path,
) -> None:
    """The writer thread waits for the GIL after every statement, so the common cases are
    kept short: an in-order settle reads its cursor and the head together, and append
    reads a sender's last sequence and stored bytes together."""
    store = await SqliteMessageStore.open(tmp_path / "s.db", max_bytes=MiB, sender_bytes=1000)
    seen: list[str] = []
    try:
        await store.append([message(sequence=i) for i in range(1, 4)], 1)
        assert await store.ensure_cursor("GBR", 0) == 0
        store._writer._conn.set_trace_callback(seen.append)
        assert await store.settle("GBR", [1, 2]) == 2
        job = seen[seen.index("SAVEPOINT job") + 1 : seen.index("RELEASE job")]
        assert len(job) == 4, job  # cursor and head, first unsettled, move, prune
        seen.clear()
        await store.append([message(sequence=4)], 2)
        job = seen[seen.index("SAVEPOINT job") + 1 : seen.index("RELEASE job")]
        lookups = [s for s in job if "FROM senders" in s or "FROM usage" in s]
        assert len(lookups) == 1 and "FROM usage" in lookups[0], job
    finally:
        store._writer._conn.set_trace_callback(None)
        await store.close()
