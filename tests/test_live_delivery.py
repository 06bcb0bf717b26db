"""Live delivery (publish hands new messages to caught-up subscribers) and SDK publish
coalescing, over a real broker on mTLS with its real SQLite store and audit log."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.exchange import live as live_mod
from broker.exchange import publish as publish_mod
from broker.server import Broker
from broker.store import SqliteMessageStore
from clients.sdk import PartnerClient, Subscription
from clients.sdk import publish as sdk_publish
from coalition.labels import Classification, Precedence, parse_label
from coalition.policy import policy_to_proto
from coalition.v1 import exchange_pb2
from tests.helpers import (
    admit,
    eventually,
    operator,
    partner,
    policy,
    running_broker,
    sqlite_only,
)
from tests.v2_batches import forged_signature

LABEL = parse_label("NATO SECRET // REL TO KOR, USA")
TOPIC = "intel.ground"


class CountingStore:
    """The broker's store, counting the subscribers' store reads."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def pending_and_head(self, subscriber: str, limit: int, exclude: Any = ()) -> Any:
        self.reads += 1
        return await self.inner.pending_and_head(subscriber, limit, exclude)


async def _broker(pki: Path, data: Path, **kw: object) -> Broker:
    b = await running_broker(pki, data, **kw)
    for code in ("KOR", "USA"):
        await admit(pki, b.port, policy(code))
    return b


@pytest.fixture
async def pair(
    pki: Path, tmp_path: Path, backend: dict[str, object]
) -> AsyncIterator[tuple[Broker, PartnerClient, PartnerClient]]:
    b = await _broker(pki, tmp_path / "broker", **backend)
    kor, usa = partner(pki, "KOR", b.port), partner(pki, "USA", b.port)
    await kor.register_keys()
    await usa.register_keys()
    try:
        yield b, kor, usa
    finally:
        await kor.close()
        await usa.close()
        await b.stop(grace=1)


async def _publish(kor: PartnerClient, bodies: list[bytes], **kw: Any) -> list[int]:
    envs = [
        (await kor.seal(body, topic=TOPIC, label=LABEL, recipients=["USA"], **kw)).envelope
        for body in bodies
    ]
    results = await kor.publish(envs)
    assert all(r.outcome == exchange_pb2.ACCEPTED for r in results), results
    return [r.offset for r in results]


async def _open_and_ack(client: PartnerClient, sub: Subscription, got: list[bytes]) -> None:
    """Open every delivery of sub, keep its plaintext in got, acknowledge it."""
    async for d in sub:
        got.append((await client.open(d)).plaintext)
        await sub.ack([d.offset])


@sqlite_only("the live feed is off on JetStream: each delivery is read from the shared store")
async def test_caught_up_subscriber_is_fed_without_store_reads(
    pair: tuple[Broker, PartnerClient, PartnerClient],
) -> None:
    b, kor, usa = pair
    counting = CountingStore(b.exchange.store)
    b.exchange.store = counting
    await _publish(kor, [b"backlog"])
    sub = usa.subscribe([TOPIC])
    got: list[bytes] = []
    task = asyncio.create_task(_open_and_ack(usa, sub, got))
    try:
        await eventually(lambda: got == [b"backlog"] and sub.caught_up.is_set())
        reads = counting.reads
        live = [f"live {i}".encode() for i in range(20)]
        for body in live:
            await _publish(kor, [body])
        await eventually(lambda: len(got) == 21)
        assert got == [b"backlog", *live]  # in order, each once
        # Only the first turn read the store; the live messages were handed over.
        assert counting.reads == reads
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sub.aclose()
    # The chain still records every acceptance before that message's delivery.
    entries = await b.audit.query(partner="USA", kind="deliver")
    accepted = {e.message_id: e.seq for e in await b.audit.query(kind="publish.accepted")}
    assert len(accepted) == 21
    for e in entries:
        for mid in json.loads(e.detail_json)["message_ids"]:
            assert accepted[mid] < e.seq


@sqlite_only("the live feed is off on JetStream: each delivery is read from the shared store")
async def test_a_caught_up_delivery_rides_its_publishs_commit(
    pair: tuple[Broker, PartnerClient, PartnerClient],
) -> None:
    """A caught-up stream's delivery decision is recorded in the publish's own store
    commit: publish to delivery costs one commit, and the decision is in the chain
    once, after the acceptance."""
    b, kor, usa = pair
    sub = usa.subscribe([TOPIC])
    got: list[exchange_pb2.Delivery] = []

    async def receive() -> None:
        async for d in sub:
            got.append(d)

    task = asyncio.create_task(receive())
    try:
        await eventually(lambda: sub.caught_up.is_set())
        assert isinstance(b.store, SqliteMessageStore)  # counts its commits
        commits = b.store.commits
        [offset] = await _publish(kor, [b"rides the publish's commit"])
        await eventually(lambda: len(got) == 1)
        assert got[0].offset == offset
        assert b.store.commits == commits + 1  # the append; no commit of its own
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sub.aclose()
    [delivered] = await b.audit.query(partner="USA", kind="deliver")
    [accepted] = await b.audit.query(kind="publish.accepted")
    assert json.loads(delivered.detail_json)["offsets"] == [offset]
    assert accepted.seq < delivered.seq and accepted.time_ms == delivered.time_ms


@sqlite_only("the live feed is off on JetStream: each delivery is read from the shared store")
async def test_a_request_is_routed_once_per_topic_and_label_for_a_caught_up_stream(
    pair: tuple[Broker, PartnerClient, PartnerClient],
) -> None:
    """Publish decides a caught-up stream's routing once per (topic, label, key
    wrapped), not per message: five messages on two topics, two decisions, and each
    message is delivered (or not) as if decided alone."""
    b, kor, usa = pair
    calls: list[str] = []
    route = b.exchange.pipeline._route

    def counting(*args: Any) -> Any:
        calls.append(args[2].topic)
        return route(*args)

    b.exchange.pipeline._route = counting
    sub = usa.subscribe([TOPIC])
    got: list[exchange_pb2.Delivery] = []

    async def receive() -> None:
        async for d in sub:
            got.append(d)

    task = asyncio.create_task(receive())
    try:
        await eventually(lambda: sub.caught_up.is_set())
        envs = [
            (await kor.seal(f"m{i}".encode(), topic=t, label=LABEL, recipients=["USA"])).envelope
            for i, t in enumerate([TOPIC, "intel.air", TOPIC, TOPIC, "intel.air"])
        ]
        results = await kor.publish(envs)
        offsets = [r.offset for r in results]
        await eventually(lambda: len(got) == 3)
        assert [d.offset for d in got] == [offsets[0], offsets[2], offsets[3]]
        assert sorted(calls) == ["intel.air", TOPIC]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sub.aclose()
    entries = await b.audit.query(partner="USA", kind="deliver")
    decided = {e.kind: json.loads(e.detail_json)["offsets"] for e in entries}
    assert decided == {
        "deliver": [offsets[0], offsets[2], offsets[3]],
        "deliver.denied": [offsets[1], offsets[4]],
    }


@sqlite_only("the live feed is off on JetStream: each delivery is read from the shared store")
async def test_a_policy_change_before_sending_decides_a_fed_message_again(
    pki: Path, pair: tuple[Broker, PartnerClient, PartnerClient]
) -> None:
    """Decided (and recorded) at publish while USA may receive it; USA's clearance is
    lowered before the stream sends it: decided again under the new policy, denied,
    recorded, not sent."""
    b, kor, usa = pair
    sub = usa.subscribe([TOPIC], window=1)
    got: list[exchange_pb2.Delivery] = []

    async def receive() -> None:
        async for d in sub:
            got.append(d)  # not acknowledged: the window stays full

    task = asyncio.create_task(receive())
    try:
        await eventually(lambda: sub.caught_up.is_set())
        [first] = await _publish(kor, [b"fills the window"])
        await eventually(lambda: len(got) == 1)
        [held] = await _publish(kor, [b"waits in the feed, decided"])
        async with operator(pki, "op1", b.port) as op:
            lowered = policy("USA", level=Classification.CONFIDENTIAL)
            resp = await op.set_policy(policy_to_proto(lowered), "test: lower at once")
            assert resp.WhichOneof("result") == "applied"
        await sub.ack([first])
        denied: list[Any] = []
        for _ in range(500):  # bounded: a failure ends
            denied = await b.audit.query(partner="USA", kind="deliver.denied")
            if denied:
                break
            await asyncio.sleep(0.02)
        assert [json.loads(e.detail_json)["offsets"] for e in denied] == [[held]]
        assert denied[0].decision == "above_clearance"
        assert [d.offset for d in got] == [first]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sub.aclose()


@sqlite_only("the live feed is off on JetStream: each delivery is read from the shared store")
async def test_overflowing_feed_falls_back_to_the_store(
    pair: tuple[Broker, PartnerClient, PartnerClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    b, kor, usa = pair
    monkeypatch.setattr(live_mod, "FEED_MAX_MESSAGES", 4)
    counting = CountingStore(b.exchange.store)
    b.exchange.store = counting
    sub = usa.subscribe([TOPIC], window=2)
    got: list[bytes] = []
    held: list[int] = []
    release = asyncio.Event()

    async def receive() -> None:
        async for d in sub:
            got.append((await usa.open(d)).plaintext)
            held.append(d.offset)
            if release.is_set():
                await sub.ack(held)
                held.clear()

    task = asyncio.create_task(receive())
    try:
        await asyncio.wait_for(sub.caught_up.wait(), 10)
        # The window (2) fills and is never acknowledged: the feed outgrows its bound.
        await _publish(kor, [b"r1", b"r2", b"r3", b"r4", b"r5", b"r6"])
        await eventually(lambda: got == [b"r1", b"r2"])
        # A FLASH message published now waits in the store behind older ROUTINE ones;
        # the fallback read delivers it first.
        await _publish(kor, [b"flash"], precedence=Precedence.FLASH)
        reads = counting.reads
        release.set()
        await sub.ack(held)
        held.clear()
        await eventually(lambda: len(got) == 7)
        assert got[:3] == [b"r1", b"r2", b"flash"]
        assert sorted(got) == sorted([b"r1", b"r2", b"r3", b"r4", b"r5", b"r6", b"flash"])
        assert counting.reads > reads  # the overflow made it read the store again
        # ... and once caught up again it is fed live.
        await eventually(lambda: _is_live(b))
        reads = counting.reads
        await _publish(kor, [b"after"])
        await eventually(lambda: got[-1] == b"after")
        assert counting.reads == reads
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sub.aclose()


def _is_live(b: Broker) -> bool:
    return all(s.live_after is not None for s in b.exchange.live["USA"])


async def test_live_delivery_off_reads_every_turn_from_the_store(
    pki: Path, tmp_path: Path, backend: dict[str, object]
) -> None:
    b = await _broker(pki, tmp_path / "broker", live_delivery=False, **backend)
    kor, usa = partner(pki, "KOR", b.port), partner(pki, "USA", b.port)
    try:
        await kor.register_keys()
        await usa.register_keys()
        counting = CountingStore(b.exchange.store)
        b.exchange.store = counting
        sub = usa.subscribe([TOPIC])
        got: list[bytes] = []
        task = asyncio.create_task(_open_and_ack(usa, sub, got))
        await asyncio.wait_for(sub.caught_up.wait(), 10)
        reads = counting.reads
        for i in range(5):
            await _publish(kor, [f"m{i}".encode()])
        await eventually(lambda: len(got) == 5)
        assert got == [f"m{i}".encode() for i in range(5)]
        assert counting.reads >= reads + 5
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sub.aclose()
    finally:
        await kor.close()
        await usa.close()
        await b.stop(grace=1)


async def test_concurrent_publishes_are_merged_and_answered_each(
    pair: tuple[Broker, PartnerClient, PartnerClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, kor, _ = pair
    requests: list[int] = []
    real = sdk_publish._PublishStream.next_request

    async def counting(self: sdk_publish._PublishStream) -> exchange_pb2.PublishRequest | None:
        req = await real(self)
        if req is not None:
            requests.append(len(req.envelopes))
        return req

    monkeypatch.setattr(sdk_publish._PublishStream, "next_request", counting)
    sealed = [
        await kor.seal(f"m{i}".encode(), topic=TOPIC, label=LABEL, recipients=["USA"])
        for i in range(40)
    ]
    # One envelope is tampered with: only its caller is refused.
    sealed[17].envelope.CopyFrom(forged_signature(sealed[17].envelope))
    results = await asyncio.gather(*(kor.publish([s.envelope]) for s in sealed))
    assert sum(requests) == 40
    assert len(requests) < 40  # merged into fewer requests
    for i, (s, [r]) in enumerate(zip(sealed, results, strict=True)):
        assert r.message_id == s.message_id
        if i == 17:
            assert (r.outcome, r.reason_code) == (exchange_pb2.REFUSED, "bad_signature")
        else:
            assert r.outcome == exchange_pb2.ACCEPTED


async def test_pipelined_requests_keep_their_order(
    pair: tuple[Broker, PartnerClient, PartnerClient],
) -> None:
    """Many requests in flight on one stream (small: verified on the event loop) still
    reach the store in arrival order: every sequence is accepted, offsets ascend."""
    _, kor, _ = pair
    sealed = [
        await kor.seal(f"m{i}".encode(), topic=TOPIC, label=LABEL, recipients=["USA"])
        for i in range(30)
    ]

    async def requests() -> AsyncIterator[exchange_pb2.PublishRequest]:
        for i, s in enumerate(sealed):
            yield exchange_pb2.PublishRequest(batch_id=i + 1, envelopes=[s.envelope])

    responses = [r async for r in kor.stub.Publish(requests())]
    assert [r.batch_id for r in responses] == list(range(1, 31))
    results = [r.results[0] for r in responses]
    assert all(r.outcome == exchange_pb2.ACCEPTED for r in results), results
    offsets = [r.offset for r in results]
    assert offsets == sorted(offsets) and len(set(offsets)) == 30


async def test_small_requests_verified_inline_never_overtake_a_large_one(
    pair: tuple[Broker, PartnerClient, PartnerClient],
) -> None:
    """A large request goes to the verify thread; small ones right behind it on the same
    stream would be verified on the loop if the thread were idle, and would then reach
    the store first (refused: sequence not increasing). Every one must be accepted, in
    order, and the large ones must really have been handed to the thread."""
    b, kor, _ = pair
    big = publish_mod.INLINE_VERIFY_MAX * 5
    sizes = [big, 1, 1, big, 1, 2, big, 1]
    sealed = [
        (await kor.seal(f"m{i}".encode(), topic=TOPIC, label=LABEL, recipients=["USA"])).envelope
        for i in range(sum(sizes))
    ]
    core = b.exchange.pipeline
    handed: list[int] = []
    signed = core._signed

    def spy(partner_code: str, envelopes: Any) -> Any:
        if core._verifying:  # on the verify thread: the request was handed over
            handed.append(len(envelopes))
        return signed(partner_code, envelopes)

    core._signed = spy  # type: ignore[method-assign,assignment]

    async def requests() -> AsyncIterator[exchange_pb2.PublishRequest]:
        at = 0
        for n, size in enumerate(sizes):
            yield exchange_pb2.PublishRequest(batch_id=n + 1, envelopes=sealed[at : at + size])
            at += size

    responses = [r async for r in kor.stub.Publish(requests())]
    results = [r for resp in responses for r in resp.results]
    assert [r.outcome for r in results] == [exchange_pb2.ACCEPTED] * len(sealed), [
        r.reason for r in results if r.outcome != exchange_pb2.ACCEPTED
    ]
    offsets = [r.offset for r in results]
    assert offsets == sorted(offsets)
    assert handed.count(big) == 3


async def test_few_but_large_envelopes_are_verified_off_the_loop(
    pair: tuple[Broker, PartnerClient, PartnerClient],
) -> None:
    """Two envelopes over the inline byte bound go to the verify thread; two small ones
    are checked on the loop (the thread is idle). Both are accepted."""
    b, kor, _ = pair
    core = b.exchange.pipeline
    handed: list[int] = []
    signed = core._signed

    def spy(partner_code: str, envelopes: Any) -> Any:
        handed.append(len(envelopes) if core._verifying else 0)
        return signed(partner_code, envelopes)

    core._signed = spy  # type: ignore[method-assign,assignment]
    big = publish_mod.INLINE_VERIFY_MAX_BYTES // 2 + 1024
    await _publish(kor, [b"a" * big, b"b" * big])
    await _publish(kor, [b"c", b"d"])
    assert handed == [2, 0]  # [on the thread, inline]
