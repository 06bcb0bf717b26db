"""One writer per deployment: stores of two brokers hand their appends and records to
the store holding the writer lease, so only it commits on the messages stream and no
commit loses a race; a forwarded write whose answer never came is stored once; the lease
passes on when its holder stops."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from broker.jetstream import writer as writer_module
from broker.jetstream.connect import ClusterSettings
from broker.jetstream.store import JetStreamMessageStore
from broker.jetstream.writer import Writer
from broker.store import Appended, StoredMessage
from tests.test_jetstream_store import Brokers, until
from tests.test_store import message


def accepted(stored: Sequence[StoredMessage]) -> list[str]:
    return [f"accepted {m.sender}/{m.message_id} at {m.offset}" for m in stored]


@pytest.fixture
async def brokers(cluster_settings: ClusterSettings) -> AsyncIterator[Brokers]:
    b = Brokers(cluster_settings)
    yield b
    await b.close()


async def joined(brokers: Brokers) -> tuple[JetStreamMessageStore, Writer]:
    store = await brokers.open(max_bytes=8 << 20)
    nc = brokers.connections[-1]
    writer = await store.join_writer(nc, brokers.settings, {"acceptance": accepted})
    return store, writer


def outbox_texts(store: JetStreamMessageStore) -> list[str]:
    return [r.record for rows in store._view.outbox.values() for r in rows]


async def test_only_the_lease_holder_commits_and_no_commit_loses_a_race(
    brokers: Brokers,
) -> None:
    """Both brokers append for their own senders at the same moments, with acceptance
    records, and write records alone: the first store holds the lease and commits all
    of it, the second commits nothing itself, no pinned commit is refused (no lost race),
    every write is stored once, and each broker reads its own writes on return."""
    a, wa = await joined(brokers)
    b, wb = await joined(brokers)
    assert wa.holds and not wb.holds
    rounds = 25
    for seq in range(1, rounds + 1):
        ra, rb, _, _ = await asyncio.gather(
            a.append([message("KOR", seq)], 1, records=accepted),
            b.append([message("USA", seq), message("GBR", seq)], 1, records=accepted),
            a.record([f"decision a {seq}"], 1),
            b.record([f"decision b {seq}"], 1),
        )
        assert all(isinstance(r, Appended) for r in [*ra, *rb]), (ra, rb)
        for r in rb:  # read-your-writes on the broker that forwarded
            assert isinstance(r, Appended) and await b.get(r.offset) is not None
    assert b._committer.commits == 0  # the second broker never committed itself
    assert a._committer.lost == 0 and b._committer.lost == 0
    assert wb.forwarded == 2 * rounds and wb.fell_back == 0 and wa.served == 2 * rounds
    await until(lambda: b._view.applied == a._view.applied)
    assert a._view.live == b._view.live
    assert (await a.stats()).messages == 3 * rounds
    texts = outbox_texts(a)
    assert len(texts) == len(set(texts)) == 5 * rounds  # every record once
    assert outbox_texts(b) == texts
    for sender in ("KOR", "USA", "GBR"):
        assert await b.last_sequence(sender) == rounds


async def test_a_forwarded_write_left_unanswered_is_stored_once(
    brokers: Brokers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forwarded write whose answer is lost, so its sender commits the same write
    itself: when the holder committed it first, the sender's commit stores nothing and
    answers the holder's offsets; when the sender stops waiting at once, both commit it,
    in either order. Each write, its messages and its records are stored exactly once."""
    a, wa = await joined(brokers)
    b, wb = await joined(brokers)
    forward = wb.forward

    async def answer_lost(target: str, request: bytes) -> bytes | None:
        await forward(target, request)  # the holder commits it and answers
        return None

    monkeypatch.setattr(wb, "forward", answer_lost)
    [r1] = await b.append([message("USA", 1)], 1, records=accepted)
    await b.record(["decision 1"], 1)
    assert b._committer.commits == 0  # found in the stream, not stored again
    assert r1 == Appended(1) and await b.get(1) is not None
    monkeypatch.setattr(wb, "forward", forward)
    monkeypatch.setattr(writer_module, "FORWARD_TIMEOUT_S", 0.0)
    rounds = 15
    for seq in range(2, rounds + 1):
        wb._holder, wb._dead = wa.subject, ""  # forward every write, however it went
        [r] = await b.append([message("USA", seq)], 1, records=accepted)
        assert isinstance(r, Appended), r
        wb._holder, wb._dead = wa.subject, ""
        await b.record([f"decision {seq}"], 1)
    assert wb.fell_back == 2 * (rounds - 1)
    await until(lambda: wa.served == 2 * rounds)
    await until(lambda: b._view.applied == a._view.applied)
    assert (await a.stats()).messages == rounds
    assert await a.last_sequence("USA") == rounds
    texts = outbox_texts(a)
    assert len(texts) == len(set(texts)) == 2 * rounds


async def test_the_lease_passes_on_when_its_holder_stops(brokers: Brokers) -> None:
    """The holder closes (it gives the lease back): the other broker's next write, sent to
    a subject nobody serves any more, is committed by that broker itself, which then
    takes the lease; a third broker's writes go to the new holder."""
    a, _ = await joined(brokers)
    b, wb = await joined(brokers)
    await b.append([message("USA", 1)], 1)
    assert b._committer.commits == 0
    await a.close()
    [r] = await b.append([message("USA", 2)], 1, records=accepted)
    assert isinstance(r, Appended)
    await until(lambda: wb.holds)
    c, wc = await joined(brokers)
    assert not wc.holds
    [r] = await c.append([message("GBR", 1)], 1, records=accepted)
    assert isinstance(r, Appended) and c._committer.commits == 0 and wc.forwarded == 1
    assert await c.last_sequence("USA") == 2


async def test_a_refusal_made_by_the_holder_reaches_the_forwarding_broker(
    brokers: Brokers,
) -> None:
    """The rules are decided where the write is committed and their answers travel back:
    a duplicate id, a sequence not increasing, the quota's numbers."""
    a, _ = await joined(brokers)
    b, wb = await joined(brokers)
    await a.append([message("USA", 5)], 1)
    results = await b.append(
        [message("USA", 5), message("USA", 4, message_id="other"), message("USA", 6)], 1
    )
    assert [type(r).__name__ for r in results] == ["Rejected", "Rejected", "Appended"]
    assert [getattr(r, "reason", "") for r in results[:2]] == [
        "duplicate_id",
        "sequence_not_increasing",
    ]
    assert wb.forwarded == 1


async def test_a_write_taking_the_other_way_waits_and_is_not_overtaken() -> None:
    """One broker's writes go all forwarded or all local: a local write waits for the
    forwarded ones in flight, and a forwarded write made after it waits behind it."""
    lanes = writer_module._Lanes()
    order: list[str] = []
    release = asyncio.Event()

    async def write(name: str, forwarding: bool, hold: asyncio.Event | None = None) -> None:
        async with lanes.use(forwarding):
            order.append(f"{name} starts")
            if hold is not None:
                await hold.wait()
            order.append(f"{name} done")

    first = asyncio.create_task(write("forwarded 1", True, release))
    await asyncio.sleep(0)
    local = asyncio.create_task(write("local", False))
    await asyncio.sleep(0)
    later = asyncio.create_task(write("forwarded 2", True))
    await asyncio.sleep(0.01)
    assert order == ["forwarded 1 starts"]
    release.set()
    await asyncio.gather(first, local, later)
    assert order == [
        "forwarded 1 starts",
        "forwarded 1 done",
        "local starts",
        "local done",
        "forwarded 2 starts",
        "forwarded 2 done",
    ]
