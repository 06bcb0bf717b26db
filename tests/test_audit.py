"""AuditLog: hash chain, signed checkpoints, tamper detection, queries, export, concurrency.

The tests marked ``on both backends`` run against the SQLite log and the JetStream one
(a real three-node cluster); tampering with the file is the SQLite log's own matter.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import AuditBackend, AuditItem, AuditLog
from broker.audit.drainer import Drainer, _entries
from broker.audit.items import encode, encode_json, entry_fields
from broker.jetstream.audit import JetStreamAuditLog
from broker.jetstream.connect import connect
from broker.store import SqliteMessageStore
from coalition.audit_chain import GENESIS, canonical_bytes, checkpoint_body, entry_hash
from coalition.v1 import audit_pb2

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


Opener = Callable[[], Awaitable[AuditBackend]]
# Parametrise a test with this to run it on both backends (the default is SQLite).
on_both_backends = pytest.mark.parametrize("open_log", ["sqlite", "jetstream"], indirect=True)


@pytest.fixture
async def open_log(request: pytest.FixtureRequest, path: Path) -> AsyncIterator[Opener]:
    """Opens the test's log (again), checkpoint_every=10, on the backend of its parameter."""
    if getattr(request, "param", "sqlite") == "sqlite":

        async def sqlite() -> AuditBackend:
            return await AuditLog.open(path, KEY, checkpoint_every=10)

        yield sqlite
        return
    settings = request.getfixturevalue("cluster_settings")
    connections = []

    async def jetstream() -> AuditBackend:
        nc = await connect(settings)
        connections.append(nc)
        return await JetStreamAuditLog.open(nc, settings, KEY, checkpoint_every=10)

    try:
        yield jetstream
    finally:
        for nc in connections:
            await nc.close()


@pytest.fixture
async def log(open_log: Opener) -> AsyncIterator[AuditBackend]:
    a = await open_log()
    yield a
    await a.close()


async def fill(log: AuditBackend, n: int) -> None:
    for i in range(1, n + 1):
        await log.record(
            kind="publish.accepted" if i % 2 else "deliver",
            actor="urn:coalition:partner:KOR",
            partner="USA" if i % 3 else "GBR",
            message_id=f"m{i}",
            detail={"topic": "intel.ground.kor", "size": i, "label": "NATO SECRET // REL TO USA"},
            now_ms=1_000 * i,
        )


def tamper(path: Path, *sql: str) -> None:
    """Change the file behind the log's back, as an attacker with file access could."""
    with sqlite3.connect(path) as raw:
        raw.execute("DROP TRIGGER IF EXISTS entries_append_only_update")
        raw.execute("DROP TRIGGER IF EXISTS entries_append_only_delete")
        for statement in sql:
            raw.execute(statement)


@on_both_backends
async def test_chain_is_documented_encoding_and_verifies(log: AuditBackend) -> None:
    seq = await log.record(
        kind="policy.change",
        actor="urn:coalition:operator:alice",
        partner="UKR",
        detail={"b": 1, "a": "é"},
        now_ms=42,
    )
    assert seq == 1
    [entry] = await log.query()
    assert entry.detail_json == '{"a":"é","b":1}'
    assert (
        canonical_bytes(entry)
        == (
            '[1,42,"policy.change","urn:coalition:operator:alice","UKR","","allow",'
            '"{\\"a\\":\\"é\\",\\"b\\":1}"]'
        ).encode()
    )
    assert entry.prev_hash == GENESIS
    assert entry.hash == entry_hash(GENESIS, entry)
    await fill(log, 24)
    result = await log.verify(KEY.public_key())
    assert (result.ok, result.entries, result.checkpoints) == (True, 25, 2)
    assert (result.first_broken_seq, result.problem) == (0, "")
    assert await log.count() == 25


@on_both_backends
async def test_record_refuses_detail_that_is_not_plain_json(log: AuditBackend) -> None:
    with pytest.raises(ValueError, match="not plain JSON"):
        await log.record(kind="x", actor="a", detail={"k": b"bytes"}, now_ms=1)
    with pytest.raises(ValueError, match="not plain JSON"):
        await log.record(kind="x", actor="a", detail={"k": float("nan")}, now_ms=1)
    assert await log.count() == 0


@on_both_backends
async def test_checkpoints_are_signed_every_n_and_on_close(open_log: Opener) -> None:
    log = await open_log()
    await fill(log, 23)
    await log.close()
    log = await open_log()
    try:
        checkpoints = [r async for r in log.export() if isinstance(r, audit_pb2.AuditCheckpoint)]
        assert [c.seq for c in checkpoints] == [10, 20, 23]
        last = checkpoints[-1]
        assert last.time_ms == 23_000  # on close: the last entry's time, no clock read
        KEY.public_key().verify(last.signature, checkpoint_body(last.seq, last.hash, last.time_ms))
        explicit = await log.checkpoint(now_ms=99_000)
        assert (explicit.seq, explicit.time_ms) == (23, 99_000)
        assert (await log.verify(KEY.public_key())).checkpoints == 4
    finally:
        await log.close()


COLUMNS = [
    "time_ms",
    "kind",
    "actor",
    "partner",
    "message_id",
    "decision",
    "detail_json",
    "prev_hash",
    "hash",
]


@pytest.mark.parametrize("column", COLUMNS)
async def test_altering_any_column_names_that_entry(log: AuditLog, path: Path, column: str) -> None:
    await fill(log, 25)
    value = (
        "randomblob(32)"
        if column.endswith("hash")
        else ("time_ms + 1" if column == "time_ms" else f"{column} || 'x'")
    )
    tamper(path, f"UPDATE entries SET {column} = {value} WHERE seq = 13")
    result = await log.verify(KEY.public_key())
    assert not result.ok
    assert result.first_broken_seq == 13
    assert result.problem.startswith("entry 13: ")


async def test_rewritten_entry_with_recomputed_hash_breaks_the_next_link(
    log: AuditLog, path: Path
) -> None:
    await fill(log, 25)
    [e] = await log.query(since_ms=13_000, until_ms=13_001)
    e.decision = "not_releasable"
    forged = entry_hash(e.prev_hash, e)
    tamper(
        path,
        f"UPDATE entries SET decision = 'not_releasable', hash = x'{forged.hex()}' WHERE seq = 13",
    )
    result = await log.verify(KEY.public_key())
    assert (result.first_broken_seq, result.problem) == (
        14,
        "entry 14: link to previous entry broken",
    )


async def test_deleting_a_row_is_detected(log: AuditLog, path: Path) -> None:
    await fill(log, 25)
    tamper(path, "DELETE FROM entries WHERE seq = 7")
    result = await log.verify(KEY.public_key())
    assert (result.ok, result.first_broken_seq) == (False, 7)
    assert result.problem == "entry 7: missing (the next entry is 8)"


async def test_truncating_the_tail_is_caught_by_the_checkpoint(log: AuditLog, path: Path) -> None:
    await fill(log, 20)  # checkpoint at 20
    tamper(path, "DELETE FROM entries WHERE seq > 18")
    result = await log.verify(KEY.public_key())
    assert (result.ok, result.first_broken_seq) == (False, 19)
    assert result.problem == "checkpoint at 20: entries from 19 are missing"


async def test_reordering_rows_is_detected(log: AuditLog, path: Path) -> None:
    await fill(log, 25)
    tamper(
        path,
        "UPDATE entries SET seq = -1 WHERE seq = 16",
        "UPDATE entries SET seq = 16 WHERE seq = 15",
        "UPDATE entries SET seq = 15 WHERE seq = -1",
    )
    result = await log.verify(KEY.public_key())
    assert (result.first_broken_seq, result.problem) == (
        15,
        "entry 15: hash does not match its content",
    )


async def test_forged_checkpoint_is_detected(log: AuditLog, path: Path) -> None:
    await fill(log, 25)
    forger = Ed25519PrivateKey.generate()
    [row] = sqlite3.connect(path).execute("SELECT hash FROM entries WHERE seq = 20").fetchall()
    bad = forger.sign(checkpoint_body(20, row[0], 20_000))
    tamper(path, f"UPDATE checkpoints SET signature = x'{bad.hex()}' WHERE seq = 20")
    result = await log.verify(KEY.public_key())
    assert (result.first_broken_seq, result.problem) == (20, "checkpoint at 20: bad signature")


async def test_checkpoint_hash_must_match_the_chain(log: AuditLog, path: Path) -> None:
    await fill(log, 12)
    other = bytes(32)
    sig = KEY.sign(checkpoint_body(10, other, 10_000))  # validly signed, wrong hash
    tamper(
        path,
        f"UPDATE checkpoints SET hash = x'{other.hex()}', signature = x'{sig.hex()}'"
        " WHERE seq = 10",
    )
    result = await log.verify(KEY.public_key())
    assert result.problem == "checkpoint at 10: hash does not match the chain"


@on_both_backends
async def test_verifying_with_the_wrong_key_fails(log: AuditBackend) -> None:
    await fill(log, 10)
    result = await log.verify(Ed25519PrivateKey.generate().public_key())
    assert result.problem == "checkpoint at 10: bad signature"


Query = Callable[[audit_pb2.AuditEntry], bool]


@on_both_backends
async def test_query_filters(log: AuditBackend) -> None:
    await fill(log, 30)
    everything = await log.query()
    assert [e.seq for e in everything] == list(range(1, 31))

    async def same(expected: Query, **kw: object) -> None:
        got = await log.query(**kw)  # type: ignore[arg-type]
        assert [e.seq for e in got] == [e.seq for e in everything if expected(e)]

    await same(lambda e: e.partner == "GBR", partner="GBR")
    await same(lambda e: e.kind.startswith("publish"), kind="publish")
    await same(lambda e: e.kind == "deliver", kind="deliver")
    await same(lambda e: 5_000 <= e.time_ms < 9_000, since_ms=5_000, until_ms=9_000)
    await same(lambda e: e.partner == "USA" and e.kind == "deliver", partner="USA", kind="del")
    assert [e.seq for e in await log.query(limit=3)] == [1, 2, 3]
    assert [e.seq for e in await log.query(limit=3, tail=True)] == [28, 29, 30]
    assert await log.query(kind="pub*") == []  # the prefix is literal, not a pattern


@on_both_backends
async def test_export_is_seq_order_with_checkpoints_after_their_entry(log: AuditBackend) -> None:
    await log.checkpoint(now_ms=0)  # of the empty log
    await fill(log, 21)
    records = [r async for r in log.export()]
    shape = [
        f"c{r.seq}" if isinstance(r, audit_pb2.AuditCheckpoint) else str(r.seq) for r in records
    ]
    expected = ["c0", *map(str, range(1, 11)), "c10", *map(str, range(11, 21)), "c20", "21"]
    assert shape == expected


@on_both_backends
async def test_concurrent_records_form_a_gap_free_chain(log: AuditBackend) -> None:
    before = log.commits
    seqs = await asyncio.gather(
        *(log.record(kind="deliver", actor="a", message_id=f"m{i}", now_ms=i) for i in range(300))
    )
    assert sorted(seqs) == list(range(1, 301))
    assert log.commits - before < 300 / 4  # group commit shared the fsyncs
    result = await log.verify(KEY.public_key())
    assert (result.ok, result.entries, result.checkpoints) == (True, 300, 30)


async def test_the_table_refuses_updates_through_sqlite(log: AuditLog, path: Path) -> None:
    await fill(log, 1)
    with sqlite3.connect(path) as raw, pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute("DELETE FROM entries")


@on_both_backends
async def test_a_drainer_restarted_after_the_audit_commit_chains_each_row_once(
    log: AuditBackend, tmp_path: Path
) -> None:
    store = await SqliteMessageStore.open(tmp_path / "messages.db", max_bytes=1 << 30)
    try:
        for i in range(5):
            item = AuditItem("publish.accepted", "KOR", "KOR", f"m{i}")
            await store.record([encode(item)], 1_000 + i)
        # The drainer's audit commit of the first two rows, then a crash before the
        # outbox forgot them: the next start forgets them unread and drains the rest.
        await log.append_outbox("messages", _entries("messages", await store.read_outbox(0, 2)))
        drainer = Drainer(log)
        drainer.add_source("messages", store)
        assert await drainer.start() == 3
        await drainer.close()
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "messages.db") as db:  # forgotten, once closed
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone() == (0,)
    entries = await log.query()
    assert [e.message_id for e in entries] == [f"m{i}" for i in range(5)]
    assert [e.time_ms for e in entries] == [1_000 + i for i in range(5)]
    assert await log.drained_through("messages") == 5
    assert (await log.verify(KEY.public_key())).ok


@on_both_backends
async def test_rows_of_either_outbox_form_drain_to_the_hashes_the_old_path_made(
    log: AuditBackend, tmp_path: Path
) -> None:
    """A store written by the previous version (JSON rows) and by this one (tagged rows),
    with an altered row among them: one chain, every hash what entry_fields + entry_hash
    give for the same records, verified, and the altered row chained as unreadable."""
    items = [
        AuditItem("publish.accepted", "KOR", "KOR", "m0", "allow", {"offset": 1, "t": "é"}),
        AuditItem("deliver", "broker", "USA", "m0", "allow", {"q": 'a"b\\c', "n": [1, 2.5]}),
        AuditItem("publish.refused", "KOR", "KOR", "", "deny", None),
        AuditItem("k", 'odd"actor', "p", "m\n", "allow", {"x": 1}),  # kept as JSON anyway
    ]
    texts = [encode_json(i) for i in items] + [encode(i) for i in items]
    store = await SqliteMessageStore.open(tmp_path / "messages.db", max_bytes=1 << 30)
    try:
        for n, text in enumerate(texts):
            await store.record([text], 1_000 + n)
        altered = encode(items[0]).replace("KOR", 'K"OR', 1)
        await store.record([altered], 2_000)
        drainer = Drainer(log)
        drainer.add_source("messages", store)
        assert await drainer.start() == len(texts) + 1
        await drainer.close()
    finally:
        await store.close()
    entries = await log.query()
    expected = [entry_fields(item, 1_000 + n) for n, item in enumerate(items + items)]
    prev = GENESIS
    for seq, e in enumerate(expected, start=1):
        e.seq, e.prev_hash = seq, prev
        e.hash = prev = entry_hash(prev, e)
    assert entries[:-1] == expected
    assert (entries[-1].kind, entries[-1].decision) == ("audit.unreadable", "deny")
    assert (await log.verify(KEY.public_key())).ok
