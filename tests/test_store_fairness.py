"""The shared store: one partner's volume never blocks or evicts another partner.

Each sender has a quota of stored bytes; retention by size trims only the senders above
their fair share; a message removed before an eligible recipient had it is audited as
expired for that recipient, who is told on its Subscribe stream (at once, or when it
next connects), and nobody hears about messages it could not have received.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import pytest

from broker.config import ConfigError, load_config
from broker.retention import expiry_records
from broker.server import Broker
from broker.store import Appended, NewMessage, Rejected, SqliteMessageStore, StoredMessage
from broker.store.sweeping import fair_level
from clients.node.inbox import Entry, Expired, Inbox
from clients.sdk import PartnerClient, Sequencer
from coalition import envelope as env
from coalition import envelope_v2
from coalition.epoch import SenderEpochs
from coalition.labels import Label, label_to_proto, parse_label
from coalition.pki import load_partner
from coalition.v1 import envelope_pb2, exchange_pb2
from tests.helpers import admit, eventually, now_ms, operator, partner, policy, running_broker
from tests.node_helpers import node, start_daemon, stop, write_config
from tests.store_backends import StoreOpener

KiB = 1024
TO_USA = parse_label("NATO SECRET // REL TO KOR, USA")
TO_GBR = parse_label("NATO SECRET // REL TO KOR, GBR")
# UKR's flood: released to UKR alone, so no partner may receive it (its key is wrapped
# for USA, which the label does not release to: the broker delivers it to nobody).
NOBODY = parse_label("NATO SECRET // REL TO UKR")


def unreadable(pki: Path, usa: env.Recipient, seq: int, size: int) -> envelope_pb2.Envelope:
    """A signed envelope (v2, as UKR's certificate asks) from UKR that no partner may read
    (see NOBODY)."""
    creds = load_partner(pki / "partners" / "UKR")
    assert creds.hybrid_signing_key is not None
    [e] = envelope_v2.seal_batch(
        [
            envelope_v2.Message(
                plaintext=os.urandom(size),
                topic="intel.flood",
                label=label_to_proto(NOBODY),
                precedence=1,
                content_type=env.INTEL_SUMMARY,
                recipients=[usa],
                sequence=seq,
                created_ms=now_ms(),
            )
        ],
        sender="UKR",
        signing_key=creds.hybrid_signing_key,
        signing_key_id=creds.signing_key_id,
        epochs=SenderEpochs("UKR"),
        created_ms=now_ms(),
    )
    return e


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait until the async check holds (a bound so a failure ends; no timing assertion)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def publish_one(client: PartnerClient, label: Label, body: bytes, topic: str) -> str:
    s = await client.seal(body, topic=topic, label=label, content_type="text/plain")
    [r] = await client.publish([s.envelope])
    assert r.outcome == exchange_pb2.ACCEPTED, r
    return r.message_id


# -- the finding, over real gRPC and mutual TLS ------------------------------------------


@pytest.fixture
async def small_store(pki: Path, tmp_path: Path) -> Broker:
    # The finding's shape at a small scale: a hard bound, a retention size well below
    # it, and each sender's quota below the bound (but above the retention size, so one
    # sender's volume alone sets off retention by size).
    b = await running_broker(
        pki,
        tmp_path / "broker",
        max_store_bytes=512 * KiB,
        sender_store_bytes=160 * KiB,
        retention_bytes=128 * KiB,
        retention_ms=0,
    )
    for code in ("UKR", "KOR", "USA", "GBR"):
        await admit(pki, b.port, policy(code))
    return b


async def test_a_flood_neither_blocks_nor_evicts_another_partner(
    pki: Path, small_store: Broker
) -> None:
    b = small_store
    try:
        async with (
            partner(pki, "UKR", b.port) as ukr,
            partner(pki, "KOR", b.port) as kor,
            partner(pki, "USA", b.port) as usa,
        ):
            for c in (ukr, kor, usa):
                await c.register_keys()
            peer = (await ukr.directory(refresh=True)).peers["USA"]
            assert peer.hpke_public is not None
            to_usa = env.Recipient("USA", peer.key_id, peer.hpke_public)

            # KOR's report waits in the store for USA, which is offline.
            waiting = await publish_one(kor, TO_USA, b"waiting for USA", "intel.ground")

            # UKR floods the store with envelopes nobody can read until refused, then tops
            # it up with the smallest it can make (1-byte payloads), so no room is left
            # for anything KOR could send. (Before quotas: 53 + a few envelopes filled the
            # store's 512 KiB and KOR's next report got store_full.)
            flood: list[exchange_pb2.PublishResult] = []
            seq = 0
            for size in (8 * KiB, 1):
                while seq < 400:
                    seq += 1
                    [r] = await ukr.publish([unreadable(pki, to_usa, seq, size)])
                    flood.append(r)
                    if r.outcome != exchange_pb2.ACCEPTED:
                        assert (r.status, r.reason_code) == (
                            "RESOURCE_EXHAUSTED",
                            "quota_exceeded",
                        ), r
                        break
            stored = sum(1 for r in flood if r.outcome == exchange_pb2.ACCEPTED)
            last = flood[-1]
            assert "UKR" in last.reason and str(160 * KiB) in last.reason
            usage = await b.store.usage()
            # Full: not even the smallest envelope UKR can make fits any more.
            smallest = unreadable(pki, to_usa, seq + 1, 1).ByteSize()
            assert 160 * KiB - smallest < usage["UKR"] <= 160 * KiB, (stored, usage)
            refused = await b.audit.query(kind="publish.refused", partner="UKR")
            assert [e.decision for e in refused] == ["quota_exceeded"] * 2

            # KOR is not affected: the store's own bound is far off.
            second = await publish_one(kor, TO_USA, b"after the flood", "intel.ground")
            usage = await b.store.usage()

            # Retention by size: the store holds more than retention_bytes, and only UKR
            # is above its fair share. KOR's messages stay.
            swept = await b.retention.sweep() if b.retention else None
            assert swept is not None and swept.removed > 0
            assert list(swept.by_reason) == ["retention_size"]
            after = await b.store.usage()
            assert sum(after.values()) <= 128 * KiB
            assert after["KOR"] == usage["KOR"]
            assert after["UKR"] < usage["UKR"]
            # Nobody could read UKR's flood: nobody is told about its removal.
            assert swept.notices == []
            assert await b.audit.query(kind="deliver.expired") == []

            # USA comes online and receives both of KOR's messages.
            got: list[str] = []
            sub = usa.subscribe(["intel.>"])
            async for d in sub:
                got.append((await usa.open(d)).header.message_id)
                await sub.ack([d.offset])
                if len(got) == 2:
                    break
            await sub.aclose()
            assert got == [waiting, second]
            assert sub.expired == []
    finally:
        await b.stop(grace=1)


async def test_an_expiry_is_audited_and_told_at_once_or_on_reconnect(
    pki: Path, tmp_path: Path
) -> None:
    """Retention by age removes messages that USA (offline) and GBR (online, slow) had
    not had: each expiry is audited for its recipient; GBR is told at once, USA's node
    when it reconnects, and `coalition-node status` / `inbox` show it. A partner hears
    nothing about messages it was not eligible for, or had."""
    b = await running_broker(pki, tmp_path / "broker", retention_ms=1500)
    try:
        for code in ("KOR", "USA", "GBR"):
            await admit(pki, b.port, policy(code))
        usa_cfg = write_config(tmp_path / "usa" / "node.toml", pki, "USA", b.port)
        log = tmp_path / "usa.log"
        # KOR numbers its messages per recipient, as a node does.
        numbered = Sequencer(per_recipient=True)
        kor_creds = load_partner(pki / "partners" / "KOR")
        async with (
            PartnerClient(kor_creds, f"127.0.0.1:{b.port}", sequencer=numbered) as kor,
            partner(pki, "GBR", b.port) as gbr,
        ):
            await gbr.register_keys()
            # USA's node runs, receives the first message, and stops.
            daemon = await start_daemon(usa_cfg, log)
            inbox = Inbox(usa_cfg.parent / "usa-inbox.db")
            try:
                await eventually(lambda: log.exists() and "caught up" in log.read_text(), 20)
                had = await publish_one(kor, TO_USA, b"delivered in time", "intel.ground")
                await eventually(lambda: inbox.counts() == (1, 0), 20)
                # Its acknowledgement settled (the cursor moved) before the node stops.
                async with asyncio.timeout(20):
                    while (await b.store.cursor("USA") or 0) < 1:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
            finally:
                assert await stop(daemon) == 0
            # While USA is offline: two messages for USA, two for GBR only.
            lost = [
                await publish_one(kor, TO_USA, f"lost {i}".encode(), "intel.ground")
                for i in range(2)
            ]
            for_gbr = [
                await publish_one(kor, TO_GBR, f"for GBR {i}".encode(), "intel.air")
                for i in range(2)
            ]

            # GBR is connected but slow: one delivery in flight, never acknowledged.
            told: list[exchange_pb2.Expired] = []

            async def record(notices: Sequence[exchange_pb2.Expired]) -> None:
                told.extend(notices)

            sub = gbr.subscribe(["intel.>"], window=1, on_expired=record)
            held: list[exchange_pb2.Delivery] = []

            async def read_gbr() -> None:
                async for d in sub:
                    held.append(d)

            reader = asyncio.create_task(read_gbr())
            await eventually(lambda: len(held) == 1, 10)
            await asyncio.sleep(1.6)  # everything is now older than retention_ms
            assert b.retention is not None
            swept = await b.retention.sweep()
            assert swept.removed == 5 and list(swept.by_reason) == ["retention_age"]

            # Audited per recipient, queryable by partner.
            async with operator(pki, "op1", b.port) as op:
                usa_audit = await op.audit(partner="USA", kind="deliver.expired")
                gbr_audit = await op.audit(partner="GBR", kind="deliver.expired")
                verdict = await op.verify_audit()
            assert verdict.ok, verdict.problem
            assert [e.decision for e in usa_audit] == ["retention_age"]
            usa_ids = json.loads(usa_audit[0].detail_json)["message_ids"]
            assert had not in usa_ids  # USA had it
            assert usa_ids == lost  # and GBR's were never USA's to receive
            assert [json.loads(e.detail_json)["message_ids"] for e in gbr_audit] == [for_gbr]

            # GBR, connected, is told at once; nothing about USA's messages.
            await eventually(lambda: len(told) == 2, 10)
            assert [(n.message_id, n.sender, n.reason) for n in told] == [
                (m, "KOR", "retention_age") for m in for_gbr
            ]
            assert [n.recipient_sequence for n in told] == [1, 2]
            await until(lambda: _no_notices(b, "GBR"))  # acknowledged: forgotten
            await sub.aclose()
            reader.cancel()

            # USA's node reconnects: it is told, records it, and shows it.
            daemon = await start_daemon(usa_cfg, log)
            try:
                await eventually(lambda: len(inbox.expired()) == 2, 20)
                await eventually(lambda: "expired at the broker" in log.read_text(), 10)
                await until(lambda: _no_notices(b, "USA"))
            finally:
                assert await stop(daemon) == 0
            assert [e.message_id for e in inbox.expired()] == lost
            assert [e.recipient_sequence for e in inbox.expired()] == [2, 3]
            inbox.close()
            status = json.loads((await node("status", "--config", str(usa_cfg), "--json")).out)
            assert [e["message_id"] for e in status["expired"]] == lost
            assert {e["reason"] for e in status["expired"]} == {"retention_age"}
            plain = await node("status", "--config", str(usa_cfg))
            assert plain.out.count("expired at the broker before delivery") == 2
            listing = await node("inbox", "--config", str(usa_cfg))
            assert all(m in listing.out for m in lost)
            assert not any(m in listing.out for m in for_gbr)
    finally:
        await b.stop(grace=1)


async def _no_notices(b: Broker, partner_code: str) -> bool:
    return await b.store.notices(partner_code, 10) == []


async def test_a_sweeps_expiry_records_commit_with_its_notices_and_drain_once(
    pki: Path, tmp_path: Path
) -> None:
    """A sweep committed its notices with their expiry records (the store's outbox),
    then the broker died before draining them: the next start appends them to the audit
    log, once, and the partner is told."""
    data = tmp_path / "broker"
    b = await running_broker(pki, data)
    try:
        for code in ("KOR", "USA"):
            await admit(pki, b.port, policy(code))
        async with partner(pki, "KOR", b.port) as kor, partner(pki, "USA", b.port) as usa:
            await usa.register_keys()
            lost = await publish_one(kor, TO_USA, b"removed unread", "intel.ground")
    finally:
        await b.stop(grace=1)
    # The sweep's transaction alone, as if the process died right after it.
    store = await SqliteMessageStore.open(data / "messages.db", max_bytes=1 << 30, max_age_ms=1)
    try:
        swept = await store.sweep(now_ms() + 10, lambda m: {"USA": 0}, expiry_records)
        assert [(n.subscriber, n.message_id) for n in swept.notices] == [("USA", lost)]
        assert len(await store.read_outbox(0, 10)) == 1
    finally:
        await store.close()
    b = await running_broker(pki, data)
    try:
        [entry] = await b.audit.query(kind="deliver.expired", partner="USA")
        detail = json.loads(entry.detail_json)
        assert (entry.message_id, entry.decision) == (lost, "retention_age")
        assert detail["removed_ms"] == entry.time_ms  # the sweep's time, not the drain's
        async with partner(pki, "USA", b.port) as usa:
            told: list[exchange_pb2.Expired] = []

            async def record(notices: Sequence[exchange_pb2.Expired]) -> None:
                told.extend(notices)

            sub = usa.subscribe(["intel.>"], on_expired=record)

            async def read() -> None:
                async for _ in sub:
                    pass

            reader = asyncio.create_task(read())
            await eventually(lambda: len(told) == 1, 10)
            assert told[0].message_id == lost
            await until(lambda: _no_notices(b, "USA"))
            await sub.aclose()
            reader.cancel()
    finally:
        await b.stop(grace=1)
    # Restarting again records nothing twice.
    b = await running_broker(pki, data)
    try:
        assert len(await b.audit.query(kind="deliver.expired")) == 1
    finally:
        await b.stop(grace=1)


# -- the store's rules ------------------------------------------------------------------


def stored_message(sender: str, sequence: int, size: int) -> NewMessage:
    envelope = hashlib.sha256(f"{sender}/{sequence}".encode()).digest() * (size // 32 + 1)
    envelope = envelope[:size]
    return NewMessage(
        message_id=f"{sender}-{sequence}",
        sender=sender,
        sequence=sequence,
        topic="intel.a",
        precedence=1,
        classification=4,
        label=b"label",
        created_ms=1_000,
        expiry_ms=0,
        envelope=envelope,
        digest=hashlib.sha256(envelope).digest(),
    )


def test_fair_level() -> None:
    assert fair_level([10, 100], 60) == 50  # the small sender keeps all it has
    assert fair_level([30, 30, 30], 60) == 20
    assert fair_level([5, 5, 200], 100) == 90
    assert fair_level([10, 20], 100) == 20  # everything fits
    assert fair_level([], 100) == 0


async def test_quota_refuses_the_sender_alone_and_the_store_bound_needs_several(
    opener: StoreOpener, tmp_path: Path
) -> None:
    store = await opener.open(max_bytes=1000, sender_bytes=400)
    try:
        out = await store.append([stored_message("UKR", i, 150) for i in (1, 2, 3)], 1)
        assert out[:2] == [Appended(1), Appended(2)]
        assert out[2] == Rejected("quota_exceeded", used=300, limit=400)
        # The refused sequence was not taken.
        assert await store.append([stored_message("UKR", 3, 100)], 1) == [Appended(3)]
        assert await store.append([stored_message("KOR", 1, 400)], 1) == [Appended(4)]
        assert await store.usage() == {"KOR": 400, "UKR": 400}
    finally:
        await store.close()
    with pytest.raises(ValueError, match="below the store's limit"):
        await SqliteMessageStore.open(tmp_path / "t.db", max_bytes=1000, sender_bytes=1000)


async def test_size_retention_trims_only_the_largest_and_notices_only_the_eligible(
    opener: StoreOpener,
) -> None:
    store = await opener.open(max_bytes=1 << 20, retention_bytes=600)
    try:
        await store.ensure_cursor("USA", 0)
        await store.ensure_cursor("GBR", 0)
        await store.append([stored_message("KOR", 1, 100)], 1)  # offset 1, oldest
        await store.append([stored_message("UKR", i, 100) for i in range(1, 9)], 2)  # 2..9
        await store.settle("GBR", [2])  # GBR had UKR's first

        def eligible(m: StoredMessage) -> Mapping[str, int]:
            return {"USA": m.sequence, "GBR": m.sequence} if m.sender == "UKR" else {}

        swept = await store.sweep(10, eligible)
        # 900 bytes, 600 allowed: UKR (800) is trimmed to 500, KOR's 100 stays.
        assert swept.removed == 3 and dict(swept.by_reason) == {"retention_size": 3}
        assert await store.usage() == {"KOR": 100, "UKR": 500}
        assert await store.get(1) is not None
        assert [(n.subscriber, n.offset) for n in swept.notices] == [
            ("USA", 2),
            ("GBR", 3),
            ("USA", 3),
            ("GBR", 4),
            ("USA", 4),
        ]
        assert len(await store.notices("USA", 10)) == 3
        assert await store.notice_subscribers() == {"USA", "GBR"}
        # At most 2 kept per subscriber: USA's oldest goes.
        assert await store.trim_notices(2) == 1
        assert [n.offset for n in await store.notices("USA", 10)] == [3, 4]
        assert await store.drop_notices("USA", [2, 3, 4]) == 2
        assert await store.notice_subscribers() == {"GBR"}
    finally:
        await store.close()


def test_quota_must_be_below_the_store(tmp_path: Path) -> None:
    cfg = tmp_path / "b.toml"
    cfg.write_text("[limits]\nmax_store_bytes = 1000\nsender_store_bytes = 1000\n")
    with pytest.raises(ConfigError, match="sender_store_bytes must be below max_store_bytes"):
        load_config(cfg)
    cfg.write_text("[limits]\nmax_store_bytes = 8000\n")
    assert load_config(cfg).sender_quota == 1000


def test_node_keeps_expiry_notices_only_for_messages_it_lacks(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path / "node.db")
    try:

        def notice(mid: str, seq: int) -> Expired:
            return Expired("KOR", mid, seq, seq, "intel.a", "retention_size", seq, 1, 2, 3)

        assert inbox.store(entry("have", 1), b"x").new
        new = inbox.record_expired([notice("have", 1), notice("lost", 2), notice("late", 3)])
        assert [n.message_id for n in new] == ["lost", "late"]
        assert inbox.record_expired([notice("lost", 2)]) == []  # told twice: kept once
        assert inbox.store(entry("late", 3), b"y").new  # it was in flight after all
        assert [n.message_id for n in inbox.expired()] == ["lost"]
    finally:
        inbox.close()


def entry(mid: str, seq: int) -> Entry:
    return Entry(mid, "KOR", seq, seq, "intel.a", "ROUTINE", "NATO SECRET", 1, 2, seq, "t", "t")
