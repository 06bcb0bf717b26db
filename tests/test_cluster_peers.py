"""Brokers' link to each other on a real cluster (broker.jetstream.peers): a publish on
one wakes the other's streams, the newest stream of a partner holds its lease wherever
it is, a holder that loses the compare-and-set stops serving, and a released lease is
gone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from broker.errors import Precondition
from broker.exchange.live import Subscription
from broker.jetstream import peers as peers_mod
from broker.jetstream.connect import ClusterSettings, connect
from broker.jetstream.peers import Peers
from coalition.topics import PatternSet
from tests.helpers import eventually

pytestmark = pytest.mark.asyncio


def _sub(partner: str) -> Subscription:
    return Subscription(partner, ("intel.>",), 8, PatternSet(["intel.>"]))


class Woken:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
async def two(
    cluster_settings: ClusterSettings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Peers, Peers, Woken, Woken]]:
    monkeypatch.setattr(peers_mod, "HEAD_POLL_S", 3600.0)  # only wake-ups wake
    monkeypatch.setattr(peers_mod, "RENEW_EVERY_S", 0.2)
    ncs = [await connect(cluster_settings) for _ in range(2)]
    woken = [Woken(), Woken()]

    async def head() -> int:
        return 0

    async def caught_up(offset: int, timeout: float) -> bool:
        return True

    a = await Peers.open(ncs[0], cluster_settings, "a", woken[0], head, caught_up)
    b = await Peers.open(ncs[1], cluster_settings, "b", woken[1], head, caught_up)
    try:
        yield a, b, woken[0], woken[1]
    finally:
        await a.close()
        await b.close()
        for nc in ncs:
            await nc.close()


async def test_a_publish_on_one_broker_wakes_the_other(
    two: tuple[Peers, Peers, Woken, Woken],
) -> None:
    a, b, woke_a, woke_b = two
    for offset in range(3):
        a.stored(offset)
    await eventually(lambda: woke_b.count >= 1)
    assert woke_a.count == 0  # its own wake-up is not sent back to itself
    assert b.wakes_received >= 1


async def test_the_newest_stream_holds_the_lease(
    two: tuple[Peers, Peers, Woken, Woken], cluster_settings: ClusterSettings
) -> None:
    a, b, _, _ = two
    on_a, on_b = _sub("USA"), _sub("USA")
    await a.claim(on_a)
    await b.claim(on_b)
    await eventually(lambda: on_a.closed is not None)
    assert isinstance(on_a.closed, Precondition) and on_a.closed.code == "superseded"
    assert on_a.wake.is_set()
    assert on_b.closed is None and b.holder("USA") is not None and a.holder("USA") is None
    # Renewals keep B's lease; A's stream stays closed, B's open.
    await asyncio.sleep(0.6)
    assert on_b.closed is None
    # Another partner's lease is its own.
    gbr = _sub("GBR")
    await a.claim(gbr)
    await asyncio.sleep(0.5)
    assert gbr.closed is None
    # Released: the key is gone (nobody is told to stop).
    b.release(on_b)
    nc = await connect(cluster_settings)
    try:
        kv = await nc.jetstream().key_value(cluster_settings.name("LEASES"))

        async def gone() -> bool:
            try:
                entry = await kv.get("USA")
            except Exception:
                return True
            return entry.value is None or entry.operation is not None

        for _ in range(50):
            if await gone():
                break
            await asyncio.sleep(0.05)
        assert await gone()
        entry = await kv.get("GBR")
        assert json.loads(entry.value or b"{}")["broker"] == a.broker_id
    finally:
        await nc.close()


async def test_a_holder_that_loses_the_compare_stops_serving(
    two: tuple[Peers, Peers, Woken, Woken], cluster_settings: ClusterSettings
) -> None:
    """Even when the watch misses the take-over, the next renewal's compare-and-set fails."""
    a, _, _, _ = two
    sub = _sub("KOR")
    await a.claim(sub)
    nc = await connect(cluster_settings)
    try:
        kv = await nc.jetstream().key_value(cluster_settings.name("LEASES"))
        # Written behind the watch's back: same stream token, so the watch ignores it.
        token = a.holder("KOR")
        await kv.put("KOR", json.dumps({"broker": "elsewhere", "stream": token}).encode())
        await eventually(lambda: sub.closed is not None)
        assert isinstance(sub.closed, Precondition) and sub.closed.code == "superseded"
    finally:
        await nc.close()
