"""The JetStream message store across brokers: two stores on two connections to one
cluster (as two brokers) decide the same, commit atomically, and lose nothing when a
connection drops. The single-store contract is in test_store (both backends)."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from broker.jetstream import batches, codec
from broker.jetstream.connect import ClusterSettings, connect
from broker.jetstream.store import JetStreamMessageStore
from broker.store import Appended, Rejected, StoredMessage, StoreError
from broker.store.base import RejectReason, stored_message
from clients.cluster import NatsCluster
from tests.helpers import eventually
from tests.test_store import message

MiB = 1 << 20


class Brokers:
    """Stores of one deployment, each on its own connection (one per broker)."""

    def __init__(self, settings: ClusterSettings) -> None:
        self.settings = settings
        self.connections: list[Client] = []
        self.stores: list[JetStreamMessageStore] = []

    async def open(self, **options: int) -> JetStreamMessageStore:
        nc = await connect(self.settings, name="store-test")
        self.connections.append(nc)
        store = await JetStreamMessageStore.open(nc, self.settings, **{"max_bytes": MiB, **options})
        self.stores.append(store)
        return store

    async def close(self) -> None:
        for store in self.stores:
            if not store._committer._closed:
                await store.close()
        for nc in self.connections:
            if not nc.is_closed:
                await nc.close()


@pytest.fixture
async def brokers(cluster_settings: ClusterSettings) -> AsyncIterator[Brokers]:
    b = Brokers(cluster_settings)
    yield b
    await b.close()


async def until(check: Callable[[], bool]) -> None:
    await eventually(check, 10)


async def test_two_brokers_appending_for_one_sender_never_both_win(brokers: Brokers) -> None:
    """Each round both brokers append the sender's next sequence (and, every other
    round, the same message id) at once: exactly one wins, the other is refused with
    the reason the winner's message gives, and both end with the same state."""
    a, b = await brokers.open(), await brokers.open()
    wins = {"a": 0, "b": 0}
    for seq in range(1, 31):
        same_id = seq % 2 == 0
        ma = message(sequence=seq, message_id=f"KOR-{seq}" if same_id else f"a-{seq}")
        mb = message(sequence=seq, message_id=f"KOR-{seq}" if same_id else f"b-{seq}")
        [ra], [rb] = await asyncio.gather(a.append([ma], now_ms=1), b.append([mb], now_ms=1))
        won = [r for r in (ra, rb) if isinstance(r, Appended)]
        lost = [r for r in (ra, rb) if isinstance(r, Rejected)]
        assert len(won) == 1 and len(lost) == 1, (seq, ra, rb)
        reason: RejectReason = "duplicate_id" if same_id else "sequence_not_increasing"
        assert lost[0] == Rejected(reason)
        wins["a" if isinstance(ra, Appended) else "b"] += 1
    await until(lambda: b._view.applied == a._view.applied)
    for store in (a, b):
        assert await store.last_sequence("KOR") == 30
        assert (await store.stats()).messages == 30
        assert await store.head() == 30  # nothing else was written: offsets stay contiguous
    assert a._view.live == b._view.live
    # Which broker wins a round is up to the scheduler (on a loaded host one may win all
    # thirty); that every round has exactly one winner is the property.
    assert wins["a"] + wins["b"] == 30, wins


async def test_the_sender_quota_holds_across_brokers(brokers: Brokers) -> None:
    a, b = await brokers.open(sender_bytes=400), await brokers.open(sender_bytes=400)
    results = await asyncio.gather(
        *(
            (a if i % 2 else b).append([message("UKR", i, message_id=f"u{i}", size=150)], 1)
            for i in range(1, 9)
        )
    )
    stored = [r for [r] in results if isinstance(r, Appended)]
    refused = [r for [r] in results if isinstance(r, Rejected)]
    assert len(stored) == 2  # 300 of 400 bytes; a third would make 450
    assert {r.reason for r in refused} <= {"quota_exceeded", "sequence_not_increasing"}
    await until(lambda: b._view.applied == a._view.applied)
    assert await a.usage() == await b.usage() == {"UKR": 300}


async def test_a_batch_the_cluster_did_not_commit_stores_neither_message_nor_record(
    brokers: Brokers,
) -> None:
    """A message and its acceptance record are entries of one atomic batch: a batch
    whose commit never came (the writer died mid-batch), and one pinned to a stale
    sequence, leave neither in the stream; the next append takes their place."""
    store = await brokers.open()
    subjects = codec.Subjects(brokers.settings)
    m = message(sequence=1)
    entries = [
        batches.Entry(subjects.message(m), codec.message_headers(m, 1, "x"), m.envelope),
        batches.Entry(subjects.outbox, codec.plain_headers(1, "x"), b"accepted KOR-1"),
        batches.Entry(subjects.outbox, codec.plain_headers(1, "x"), b"another record"),
    ]
    # A writer that dies before its commit: the first two entries, then its connection goes.
    nc = await connect(brokers.settings, name="dies-mid-batch")
    batch_id = uuid.uuid4().hex
    for i, e in enumerate(entries[:2], 1):
        headers = {**e.headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(i)}
        if i == 1:
            headers["Nats-Expected-Last-Sequence"] = "0"
            assert (await nc.request(e.subject, e.data, timeout=5, headers=headers)).data == b""
        else:
            await nc.publish(e.subject, e.data, headers=headers)
    await nc.flush()
    await nc.close()
    # A batch pinned to a sequence the stream has passed.
    await store.record(["first"], now_ms=1)
    with pytest.raises(batches.WrongLastSequence):
        await batches.publish(
            brokers.connections[0], entries, expected_last=0, batch_id="stale", timeout=5
        )
    info = await brokers.connections[0].jetstream().stream_info(brokers.settings.name("MESSAGES"))
    assert (info.state.messages, info.state.last_seq) == (1, 1)
    again = await brokers.open()
    assert await again.head() == 0
    assert [r.record for r in await again.read_outbox(0, 10)] == ["first"]
    assert await again.append([m], now_ms=2, records=lambda ms: ["accepted"]) == [Appended(2)]
    await until(lambda: store._view.applied == 3)
    assert [r.record for r in await store.read_outbox(0, 10)] == ["first", "accepted"]


async def test_a_batch_goes_out_whole_before_the_writer_waits_for_an_answer(
    brokers: Brokers,
) -> None:
    """The first entry's acknowledgement is awaited with the commit's, not before the
    other entries are sent: no answer reaches the connection while the batch goes out
    (waiting for it first would add one round trip to every commit)."""
    store = await brokers.open()
    await store.record(["first"], now_ms=1)
    nc = await connect(brokers.settings, name="one-round-trip")
    brokers.connections.append(nc)
    subjects = codec.Subjects(brokers.settings)
    seen: list[int] = []
    send = nc.publish

    async def publish(*args: Any, **kwargs: Any) -> None:
        seen.append(nc.stats["in_msgs"])
        await send(*args, **kwargs)

    nc.publish = publish  # type: ignore[method-assign]
    ms = [message(sequence=i) for i in (1, 2, 3)]
    entries = [
        batches.Entry(subjects.message(m), codec.message_headers(m, 1, "y"), m.envelope) for m in ms
    ]
    last = await batches.publish(nc, entries, expected_last=1, batch_id="y", timeout=5)
    assert last == 4
    assert len(seen) == 3 and len(set(seen)) == 1, seen
    await until(lambda: store._view.head == 4)
    assert [await store.get(o) for o in (2, 3, 4)] == [
        stored_message(m, o, 1) for m, o in zip(ms, (2, 3, 4), strict=True)
    ]


async def test_a_message_entry_carries_its_fields_in_one_header(brokers: Brokers) -> None:
    """Every broker parses every entry's headers (in Python): a message's fields travel
    in one header, not one header each."""
    store = await brokers.open()
    m = message(sequence=1)
    assert await store.append([m], now_ms=7) == [Appended(1)]
    raw = await brokers.connections[0].jetstream().get_msg(brokers.settings.name("MESSAGES"), 1)
    mine = sorted(k for k in raw.headers or {} if not k.startswith("Nats-"))
    assert mine == [codec.H_BATCH, codec.H_MESSAGE]
    assert await store.get(1) == stored_message(m, 1, 7)


async def test_message_entries_written_one_header_per_field_are_still_read(
    brokers: Brokers,
) -> None:
    """Entries stored before the fields shared one header (one header per field) are
    read as they were: the view, reads by offset, and the next append's checks."""
    store = await brokers.open()
    m = replace(message(sequence=5), topic="intel.a b", label=b"")
    old = {
        "Coalition-Id": codec.token(m.message_id),
        "Coalition-Sender": codec.token(m.sender),
        "Coalition-Sequence": str(m.sequence),
        "Coalition-Topic": codec.token(m.topic),
        "Coalition-Precedence": str(m.precedence),
        "Coalition-Classification": str(m.classification),
        "Coalition-Label": "",
        "Coalition-Created": str(m.created_ms),
        "Coalition-Expiry": str(m.expiry_ms),
        "Coalition-Digest": m.digest.hex(),
        "Coalition-Stored": "7",
        "Coalition-Batch": "old",
    }
    subjects = codec.Subjects(brokers.settings)
    await brokers.connections[0].jetstream().publish(subjects.message(m), m.envelope, headers=old)
    await until(lambda: store._view.head == 1)
    assert await store.get(1) == stored_message(m, 1, 7)
    assert await store.last_sequence("KOR") == 5
    again = await brokers.open()
    assert await again.get(1) == stored_message(m, 1, 7)
    assert await again.append([message(sequence=5, message_id="later")], now_ms=8) == [
        Rejected("sequence_not_increasing")
    ]
    assert await again.append([message(sequence=6)], now_ms=8) == [Appended(2)]


async def test_the_records_a_write_commits_together_share_one_outbox_entry(
    brokers: Brokers,
) -> None:
    """An append's acceptance records (and its other records) are one entry of its
    batch, not one each; their outbox ids stay unique and ascending, above those of an
    entry written one record each (before records shared entries), and the drainer may
    forget part of an entry: the rest stays, and the entry is deleted once all of it is."""
    store = await brokers.open()
    subjects = codec.Subjects(brokers.settings)
    js = brokers.connections[0].jetstream()
    old = {codec.H_STORED: "3", codec.H_BATCH: "old"}
    await js.publish(subjects.outbox, b"written alone", headers=old)
    await until(lambda: store._view.applied == 1)
    ms = [message(sequence=i) for i in (1, 2, 3)]
    got = await store.append(ms, now_ms=5, records=_accepted, also=["line\nbreak", "also"])
    assert got == [Appended(2), Appended(3), Appended(4)]
    stream = brokers.settings.name("MESSAGES")
    assert (await js.stream_info(stream)).state.last_seq == 7  # 3 messages, 3 outbox entries
    rows = await store.read_outbox(0, 100)
    assert [r.record for r in rows] == [
        "written alone",
        "accepted 2",
        "accepted 3",
        "accepted 4",
        "line\nbreak",
        "also",
    ]
    ids = [r.id for r in rows]
    assert ids == sorted(set(ids)) and ids[0] == 1
    assert [r.time_ms for r in rows] == [3, 5, 5, 5, 5, 5]
    other = await brokers.open()
    assert await other.read_outbox(0, 100) == rows
    assert await store.read_outbox(ids[1], 2) == rows[2:4]
    await store.forget_outbox(ids[2])  # part of the acceptances' entry
    assert await store.read_outbox(0, 100) == rows[3:]
    info = await js.stream_info(stream)
    assert info.state.messages == 6  # the entry written alone is deleted, not the other
    await store.forget_outbox(ids[-1])
    assert await store.read_outbox(0, 100) == []
    await until(lambda: other._view.outbox == {})


async def test_a_store_reopened_after_its_connection_dropped_sees_everything_acknowledged(
    brokers: Brokers,
) -> None:
    a = await brokers.open()
    assert await a.append([message(sequence=i) for i in (1, 2, 3)], 5, records=_accepted) == [
        Appended(1),
        Appended(2),
        Appended(3),
    ]
    await a.ensure_cursor("USA", 0)
    assert await a.settle("USA", [1, 3]) == 1
    await brokers.connections[0].close()  # the broker's connection drops, nothing flushed
    b = await brokers.open()
    assert await b.head() == 3
    assert [r.record for r in await b.read_outbox(0, 10)] == [
        "accepted 1",
        "accepted 2",
        "accepted 3",
    ]
    assert await b.cursor("USA") == 1
    assert [m.offset for m in await b.pending("USA", 10)] == [2]
    got = await b.get(2)
    assert got is not None and got.envelope == message(sequence=2).envelope
    assert await b.verify_integrity() == []


def _accepted(stored: Sequence[StoredMessage]) -> list[str]:
    return [f"accepted {m.offset}" for m in stored]


async def test_what_one_broker_writes_the_other_reads(brokers: Brokers) -> None:
    """Appends, settles, sweeps and acknowledged notices made through one broker are
    what the other answers (once its view has read them)."""
    a = await brokers.open(max_age_ms=1_000)
    b = await brokers.open(max_age_ms=1_000)
    await a.append([message("KOR", i) for i in (1, 2, 3)], now_ms=1_000)
    for store in (a, b):
        await store.ensure_cursor("USA", 0)
    assert await b.wait_for_head(3, timeout=10)
    assert not await b.wait_for_head(4, timeout=0.05)  # nothing was stored there yet
    assert [m.offset for m in await b.pending("USA", 10)] == [1, 2, 3]
    assert await b.settle("USA", [1]) == 1
    assert await a.cursor("USA") == 1
    assert await a.backlog_count("USA") == 2

    def eligible(m: StoredMessage) -> Mapping[str, int]:
        return {"USA": m.sequence}

    swept = await b.sweep(5_000, eligible, lambda ns: [f"expired {n.offset}" for n in ns])
    assert swept.removed == 3 and [n.offset for n in swept.notices] == [2, 3]
    await until(lambda: a._view.applied == b._view.applied)
    assert await a.get(2) is None
    assert await a.usage() == {}
    assert [n.offset for n in await a.notices("USA", 10)] == [2, 3]
    assert [r.record for r in await a.read_outbox(0, 10)] == ["expired 2", "expired 3"]
    # A second sweep (here, through the other broker) finds nothing left to remove.
    assert (await a.sweep(5_000, eligible)).removed == 0
    assert await a.drop_notices("USA", [2]) == 1
    await until(lambda: b._view.applied == a._view.applied)
    assert [n.offset for n in await b.notices("USA", 10)] == [3]
    assert await b.last_sequence("KOR") == 3
    # The removed messages are gone from the stream too, not only from the state.
    info = await brokers.connections[0].jetstream().stream_info(brokers.settings.name("MESSAGES"))
    assert info.state.messages < info.state.last_seq


async def test_verify_integrity_reads_the_envelopes_back_from_the_cluster(
    brokers: Brokers,
) -> None:
    store = await brokers.open()
    await store.append([message(sequence=1), message(sequence=2)], now_ms=1)
    assert await store.verify_integrity() == []
    # An entry whose payload does not match its recorded digest (as a corrupted one).
    forged = replace(message(sequence=3), envelope=b"forged")
    js = brokers.connections[0].jetstream()
    subjects = codec.Subjects(brokers.settings)
    headers = codec.message_headers(forged, 1, "forged")
    await js.publish(subjects.message(forged), forged.envelope, headers=headers)
    await until(lambda: store._view.head == 3)
    assert hashlib.sha256(forged.envelope).digest() != forged.digest
    assert await store.verify_integrity() == [3]


async def _burst(
    store: JetStreamMessageStore, sender: str, acknowledged: dict[int, str], stop: asyncio.Event
) -> None:
    seq = 0
    while not stop.is_set():
        seq += 1
        [r] = await store.append([message(sender, seq)], now_ms=1)
        assert isinstance(r, Appended), r
        acknowledged[r.offset] = f"{sender}-{seq}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    [
        "kill",
        pytest.param("stop", marks=pytest.mark.cluster_long),
        pytest.param("stop-connected", marks=pytest.mark.cluster_long),
    ],
)
async def test_the_stream_leader_dies_mid_burst_and_nothing_acknowledged_is_lost(
    tmp_path: Path, fault: str
) -> None:
    """SIGKILL of the messages stream's leader, or SIGSTOP (longer than an election) of
    it or of the server the store is connected to, while four writers append: the
    writes wait for the new leader (or the client leaves the silent server) and go on;
    afterwards a store opened on a fresh connection holds every acknowledged message at
    its offset, each once."""
    with NatsCluster(tmp_path) as cluster:
        settings = ClusterSettings(servers=tuple(cluster.urls))
        brokers = Brokers(settings)
        try:
            store = await brokers.open(max_bytes=1 << 30)
            acknowledged: dict[int, str] = {}
            stop = asyncio.Event()
            writers = [
                asyncio.create_task(_burst(store, f"P{i}", acknowledged, stop)) for i in range(4)
            ]
            await eventually(lambda: len(acknowledged) >= 200, 30)
            js = brokers.connections[0].jetstream()
            info = await js.stream_info(settings.name("MESSAGES"))
            assert info.cluster is not None
            leader = next(n for n in cluster.nodes if n.name == info.cluster.leader)
            if fault == "stop-connected":
                url = brokers.connections[0].connected_url
                assert url is not None
                leader = next(n for n in cluster.nodes if n.client_port == url.port)
            before = len(acknowledged)
            if fault == "kill":
                leader.kill()
            else:
                leader.signal(signal.SIGSTOP)
            await eventually(lambda: len(acknowledged) >= before + 200, 60)
            if fault != "kill":
                leader.signal(signal.SIGCONT)
            stop.set()
            await asyncio.gather(*writers)
            reader = await brokers.open(max_bytes=1 << 30)
            assert await reader.head() >= max(acknowledged)
            for offset, message_id in acknowledged.items():
                got = await reader.get(offset)
                assert got is not None and got.message_id == message_id, offset
            ids = [m.message_id for m in reader._view.live.values()]
            assert len(ids) == len(set(ids)), "a message was stored twice"
            assert await reader.verify_integrity() == []
        finally:
            await brokers.close()


async def test_a_message_larger_than_one_nats_message_is_refused_alone(brokers: Brokers) -> None:
    store = await brokers.open(max_bytes=1 << 30)
    too_big = message(sequence=1, message_id="big", size=brokers.connections[0].max_payload)
    outcomes = await asyncio.gather(
        store.append([too_big], now_ms=1),
        store.append([message("USA", 1)], now_ms=1),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], StoreError) and "max_payload" in str(outcomes[0])
    assert outcomes[1] == [Appended(1)]
    assert not await store.has_message("KOR", "big")


def test_names_and_topics_become_safe_subject_tokens_and_come_back_exactly() -> None:
    hostile = ["", "KOR", "a.b", "*", ">", "a b", "tab\there", "ünï", "=41", "x\r\ny", "-_"]
    tokens = [codec.token(t) for t in hostile]
    assert len(set(tokens)) == len(hostile)  # one-to-one
    for text, tok in zip(hostile, tokens, strict=True):
        assert tok and all(c.isascii() and (c.isalnum() or c in "_-=") for c in tok), tok
        assert codec.untoken(tok) == text


async def test_a_hostile_sender_and_topic_are_stored_and_read_back_exactly(
    brokers: Brokers,
) -> None:
    a, b = await brokers.open(), await brokers.open()
    m = replace(
        message(sequence=1), sender="K.O*R >", topic="intel..gr ound.>.ü", message_id="id\n2"
    )
    assert await a.append([m], now_ms=3) == [Appended(1)]
    assert await b.wait_for_head(1, timeout=10)
    got = await b.get(1)
    assert got is not None
    assert (got.sender, got.topic, got.message_id, got.envelope) == (
        m.sender,
        m.topic,
        m.message_id,
        m.envelope,
    )
    assert await b.last_sequence("K.O*R >") == 1


async def test_a_lost_acknowledgement_is_resolved_from_the_stream_never_stored_twice(
    brokers: Brokers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster stored a batch but its acknowledgement never came back (as when the
    leader dies right after committing): the writer finds its batch in the stream and
    answers with its offsets; the retry it planned cannot store the messages again, and
    writes queued meanwhile are committed after it. (The lost reply is the one thing
    injected: a real batch is committed, then the writer is told nothing came back.)"""
    store = await brokers.open()
    real = batches.publish
    lost: list[int] = []

    async def ack_lost(*args: Any, **kwargs: Any) -> int:
        last = await real(*args, **kwargs)
        if not lost:
            lost.append(last)
            await asyncio.sleep(0.2)  # meanwhile another write queues
            raise batches.OutcomeUnknown("the acknowledgement was lost")
        return last

    monkeypatch.setattr(batches, "publish", ack_lost)
    first = asyncio.create_task(store.append([message(sequence=1)], 1, records=_accepted))
    await asyncio.sleep(0.05)
    second = store.append([message(sequence=2)], 1, records=_accepted)
    assert await first == [Appended(1)]
    assert await second == [Appended(3)]  # after KOR-1 and its record
    assert lost == [2]
    assert await store.last_sequence("KOR") == 2
    reader = await brokers.open()
    assert [m.message_id for m in reader._view.live.values()] == ["KOR-1", "KOR-2"]
    assert [r.record for r in await reader.read_outbox(0, 10)] == ["accepted 1", "accepted 3"]


async def test_retention_leaves_only_what_the_state_needs_in_the_stream(brokers: Brokers) -> None:
    """Removed messages, acknowledged notices and the control entries that removed them
    are deleted from the stream (only the latest checkpoint of the senders' sequences
    stays), and a store that reads the stream afresh has the same state."""
    store = await brokers.open(max_age_ms=1_000)
    await store.ensure_cursor("USA", 0)

    def eligible(m: StoredMessage) -> Mapping[str, int]:
        return {"USA": m.sequence}

    for round_ in range(3):
        seqs = range(round_ * 5 + 1, round_ * 5 + 6)
        await store.append([message("KOR", s) for s in seqs], now_ms=round_ * 10_000)
        swept = await store.sweep(round_ * 10_000 + 5_000, eligible)
        assert swept.removed == 5 and len(swept.notices) == 5
        assert await store.drop_notices("USA", [n.offset for n in swept.notices]) == 5
    await store.append([message("KOR", 16)], now_ms=99_000)
    await store.sweep(99_000)  # collects what the last drop left
    info = await brokers.connections[0].jetstream().stream_info(brokers.settings.name("MESSAGES"))
    # The live message, the last sweep's checkpoint and the last drop's control entry.
    assert info.state.messages <= 3, info.state
    fresh = await brokers.open(max_age_ms=1_000)
    assert await fresh.last_sequence("KOR") == 16
    assert await fresh.head() == await store.head()
    assert [m.message_id for m in fresh._view.live.values()] == ["KOR-16"]
    assert await fresh.notice_subscribers() == set()
    assert await fresh.append([message("KOR", 15, message_id="again")], 1) == [
        Rejected("sequence_not_increasing")
    ]


async def test_a_write_too_large_for_the_batch_is_not_overtaken_by_later_writes(
    brokers: Brokers,
) -> None:
    """Writes queued together past one atomic batch's entry limit: the one that does not
    fit waits for the next batch, and so does every write queued after it, so one
    sender's requests are stored in the order they were appended (a later, smaller
    write slipping into the first batch would refuse the earlier one's sequences)."""
    store = await brokers.open(max_bytes=64 * MiB)
    half = batches.MAX_ENTRIES * 3 // 5  # two of these never share a batch
    writes: list[list[Any]] = []
    seq = 0
    for count in (1, half, half, 5):
        writes.append(
            [message("KOR", seq + i, message_id=f"k{seq + i}") for i in range(1, count + 1)]
        )
        seq += count
    # Appended one after the other in one pass of the loop, as concurrent publishes are:
    # the writer finds all four queued.
    results = await asyncio.gather(*(store.append(w, now_ms=1) for w in writes))
    reasons = [r.reason for rs in results for r in rs if isinstance(r, Rejected)]
    assert reasons == []
    offsets = [r.offset for rs in results for r in rs if isinstance(r, Appended)]
    assert offsets == sorted(offsets) and len(offsets) == seq
    assert await store.last_sequence("KOR") == seq
