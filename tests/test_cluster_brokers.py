"""Two brokers over one JetStream deployment behave as one: a message published through A
reaches a subscriber on B at once, a suspension made through B ends the partner's stream
on A, and a partner's newest stream wins wherever it is (the lease), also when the
broker serving it is killed (SIGKILL of a real broker process)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from broker.jetstream import peers as peers_mod
from broker.jetstream.connect import ClusterSettings, connect
from broker.server import Broker
from clients.sdk import ClientError, PartnerClient
from coalition.labels import parse_label
from coalition.v1 import exchange_pb2
from tests.broker_process import ConfiguredBroker
from tests.helpers import admit, eventually, operator, partner, policy, running_broker

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.parametrize("backend", ["jetstream"], indirect=True),
]

LABEL = parse_label("NATO SECRET // REL TO KOR, USA, GBR")


@pytest.fixture
async def pair(
    pki: Path, tmp_path: Path, backend: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Broker, Broker]]:
    # No head poll during these tests: only a wake-up from the other broker can deliver.
    monkeypatch.setattr(peers_mod, "HEAD_POLL_S", 3600.0)
    a = await running_broker(pki, tmp_path / "a", name="a", **backend)
    b = await running_broker(pki, tmp_path / "b", name="b", **backend)
    try:
        for code in ("KOR", "USA", "GBR"):
            await admit(pki, a.port, policy(code))
        yield a, b
    finally:
        await a.stop(grace=1)
        await b.stop(grace=1)


async def _keys(pki: Path, port: int, *codes: str) -> dict[str, PartnerClient]:
    out = {c: partner(pki, c, port) for c in codes}
    for c in out.values():
        await c.register_keys()
    return out


async def test_published_through_a_is_delivered_through_b_at_once(
    pki: Path, pair: tuple[Broker, Broker]
) -> None:
    a, b = pair
    kor = (await _keys(pki, a.port, "KOR"))["KOR"]
    usa = (await _keys(pki, b.port, "USA"))["USA"]
    try:
        sub = usa.subscribe(["intel.>"])
        got: list[bytes] = []

        async def receive() -> None:
            async for d in sub:
                got.append((await usa.open(d)).plaintext)
                await sub.ack([d.offset])

        task = asyncio.create_task(receive())
        await eventually(lambda: sub.caught_up.is_set(), 10)
        sealed = await kor.seal(b"across brokers", topic="intel.ground", label=LABEL)
        [res] = await kor.publish([sealed.envelope])
        assert res.outcome == exchange_pb2.ACCEPTED
        await eventually(lambda: got == [b"across brokers"], 10)
        assert b.peers is not None and b.peers.wakes_received >= 1
        # B recorded its delivery decision in the shared audit log: A sees it too.
        entries = await a.audit.query(partner="USA", kind="deliver")
        assert any(e.message_id == res.message_id for e in entries)
        task.cancel()
    finally:
        await kor.close()
        await usa.close()


async def test_a_suspension_through_b_ends_the_stream_on_a(
    pki: Path, pair: tuple[Broker, Broker]
) -> None:
    a, b = pair
    gbr = (await _keys(pki, a.port, "GBR"))["GBR"]
    try:
        sub = gbr.subscribe(["intel.>"])

        async def drain() -> None:
            async for _ in sub:
                pass

        task = asyncio.create_task(drain())
        await eventually(lambda: bool(a.exchange.live.get("GBR")), 10)
        async with operator(pki, "op1", b.port) as op1:
            resp = await op1.suspend("GBR", "suspended through the other broker")
            assert resp.WhichOneof("result") == "applied"
        with pytest.raises(ClientError) as info:
            await asyncio.wait_for(task, 10)
        assert info.value.status == grpc.StatusCode.PERMISSION_DENIED
        assert "suspended" in info.value.message
    finally:
        await gbr.close()


async def test_the_newest_stream_wins_across_brokers(
    pki: Path, pair: tuple[Broker, Broker]
) -> None:
    a, b = pair
    on_a = (await _keys(pki, a.port, "USA"))["USA"]
    on_b = partner(pki, "USA", b.port)
    try:
        first = on_a.subscribe(["intel.>"])

        async def drain() -> None:
            async for _ in first:
                pass

        task = asyncio.create_task(drain())
        await eventually(lambda: first.caught_up.is_set(), 10)
        second = on_b.subscribe(["intel.>"])
        served = asyncio.create_task(anext(aiter(second)))
        with pytest.raises(ClientError) as info:
            await asyncio.wait_for(task, 10)
        assert info.value.status == grpc.StatusCode.FAILED_PRECONDITION
        assert "replaced" in info.value.message
        await eventually(lambda: second.caught_up.is_set(), 10)
        assert not a.exchange.live.get("USA") and b.exchange.live.get("USA")
        # Both brokers' operators see one live stream of USA (the lease), not their own.
        for port in (a.port, b.port):
            async with operator(pki, "op1", port) as op:
                [usa] = [p for p in await op.partners() if p.partner == "USA"]
                assert usa.connected
                assert (await op.stats()).live_streams == 1
        served.cancel()
        second.close()
    finally:
        await on_a.close()
        await on_b.close()


async def _lease_holder(settings: ClusterSettings, code: str) -> str | None:
    nc = await connect(settings)
    try:
        kv = await nc.jetstream().key_value(settings.name("LEASES"))
        try:
            entry = await kv.get(code)
        except Exception:
            return None
        return str(json.loads(entry.value or b"{}").get("broker"))
    finally:
        await nc.close()


async def test_the_lease_moves_when_the_serving_broker_is_killed(
    pki: Path, tmp_path: Path, backend: dict[str, object]
) -> None:
    settings = ClusterSettings(
        servers=tuple(str(u) for u in backend["store_servers"]),  # type: ignore[attr-defined]
        prefix=str(backend["store_prefix"]),
    )
    conf = tmp_path / "store.toml"
    servers = ", ".join(json.dumps(u) for u in settings.servers)
    monitor = ", ".join(json.dumps(u) for u in backend["store_monitor"])  # type: ignore[attr-defined]
    conf.write_text(
        f'[store]\nbackend = "jetstream"\nservers = [{servers}]\n'
        f'prefix = "{settings.prefix}"\nmonitor = [{monitor}]\n'
    )
    procs = [
        ConfiguredBroker(pki, tmp_path / name / "data", extra_args=["--config", str(conf)])
        for name in ("a", "b")
    ]
    for p in procs:
        p.data.parent.mkdir(parents=True)
    a, b = procs
    try:
        await a.start()
        await b.start()
        for code in ("KOR", "USA"):
            await admit(pki, a.port, policy(code))
        clients = await _keys(pki, a.port, "KOR", "USA")
        kor, usa = clients["KOR"], clients["USA"]
        sealed = [
            await kor.seal(f"m{i}".encode(), topic="intel.ground", label=LABEL, recipients=["USA"])
            for i in range(3)
        ]
        results = await kor.publish([s.envelope for s in sealed])
        assert all(r.outcome == exchange_pb2.ACCEPTED for r in results)
        sub = usa.subscribe(["intel.>"], window=1)
        deliveries = aiter(sub)
        first = await asyncio.wait_for(anext(deliveries), 10)
        assert (await usa.open(first)).plaintext == b"m0"
        await sub.ack([first.offset])
        second = await asyncio.wait_for(anext(deliveries), 10)  # in flight, never acked
        assert (await usa.open(second)).plaintext == b"m1"
        holder = await _lease_holder(settings, "USA")
        assert holder is not None and holder.startswith("broker/")
        a.proc.kill()  # type: ignore[union-attr]
        await a.wait_exit()
        sub.close()
        await usa.close()
        # The partner reconnects to B: B takes the lease and serves from the cursor:
        # m0 was acknowledged, m1 was not (redelivered), then m2.
        async with partner(pki, "USA", b.port) as usa_b:
            again = usa_b.subscribe(["intel.>"])
            got: list[bytes] = []
            async for d in again:
                got.append((await usa_b.open(d)).plaintext)
                await again.ack([d.offset])
                if len(got) == 2:
                    break
            assert got == [b"m1", b"m2"]
            now = await _lease_holder(settings, "USA")
            assert now is not None and now != holder
            again.close()
        await kor.close()
    finally:
        for p in procs:
            p.cleanup()
