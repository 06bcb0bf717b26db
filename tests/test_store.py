"""The message store contract: durability, group commit, ordering, cursors, retention,
limits. Each test runs on both backends (SQLite, and JetStream on the session's NATS
cluster) unless it says why it is about one."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from broker.store import (
    Appended,
    NewMessage,
    Rejected,
    SqliteMessageStore,
    StoredMessage,
    StoreError,
    StoreFull,
)
from broker.store.base import OutboxRow
from tests.store_backends import StoreOpener

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def message(
    sender: str = "KOR",
    sequence: int = 1,
    *,
    message_id: str | None = None,
    precedence: int = 1,
    size: int = 64,
    expiry_ms: int = 0,
) -> NewMessage:
    envelope = hashlib.sha256(f"{sender}/{sequence}".encode()).digest() * (size // 32 + 1)
    envelope = envelope[:size]
    return NewMessage(
        message_id=message_id or f"{sender}-{sequence}",
        sender=sender,
        sequence=sequence,
        topic="intel.ground.kor",
        precedence=precedence,
        classification=4,
        label=b"label",
        created_ms=1_000,
        expiry_ms=expiry_ms,
        envelope=envelope,
        digest=hashlib.sha256(envelope).digest(),
    )


def wal_bytes(path: Path) -> int:
    wal = Path(f"{path}-wal")
    return wal.stat().st_size if wal.exists() else 0


@pytest.fixture
async def store(opener: StoreOpener) -> AsyncIterator[Any]:
    s = await opener.open(max_bytes=64 * MiB)
    yield s
    await s.close()


async def test_append_assigns_contiguous_offsets_and_round_trips(
    store: Any,
) -> None:
    results = await store.append([message(sequence=1), message(sequence=2)], now_ms=5_000)
    assert results == [Appended(1), Appended(2)]
    got = await store.get(2)
    assert got is not None
    expected = message(sequence=2)
    assert (got.offset, got.stored_ms, got.envelope, got.message_id) == (
        2,
        5_000,
        expected.envelope,
        expected.message_id,
    )
    assert await store.head() == 2
    assert await store.get(3) is None
    assert await store.last_sequence("KOR") == 2
    assert await store.last_sequence("USA") == 0
    assert await store.has_message("KOR", "KOR-1")
    assert not await store.has_message("USA", "KOR-1")


async def test_duplicate_id_and_non_increasing_sequence_are_rejected(
    store: Any,
) -> None:
    assert await store.append([message(sequence=5)], now_ms=1) == [Appended(1)]
    results = await store.append(
        [
            message(sequence=9, message_id="KOR-5"),  # same id as stored
            message(sequence=5, message_id="new-a"),  # not above 5
            message(sequence=7),
            message(sequence=7, message_id="new-b"),  # not above 7 from this very batch
            message(sequence=8, message_id="KOR-7"),  # duplicate within the batch
            message(sender="USA", sequence=1),  # other senders have their own sequence
        ],
        now_ms=2,
    )
    assert results == [
        Rejected("duplicate_id"),
        Rejected("sequence_not_increasing"),
        Appended(2),
        Rejected("sequence_not_increasing"),
        Rejected("duplicate_id"),
        Appended(3),
    ]
    assert await store.last_sequence("KOR") == 7


async def test_malformed_messages_are_refused_before_storage(store: Any) -> None:
    bad_digest = message()
    bad_digest = NewMessage(**{**bad_digest.__dict__, "digest": bytes(32)})
    with pytest.raises(ValueError, match="digest"):
        await store.append([bad_digest], now_ms=1)
    with pytest.raises(ValueError, match="precedence"):
        await store.append([message(precedence=5)], now_ms=1)
    assert await store.head() == 0


async def test_group_commit_coalesces_concurrent_appends(store: Any) -> None:
    before = store.commits
    results = await asyncio.gather(
        *(store.append([message(sender=f"P{i:03d}")], now_ms=1) for i in range(200))
    )
    assert sorted(r[0].offset for r in results if isinstance(r[0], Appended)) == list(range(1, 201))
    commits = store.commits - before
    assert 1 <= commits <= 20, f"200 concurrent appends took {commits} commits"
    assert (await store.stats()).messages == 200


async def test_a_failing_caller_does_not_spoil_its_group(opener: StoreOpener) -> None:
    store = await opener.open(max_bytes=1000)
    try:
        big, small = message("USA", size=2000), message("KOR", size=100)
        outcomes = await asyncio.gather(
            store.append([big], now_ms=1),
            store.append([small], now_ms=1),
            return_exceptions=True,
        )
        assert isinstance(outcomes[0], StoreFull)
        assert outcomes[1] == [Appended(1)]
        assert not await store.has_message("USA", big.message_id)
    finally:
        await store.close()


async def test_store_full_writes_nothing_and_says_why(opener: StoreOpener) -> None:
    store = await opener.open(max_bytes=1000)
    try:
        assert await store.append([message(sequence=1, size=600)], now_ms=1) == [Appended(1)]
        batch = [message(sequence=2, size=300), message(sequence=3, size=300)]
        with pytest.raises(StoreFull, match=r"message store is full .* refusing new messages"):
            await store.append(batch, now_ms=2)
        stats = await store.stats()
        assert (stats.messages, stats.bytes, stats.head) == (1, 600, 1)
        assert await store.last_sequence("KOR") == 1
        # Still usable: a batch that fits is accepted, at the next offset.
        assert await store.append([message(sequence=2, size=300)], now_ms=3) == [Appended(2)]
    finally:
        await store.close()


async def test_disk_full_from_sqlite_maps_to_store_full(tmp_path: Path) -> None:
    """SQLite only: it caps the database file's page count."""
    store = await SqliteMessageStore.open(tmp_path / "s.db", max_bytes=1 << 40)
    try:
        await store.append([message(sequence=1)], now_ms=1)
        # Cap the file at its current size: SQLite then answers SQLITE_FULL, as on a full disk.
        await store._writer.submit(
            lambda conn: conn.execute(
                "PRAGMA max_page_count = " + str(conn.execute("PRAGMA page_count").fetchone()[0])
            )
        )
        with pytest.raises(StoreFull, match="full"):
            await store.append([message(sequence=2, size=256 * 1024)], now_ms=2)
        assert await store.head() == 1
        assert await store.last_sequence("KOR") == 1
    finally:
        await store.close()


async def test_pending_is_flash_first_then_oldest_first(store: Any) -> None:
    precedences = [1, 4, 2, 4, 3, 1, 2]
    await store.append(
        [message(sequence=i + 1, precedence=p) for i, p in enumerate(precedences)], now_ms=1
    )
    assert await store.ensure_cursor("USA", 0) == 0
    order = [m.offset for m in await store.pending("USA", 100)]
    assert order == [2, 4, 5, 3, 7, 1, 6]
    assert [m.offset for m in await store.pending("USA", 3)] == [2, 4, 5]
    await store.settle("USA", [4, 5])
    assert [m.offset for m in await store.pending("USA", 3)] == [2, 3, 7]
    assert await store.backlog_count("USA") == 5


async def test_settle_advances_cursor_over_contiguous_prefix(
    store: Any, opener: StoreOpener
) -> None:
    await store.append([message(sequence=i) for i in range(1, 7)], now_ms=1)
    assert await store.ensure_cursor("USA", 0) == 0
    assert await store.settle("USA", [2, 3]) == 0  # 1 still open
    assert await store.settle("USA", [5]) == 0
    assert await store.settle("USA", [1]) == 3  # 1..3 settled, 4 open
    assert await store.cursor("USA") == 3
    assert await store.settle("USA", [4, 6]) == 6
    assert await store.pending("USA", 10) == []
    assert await store.backlog_count("USA") == 0
    # settled marks below the cursor are pruned
    if opener.backend == "sqlite":
        with sqlite3.connect(opener.path) as raw:
            assert raw.execute("SELECT COUNT(*) FROM settled").fetchone()[0] == 0
    else:
        state = await store._cursors.get("USA")
        assert state is not None and state.settled == frozenset()


async def test_cursor_survives_reopen_and_is_per_subscriber(opener: StoreOpener) -> None:
    store = await opener.open(max_bytes=MiB)
    await store.append([message(sequence=i) for i in range(1, 4)], now_ms=1)
    await store.ensure_cursor("USA", 0)
    await store.ensure_cursor("GBR", await store.head())  # a new subscriber starts at the head
    await store.settle("USA", [1, 2])
    await store.close()
    store = await opener.open(max_bytes=MiB)
    try:
        assert await store.ensure_cursor("USA", 0) == 2  # existing cursor is kept
        assert await store.cursor("GBR") == 3
        assert await store.cursor("NOPE") is None
        assert [m.offset for m in await store.pending("USA", 10)] == [3]
        with pytest.raises(StoreError, match="no cursor"):
            await store.pending("NOPE", 10)
        with pytest.raises(StoreError, match="no cursor"):
            await store.settle("NOPE", [1])
    finally:
        await store.close()


async def test_retention_by_age_expiry_and_size(opener: StoreOpener) -> None:
    store = await opener.open(max_bytes=MiB, retention_bytes=250, max_age_ms=10_000)
    try:
        await store.append([message(sequence=1, size=100)], now_ms=1_000)
        await store.append([message(sequence=2, size=100, expiry_ms=20_000)], now_ms=12_000)
        await store.append([message(sequence=i, size=100) for i in (3, 4, 5)], now_ms=13_000)
        await store.ensure_cursor("USA", 0)
        # Age removes 1 (stored before 21_000 - 10_000 = 11_000); expiry removes 2;
        # size then removes 3 so that 200 bytes (<= 250) remain.
        assert await store.enforce_retention(now_ms=21_000) == 3
        stats = await store.stats()
        assert (stats.messages, stats.bytes, stats.head) == (2, 200, 5)
        assert [m.offset for m in await store.pending("USA", 10)] == [4, 5]
        assert await store.settle("USA", [4, 5]) == 5  # removed offsets count as settled
        assert await store.enforce_retention(now_ms=100_000) == 2
        [appended] = await store.append([message(sequence=6)], now_ms=100_000)
        assert isinstance(appended, Appended) and appended.offset > 5
        if opener.backend == "sqlite":  # JetStream's retention entries take sequences too
            assert appended == Appended(6)
        assert await store.last_sequence("KOR") == 6
    finally:
        await store.close()


def _records(stored: Sequence[StoredMessage]) -> list[str]:
    return [f"accepted {m.message_id} at {m.offset}" for m in stored]


async def test_an_append_commits_its_audit_records_with_its_messages(
    opener: StoreOpener,
) -> None:
    """The outbox: records(the stored messages) and the caller's other records are in
    the append's own commit, in order; rejected messages get none; a StoreFull append
    writes no record either; the drainer's reads and forgets survive a reopen, and an
    id is never reused. (Outbox ids are ascending on both backends; on JetStream they
    are stream sequences, shared with the messages, so only SQLite's are 1, 2, 3.)"""
    sqlite = opener.backend == "sqlite"
    store = await opener.open(max_bytes=1000)
    try:
        got = await store.append(
            [message(sequence=1), message(sequence=1, message_id="dup")],
            now_ms=5,
            records=_records,
            also=["refused KOR-x"],
        )
        assert got == [Appended(1), Rejected("sequence_not_increasing")]
        first = await store.read_outbox(0, 10)
        assert [(r.time_ms, r.record) for r in first] == [
            (5, "accepted KOR-1 at 1"),
            (5, "refused KOR-x"),
        ]
        assert first[0].id < first[1].id
        if sqlite:
            assert [r.id for r in first] == [1, 2]
        with pytest.raises(StoreFull):
            await store.append(
                [message(sequence=2, size=2000)], now_ms=6, records=_records, also=["no"]
            )
        await store.record(["delivered 1"], now_ms=7)
        [delivered] = await store.read_outbox(first[1].id, 10)
        assert (delivered.record, delivered.time_ms) == ("delivered 1", 7)
        assert [r.id for r in await store.read_outbox(0, 2)] == [r.id for r in first]
        await store.forget_outbox(delivered.id)
        if sqlite:  # the delete rides on the next write transaction
            assert len(await store.read_outbox(0, 10)) == 3
            await store.ensure_cursor("USA", 0)
        assert await store.read_outbox(0, 10) == []
    finally:
        await store.close()
    store = await opener.open(max_bytes=1000)
    try:
        [appended] = await store.append([message(sequence=2)], now_ms=8, records=_records)
        assert isinstance(appended, Appended)
        [row] = await store.read_outbox(0, 10)
        assert (row.time_ms, row.record) == (8, f"accepted KOR-2 at {appended.offset}")
        assert row.id > delivered.id
        if sqlite:
            assert row == OutboxRow(4, 8, "accepted KOR-2 at 2")
    finally:
        await store.close()


def _open_code(opener: StoreOpener, options: str) -> str:
    """Python that opens opener's store as ``store`` in a child process (inside main())."""
    if opener.settings is None:
        return f"store = await SqliteMessageStore.open({str(opener.path)!r}, {options})"
    settings = opener.settings
    return (
        f"nc = await connect(ClusterSettings({settings.servers!r}, prefix={settings.prefix!r}))"
        f"; store = await JetStreamMessageStore.open(nc, ClusterSettings("
        f"{settings.servers!r}, prefix={settings.prefix!r}), {options})"
    )


_IMPORTS = (
    "from broker.store import Appended, NewMessage, SqliteMessageStore; "
    "from broker.jetstream.connect import ClusterSettings, connect; "
    "from broker.jetstream.store import JetStreamMessageStore"
)


async def test_a_crash_keeps_an_appends_records_with_its_messages(opener: StoreOpener) -> None:
    """SIGKILL right after an append returned: the reopened store holds the message and
    its record (both durable in one commit; on JetStream, on a quorum of the cluster)."""
    code = textwrap.dedent(
        f"""
        import asyncio, os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from tests.test_store import message
        {_IMPORTS}

        async def main():
            {_open_code(opener, "max_bytes=1 << 20")}
            await store.append([message(sequence=1)], 1, records=lambda ms: ["r1"])
            print("appended", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
        """
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert out == b"appended\n" and proc.returncode == -signal.SIGKILL
    store = await opener.open(max_bytes=1 << 20)
    try:
        assert await store.head() == 1
        assert [r.record for r in await store.read_outbox(0, 10)] == ["r1"]
    finally:
        await store.close()


async def test_verify_integrity_finds_envelopes_altered_on_disk(tmp_path: Path) -> None:
    """SQLite only: a JetStream client cannot alter a replicated stream's files (see
    test_jetstream_store for its verify_integrity)."""
    path = tmp_path / "s.db"
    store = await SqliteMessageStore.open(path, max_bytes=MiB)
    try:
        await store.append([message(sequence=i) for i in range(1, 6)], now_ms=1)
        assert await store.verify_integrity() == []
        with sqlite3.connect(path) as raw:
            raw.execute(
                "UPDATE messages SET envelope = CAST('forged' AS BLOB) WHERE msg_offset = 3"
            )
        assert await store.verify_integrity() == [3]
    finally:
        await store.close()


async def test_close_checkpoints_the_wal(tmp_path: Path) -> None:
    """SQLite only: the write-ahead log is SQLite's."""
    path = tmp_path / "s.db"
    store = await SqliteMessageStore.open(path, max_bytes=MiB)
    await store.append([message(sequence=i) for i in range(1, 50)], now_ms=1)
    await store.close()
    assert wal_bytes(path) == 0
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 49


_CHILD = textwrap.dedent(
    """
    import asyncio, hashlib, sys
    IMPORTS

    def msg(sender, seq, batch):
        envelope = hashlib.sha256(f"{sender}/{seq}".encode()).digest() * 32
        return NewMessage(f"{sender}-{seq}", sender, seq, "t.x", 1, 1,
                          f"batch={sender}/{batch}".encode(), 0, 0, envelope,
                          hashlib.sha256(envelope).digest())

    async def writer(store, sender):
        seq = 0
        for batch in range(1_000_000):
            msgs = [msg(sender, seq + i + 1, batch) for i in range(3)]
            seq += 3
            for r in await store.append(msgs, now_ms=1):
                assert isinstance(r, Appended)
                sys.stdout.write(f"{r.offset}\\n")
            sys.stdout.flush()

    async def main():
        OPEN
        await asyncio.gather(*(writer(store, f"P{i}") for i in range(8)))

    asyncio.run(main())
    """
)


@pytest.mark.slow
async def test_sigkill_never_loses_an_acknowledged_append(opener: StoreOpener) -> None:
    code = _CHILD.replace("IMPORTS", _IMPORTS).replace(
        "OPEN", _open_code(opener, "max_bytes=1 << 40")
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert child.stdout is not None
    acknowledged: list[int] = []
    while len(acknowledged) < 600:
        line = await asyncio.wait_for(child.stdout.readline(), timeout=60)
        assert line, "child exited early"
        acknowledged.append(int(line))
    child.send_signal(signal.SIGKILL)  # mid-burst: 8 writers are committing continuously
    rest = await child.stdout.read()
    await child.wait()
    acknowledged += [int(x) for x in rest.decode().split("\n")[:-1]]  # complete lines only

    store = await opener.open(max_bytes=1 << 40)
    try:
        head = await store.head()
        assert head >= max(acknowledged)
        assert await store.verify_integrity() == []
        stored = [await store.get(o) for o in range(1, head + 1)]
        assert all(m is not None for m in stored), "offsets are not contiguous"
        assert (await store.stats()).messages == head
        batches: dict[bytes, int] = {}
        for m in stored:
            assert m is not None
            batches[m.label] = batches.get(m.label, 0) + 1
        assert set(batches.values()) == {3}, "a batch was half-written"
        # A new append after recovery continues right after the head.
        more = await store.append([message("NEW")], now_ms=2)
        assert more == [Appended(head + 1)]
    finally:
        await store.close()
