"""The broker over real mTLS: publish, subscribe, directory, keys, recipients, enforcement."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from broker.server import Broker
from clients.sdk import ClientError, NoRecipients, Opened, PartnerClient
from coalition.labels import Classification, Precedence, parse_label
from coalition.v1 import exchange_pb2
from tests.helpers import admit, eventually, partner, policy, running_broker

LABEL = parse_label("NATO SECRET // REL TO KOR, USA, GBR")


@pytest.fixture
async def broker(pki: Path, tmp_path: Path, backend: dict[str, object]) -> AsyncIterator[Broker]:
    b = await running_broker(pki, tmp_path / "broker", **backend)
    for code in ("KOR", "USA", "GBR"):
        await admit(pki, b.port, policy(code))
    await admit(pki, b.port, policy("UKR", level=Classification.RESTRICTED))
    try:
        yield b
    finally:
        await b.stop(grace=1)


@pytest.fixture
async def clients(pki: Path, broker: Broker) -> AsyncIterator[dict[str, PartnerClient]]:
    out = {c: partner(pki, c, broker.port) for c in ("KOR", "USA", "GBR", "UKR")}
    for c in out.values():
        await c.register_keys()
    yield out
    for c in out.values():
        await c.close()


async def collect(
    client: PartnerClient, n: int, topics: tuple[str, ...] = ("intel.>",)
) -> list[tuple[exchange_pb2.Delivery, Opened]]:
    """Receive n deliveries, open and acknowledge each."""
    sub = client.subscribe(topics)
    got = []
    try:
        async for d in sub:
            got.append((d, await client.open(d)))
            await sub.ack([d.offset])
            if len(got) == n:
                break
    finally:
        await sub.aclose()
    return got


async def test_directory_is_verified_and_lists_keys(clients: dict[str, PartnerClient]) -> None:
    directory = await clients["KOR"].directory(refresh=True)
    assert {"KOR", "USA", "GBR", "UKR"} <= set(directory.peers)
    assert directory.peers["USA"].hpke_public is not None
    assert not directory.problems


async def test_recipients_follow_policy(clients: dict[str, PartnerClient]) -> None:
    # UKR is cleared only to RESTRICTED and not named; KOR is the sender.
    assert sorted(await clients["KOR"].recipients(LABEL, "intel.ground")) == ["GBR", "USA"]
    low = parse_label("NATO RESTRICTED // REL TO NATO")
    assert sorted(await clients["KOR"].recipients(low, "intel.ground")) == ["GBR", "UKR", "USA"]


async def test_publish_then_deliver_end_to_end(clients: dict[str, PartnerClient]) -> None:
    kor, usa = clients["KOR"], clients["USA"]
    receiving = asyncio.create_task(collect(usa, 1))
    sealed = await kor.seal(b"armour moving north", topic="intel.ground", label=LABEL)
    assert set(sealed.recipients) == {"USA", "GBR"}
    [res] = await kor.publish([sealed.envelope])
    assert res.outcome == exchange_pb2.ACCEPTED and res.offset > 0
    [(delivery, opened)] = await asyncio.wait_for(receiving, 10)
    assert opened.plaintext == b"armour moving north"
    assert delivery.label == opened.header.label
    assert opened.header.sender == "KOR"


async def test_not_released_partner_gets_nothing(
    clients: dict[str, PartnerClient], broker: Broker
) -> None:
    kor, ukr, usa = clients["KOR"], clients["UKR"], clients["USA"]
    sealed = await kor.seal(b"x", topic="intel.ground", label=LABEL)
    await kor.publish([sealed.envelope])
    low = parse_label("NATO RESTRICTED // REL TO NATO")
    sealed2 = await kor.seal(b"for everyone", topic="intel.ground", label=low)
    await kor.publish([sealed2.envelope])
    [(_, opened)] = await asyncio.wait_for(collect(ukr, 1), 10)
    # UKR receives only the RESTRICTED message, never the SECRET one.
    assert opened.plaintext == b"for everyone"
    entries = await broker.audit.query(partner="UKR", kind="deliver.denied")
    assert any(e.decision == "above_clearance" for e in entries)
    got = await asyncio.wait_for(collect(usa, 2), 10)
    assert [o.plaintext for _, o in got] == [b"x", b"for everyone"]


async def test_backlog_is_delivered_flash_first(clients: dict[str, PartnerClient]) -> None:
    kor, usa = clients["KOR"], clients["USA"]
    order = [Precedence.ROUTINE, Precedence.PRIORITY, Precedence.FLASH, Precedence.IMMEDIATE]
    envs = []
    for p in order:
        s = await kor.seal(
            p.name.encode(), topic="intel.ground", label=LABEL, precedence=p, recipients=["USA"]
        )
        envs.append(s.envelope)
    results = await kor.publish(envs)
    assert all(r.outcome == exchange_pb2.ACCEPTED for r in results)
    got = await asyncio.wait_for(collect(usa, 4), 10)
    assert [o.plaintext for _, o in got] == [b"FLASH", b"IMMEDIATE", b"PRIORITY", b"ROUTINE"]


async def test_resume_from_cursor_without_redelivery(clients: dict[str, PartnerClient]) -> None:
    kor, usa = clients["KOR"], clients["USA"]
    for i in range(3):
        s = await kor.seal(f"m{i}".encode(), topic="intel.ground", label=LABEL)
        await kor.publish([s.envelope])
    first = await asyncio.wait_for(collect(usa, 2), 10)
    assert [o.plaintext for _, o in first] == [b"m0", b"m1"]
    rest = await asyncio.wait_for(collect(usa, 1), 10)
    assert [o.plaintext for _, o in rest] == [b"m2"]


async def test_unacknowledged_delivery_is_redelivered(clients: dict[str, PartnerClient]) -> None:
    kor, usa = clients["KOR"], clients["USA"]
    s = await kor.seal(b"once", topic="intel.ground", label=LABEL)
    await kor.publish([s.envelope])
    sub = usa.subscribe(["intel.>"])
    async for d in sub:
        assert (await usa.open(d)).plaintext == b"once"
        break  # no ack
    sub.close()
    [(_, again)] = await asyncio.wait_for(collect(usa, 1), 10)
    assert again.plaintext == b"once"


async def test_no_recipient_is_a_clear_error(clients: dict[str, PartnerClient]) -> None:
    # A label KOR may originate that releases to no one else (one above its ceiling is
    # refused outright: tests/test_shape_confidentiality.py).
    label = parse_label("NATO SECRET // REL TO KOR")
    with pytest.raises(NoRecipients, match="no eligible recipient"):
        await clients["KOR"].seal(b"x", topic="intel.ground", label=label)


async def test_suspension_closes_live_stream(
    pki: Path, clients: dict[str, PartnerClient], broker: Broker
) -> None:
    from tests.helpers import operator

    gbr = clients["GBR"]
    sub = gbr.subscribe(["intel.>"])

    async def drain() -> None:
        async for _ in sub:
            pass

    task = asyncio.create_task(drain())
    await eventually(lambda: bool(broker.exchange.live.get("GBR")))
    async with operator(pki, "op1", broker.port) as op1:
        resp = await op1.suspend("GBR", "test suspension")
        assert resp.WhichOneof("result") == "applied"
    with pytest.raises(ClientError) as info:
        await asyncio.wait_for(task, 10)
    assert info.value.status == grpc.StatusCode.PERMISSION_DENIED
    assert "suspended" in info.value.message


async def test_lowered_clearance_stops_next_delivery(
    pki: Path, clients: dict[str, PartnerClient], broker: Broker
) -> None:
    from coalition.policy import policy_to_proto
    from tests.helpers import operator

    kor, gbr = clients["KOR"], clients["GBR"]
    s1 = await kor.seal(b"before", topic="intel.ground", label=LABEL)
    await kor.publish([s1.envelope])
    assert [o.plaintext for _, o in await asyncio.wait_for(collect(gbr, 1), 10)] == [b"before"]
    s2 = await kor.seal(b"after", topic="intel.ground", label=LABEL)
    async with operator(pki, "op1", broker.port) as op1:
        lowered = policy("GBR", level=Classification.CONFIDENTIAL)
        resp = await op1.set_policy(policy_to_proto(lowered), "lower GBR")
        assert resp.WhichOneof("result") == "applied"  # lowering needs one operator
    await kor.publish([s2.envelope])
    sub = gbr.subscribe(["intel.>"])
    got: list[bytes] = []

    async def drain() -> None:
        async for d in sub:
            got.append((await gbr.open(d)).plaintext)

    task = asyncio.create_task(drain())
    await eventually(lambda: sub.caught_up.is_set())
    sub.close()
    task.cancel()
    assert got == []
    entries = await broker.audit.query(partner="GBR", kind="deliver.denied")
    assert any(e.decision == "above_clearance" for e in entries)
