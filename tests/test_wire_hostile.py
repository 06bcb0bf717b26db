"""Hostile bytes on the wire, over real mTLS: requests that are not protobuf, junk in the
middle of streams, partners not yet admitted, and a publisher that never reads its
answers. Every refusal has its status and its audit entry; nothing answered is lost."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.server import Broker
from clients.sdk import secure_channel
from coalition.labels import parse_label
from coalition.pki import load_operator, load_partner
from coalition.policy import policy_to_proto
from coalition.v1 import envelope_pb2, exchange_pb2, exchange_pb2_grpc
from tests.helpers import admit, eventually, operator, partner, policy, running_broker
from tests.test_broker_faults import BrokerProcess

LABEL = parse_label("NATO SECRET // REL TO KOR, USA")
JUNK = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length-delimited, length past the end
EXCHANGE_UNARY = ("Directory", "RegisterKeys", "Recipients")


@pytest.fixture
async def broker(pki: Path, tmp_path: Path) -> AsyncIterator[Broker]:
    b = await running_broker(pki, tmp_path / "broker", max_publish_streams=2)
    for code in ("KOR", "USA"):
        await admit(pki, b.port, policy(code))
    try:
        yield b
    finally:
        await b.stop(grace=1)


def raw_channel(pki: Path, who: str, port: int) -> grpc.aio.Channel:
    """A channel for hand-made bytes, as a partner ("KOR") or an operator ("op:op1")."""
    if who.startswith("op:"):
        o = load_operator(pki / "operators" / who[3:])
        return secure_channel(f"127.0.0.1:{port}", o.ca_pem, o.tls_cert_pem, o.tls_key_pem)
    p = load_partner(pki / "partners" / who)
    return secure_channel(f"127.0.0.1:{port}", p.ca_pem, p.tls_cert_pem, p.tls_key_pem)


async def raw_unary(ch: grpc.aio.Channel, method: str, body: bytes) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ch.unary_unary(method, None, None)(body, timeout=10)
    return info.value


async def entries(b: Broker, kind: str) -> list[dict[str, object]]:
    return [
        {"actor": e.actor, "decision": e.decision, **json.loads(e.detail_json)}
        for e in await b.audit.query(kind=kind)
    ]


async def test_junk_unary_requests_are_invalid_argument_and_audited(
    pki: Path, broker: Broker
) -> None:
    async with (
        raw_channel(pki, "KOR", broker.port) as ch,
        raw_channel(pki, "op:op1", broker.port) as op,
    ):
        for name in EXCHANGE_UNARY:
            err = await raw_unary(ch, f"/coalition.v1.Exchange/{name}", JUNK)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err)
            assert f"request is not a valid coalition.v1.{name}Request" in (err.details() or "")
        for name, msg in (("Stats", "StatsRequest"), ("QueryAudit", "QueryAuditRequest")):
            err = await raw_unary(op, f"/coalition.v1.Admin/{name}", JUNK)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err)
            assert f"not a valid coalition.v1.{msg}" in (err.details() or "")
    got = await entries(broker, "request.malformed")
    assert [(e["actor"], e["method"]) for e in got] == [
        *(("KOR", f"/coalition.v1.Exchange/{n}") for n in EXCHANGE_UNARY),
        ("op1", "/coalition.v1.Admin/Stats"),
        ("op1", "/coalition.v1.Admin/QueryAudit"),
    ]
    assert {e["decision"] for e in got} == {"malformed_request"}


async def test_callers_are_authorized_before_their_requests_are_parsed(
    pki: Path, broker: Broker
) -> None:
    # An operator's junk on the Exchange service: refused as an operator, not as junk.
    async with (
        raw_channel(pki, "op:op1", broker.port) as op,
        raw_channel(pki, "ROGUE", broker.port) as rogue,
        raw_channel(pki, "KOR", broker.port) as kor,
    ):
        for name in EXCHANGE_UNARY:
            err = await raw_unary(op, f"/coalition.v1.Exchange/{name}", JUNK)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (name, err)
            err = await raw_unary(rogue, f"/coalition.v1.Exchange/{name}", JUNK)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (name, err)
        err = await raw_unary(kor, "/coalition.v1.Admin/Stats", JUNK)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in op.stream_stream("/coalition.v1.Exchange/Subscribe", None, None)(
                iter([JUNK]), timeout=10
            ):
                pass
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    refused = await entries(broker, "auth.refused")
    assert [e["decision"] for e in refused] == [
        *(["not_a_partner", "unknown_partner"] * len(EXCHANGE_UNARY)),
        "not_an_operator",
        "not_a_partner",
    ]
    assert await entries(broker, "request.malformed") == []


async def test_junk_in_a_publish_stream_answers_what_came_before(pki: Path, broker: Broker) -> None:
    async with partner(pki, "KOR", broker.port) as kor, partner(pki, "USA", broker.port) as usa:
        await kor.register_keys()
        await usa.register_keys()
        sealed = [
            (await kor.seal(f"m{i}".encode(), topic="intel.a", label=LABEL)).envelope
            for i in range(30)
        ]
    reqs = [
        exchange_pb2.PublishRequest(batch_id=i + 1, envelopes=sealed[i * 10 : i * 10 + 10])
        for i in range(3)
    ]
    body = [r.SerializeToString() for r in reqs[:2]] + [JUNK, reqs[2].SerializeToString()]
    got: list[exchange_pb2.PublishResponse] = []
    async with raw_channel(pki, "KOR", broker.port) as ch:
        call = ch.stream_stream("/coalition.v1.Exchange/Publish", None, None)(
            iter(body), timeout=20
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for raw in call:
                got.append(exchange_pb2.PublishResponse.FromString(raw))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request 3 of the stream is not a valid coalition.v1.PublishRequest" in (
        info.value.details() or ""
    )
    # Both requests before the junk are answered, every envelope accepted and stored;
    # nothing after it is taken.
    assert [r.batch_id for r in got] == [1, 2]
    assert all(x.outcome == exchange_pb2.ACCEPTED for r in got for x in r.results)
    assert sum(len(r.results) for r in got) == 20
    assert (await broker.store.stats()).messages == 20
    [entry] = await entries(broker, "request.malformed")
    assert (entry["actor"], entry["ordinal"]) == ("KOR", 3)
    assert entry["method"] == "/coalition.v1.Exchange/Publish"


async def test_junk_on_a_subscribe_stream_ends_it_audited(pki: Path, broker: Broker) -> None:
    async with partner(pki, "KOR", broker.port) as kor, partner(pki, "USA", broker.port) as usa:
        await kor.register_keys()
        await usa.register_keys()
        for i in range(4):
            s = await kor.seal(f"m{i}".encode(), topic="intel.a", label=LABEL)
            [res] = await kor.publish([s.envelope])
            assert res.outcome == exchange_pb2.ACCEPTED
    opened = exchange_pb2.SubscribeRequest(open=exchange_pb2.SubscribeOpen(topics=["intel.>"]))
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
    await queue.put(opened.SerializeToString())

    async def requests() -> AsyncIterator[bytes]:
        while (item := await queue.get()) is not None:
            yield item

    offsets: list[int] = []
    async with raw_channel(pki, "USA", broker.port) as ch:
        call = ch.stream_stream("/coalition.v1.Exchange/Subscribe", None, None)(
            requests(), timeout=20
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for raw in call:
                resp = exchange_pb2.SubscribeResponse.FromString(raw)
                offsets += [d.offset for d in resp.batch.deliveries]
                if len(offsets) == 4:
                    ack = exchange_pb2.SubscribeRequest(ack=exchange_pb2.Ack(offsets=offsets[:2]))
                    await queue.put(ack.SerializeToString())
                    await queue.put(JUNK)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request 3 of the stream is not a valid coalition.v1.SubscribeRequest" in (
        info.value.details() or ""
    )
    # The acknowledgement sent before the junk counts.
    assert await broker.store.backlog_count("USA") == 2
    [entry] = await entries(broker, "request.malformed")
    assert (entry["actor"], entry["ordinal"]) == ("USA", 3)


async def test_pending_partner_may_only_check_health(pki: Path, broker: Broker) -> None:
    creds = load_partner(pki / "partners" / "GBR")
    async with operator(pki, "op1", broker.port) as op1:
        resp = await op1.admit("GBR", creds.signing_cert_der, policy_to_proto(policy("GBR")), "t")
    pid = resp.proposal.proposal_id
    async with raw_channel(pki, "GBR", broker.port) as ch:
        stub = exchange_pb2_grpc.ExchangeStub(ch)
        calls: dict[str, Any] = {
            "Directory": stub.Directory(exchange_pb2.DirectoryRequest(), timeout=10),
            "Recipients": stub.Recipients(
                exchange_pb2.RecipientsRequest(topic="intel.a"), timeout=10
            ),
            "RegisterKeys": stub.RegisterKeys(exchange_pb2.RegisterKeysRequest(), timeout=10),
        }
        for name, aw in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await aw
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
            assert "awaits a second operator's approval" in (info.value.details() or "")
        opened = exchange_pb2.SubscribeRequest(open=exchange_pb2.SubscribeOpen(topics=[">"]))
        pub = exchange_pb2.PublishRequest(
            batch_id=1, envelopes=[envelope_pb2.Envelope(header=b"h")]
        )
        for name, stream in (
            ("Subscribe", stub.Subscribe(iter([opened]), timeout=10)),
            ("Publish", stub.Publish(iter([pub]), timeout=10)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stream:
                    pass
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
        health = health_pb2_grpc.HealthStub(ch)
        ok = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert ok.status == health_pb2.HealthCheckResponse.SERVING
    refused = [e for e in await entries(broker, "auth.refused") if str(e["actor"]).endswith("GBR")]
    assert len(refused) == 5 and {e["decision"] for e in refused} == {"not_admitted"}
    # Once approved, the same calls work.
    async with operator(pki, "op2", broker.port) as op2:
        await op2.approve(pid, "vetted")
    async with partner(pki, "GBR", broker.port) as gbr:
        await gbr.register_keys()
        assert "KOR" in (await gbr.directory(refresh=True)).peers


async def test_publish_streams_per_partner_are_capped(pki: Path, broker: Broker) -> None:
    async with partner(pki, "KOR", broker.port) as kor:
        await kor.register_keys()
    async with raw_channel(pki, "KOR", broker.port) as ch:
        stub: Any = exchange_pb2_grpc.ExchangeStub(ch)
        held = [stub.Publish() for _ in range(2)]
        for c in held:
            await c.write(exchange_pb2.PublishRequest(batch_id=1))
            assert (await c.read()).batch_id == 1
        extra = stub.Publish(iter([exchange_pb2.PublishRequest(batch_id=1)]), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in extra:
                pass
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit is 2" in (info.value.details() or "")
        # Another partner is not counted against KOR.
        async with partner(pki, "USA", broker.port) as usa:
            assert await usa.publish([]) == []
            await usa.register_keys()
            s = await usa.seal(b"x", topic="intel.a", label=LABEL, recipients=["KOR"])
            [res] = await usa.publish([s.envelope])
            assert res.outcome == exchange_pb2.ACCEPTED
        for c in held:
            await c.done_writing()
            assert await c.code() == grpc.StatusCode.OK
    # A closed stream frees its place.
    async with partner(pki, "KOR", broker.port) as kor:
        await kor.register_keys()
        s = await kor.seal(b"y", topic="intel.a", label=LABEL, recipients=["USA"])
        [res] = await kor.publish([s.envelope])
        assert res.outcome == exchange_pb2.ACCEPTED
    [entry] = await entries(broker, "publish.refused")
    assert (entry["actor"], entry["decision"]) == ("KOR", "too_many_streams")


# -- memory: publishers that never read their answers ---------------------------------------


def _rss_mib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) // 1024
    return out


async def _flood(
    pki: Path, port: int, streams: int, requests: int, size: int
) -> list[tuple[int, grpc.StatusCode | None]]:
    """streams Publish streams, each writing requests requests of size bytes (one
    oversized envelope each) as fast as the broker takes them, never reading an answer.
    Returns (requests written, status) per stream."""
    creds = load_partner(pki / "partners" / "KOR")
    body = exchange_pb2.PublishRequest(
        batch_id=1,
        envelopes=[envelope_pb2.Envelope(header=b"h" * 64, ciphertext=os.urandom(size - 200))],
    )
    chans = [
        secure_channel(f"127.0.0.1:{port}", creds.ca_pem, creds.tls_cert_pem, creds.tls_key_pem)
        for _ in range(streams)
    ]
    stubs: list[Any] = [exchange_pb2_grpc.ExchangeStub(ch) for ch in chans]
    calls = [stub.Publish() for stub in stubs]

    async def pump(call: grpc.aio.StreamStreamCall[object, object]) -> tuple[int, object]:
        sent = 0
        try:
            for _ in range(requests):
                await asyncio.wait_for(call.write(body), 5)
                sent += 1
        except (TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        code = await call.code() if call.done() else None
        return sent, code

    try:
        return list(await asyncio.gather(*(pump(c) for c in calls)))  # type: ignore[arg-type]
    finally:
        for c in calls:
            c.cancel()
        for ch in chans:
            await ch.close(None)


async def test_publishers_that_never_read_answers_stay_bounded(pki: Path, tmp_path: Path) -> None:
    proc = BrokerProcess(pki, tmp_path / "data")
    await proc.start()
    try:
        assert proc.proc is not None
        for code in ("KOR", "USA", "GBR"):
            await admit(pki, proc.port, policy(code))
        pid = proc.proc.pid
        async with partner(pki, "USA", proc.port) as usa, partner(pki, "GBR", proc.port) as gbr:
            await usa.register_keys()
            await gbr.register_keys()
            got: list[bytes] = []
            sub = usa.subscribe(["intel.>"])

            async def drain() -> None:
                async for d in sub:
                    got.append((await usa.open(d)).plaintext)
                    await sub.ack([d.offset])

            reader = asyncio.create_task(drain())
            s = await gbr.seal(b"warm-up", topic="intel.a", label=LABEL, recipients=["USA"])
            await gbr.publish([s.envelope])
            await eventually(lambda: got == [b"warm-up"], timeout=15)
            base = _rss_mib(pid)["VmRSS"]

            # The attack as it was found: 4 streams x 40 requests of 8 MiB. Before the
            # fix the broker took them all in (RSS +0.9-1.2 GiB, held after the streams
            # closed); now grpc refuses a request over max_request_bytes unread.
            flood = asyncio.create_task(_flood(pki, proc.port, 4, 40, 8 << 20))
            while not flood.done():
                s = await gbr.seal(b"during", topic="intel.a", label=LABEL, recipients=["USA"])
                [res] = await gbr.publish([s.envelope])
                assert res.outcome == exchange_pb2.ACCEPTED
                await asyncio.sleep(0.2)
            sent = await flood
            big = _rss_mib(pid)["VmHWM"] - base
            assert big < 300, f"broker RSS grew {big} MiB under oversized requests"
            # (grpcio's asyncio client may report a write after the refusal as INTERNAL.)
            codes = {code for _, code in sent}
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, sent
            assert codes <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL}, sent

            # Requests just under the limit: the byte budgets (per stream, per partner)
            # hold the broker to what is in flight; the rest waits in the client.
            flood = asyncio.create_task(_flood(pki, proc.port, 4, 40, (4 << 20) - 4096))
            while not flood.done():
                s = await gbr.seal(b"during", topic="intel.a", label=LABEL, recipients=["USA"])
                [res] = await gbr.publish([s.envelope])
                assert res.outcome == exchange_pb2.ACCEPTED
                await asyncio.sleep(0.2)
            sent = await flood
            await asyncio.sleep(1)
            grown = _rss_mib(pid)["VmHWM"] - base
            assert grown < 600, f"broker RSS grew {grown} MiB under requests at the limit"
            assert proc.proc.poll() is None
            s = await gbr.seal(b"after", topic="intel.a", label=LABEL, recipients=["USA"])
            [res] = await gbr.publish([s.envelope])
            assert res.outcome == exchange_pb2.ACCEPTED
            await eventually(lambda: got[-1:] == [b"after"], timeout=15)
            reader.cancel()
            sub.close()
        print(f"RSS growth: {big} MiB (8 MiB requests), {grown} MiB (4 MiB requests)")
    finally:
        proc.cleanup()
