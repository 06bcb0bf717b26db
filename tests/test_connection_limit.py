"""Connections one identity keeps busy at once, over real gRPC and mutual TLS.

A partner that spreads long-lived calls over many connections multiplies the
per-connection stream limit; the broker refuses a call that would make one more
connection busy than `max_connections_per_identity`, audited, and serves the others.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from broker.connections import ConnectionLimit
from broker.server import Broker
from clients.sdk import secure_channel
from coalition.pki import load_partner
from coalition.v1 import exchange_pb2, exchange_pb2_grpc
from tests.helpers import admit, policy, running_broker

LIMIT = 3


@pytest.fixture
async def broker(pki: Path, tmp_path: Path, backend: dict[str, object]) -> AsyncIterator[Broker]:
    b = await running_broker(
        pki, tmp_path / "broker", max_connections_per_identity=LIMIT, **backend
    )
    for code in ("KOR", "USA"):
        await admit(pki, b.port, policy(code))
    try:
        yield b
    finally:
        await b.stop(grace=1)


def channel(pki: Path, code: str, port: int) -> grpc.aio.Channel:
    creds = load_partner(pki / "partners" / code)
    return secure_channel(f"127.0.0.1:{port}", creds.ca_pem, creds.tls_cert_pem, creds.tls_key_pem)


async def directory(ch: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await exchange_pb2_grpc.ExchangeStub(ch).Directory(
            exchange_pb2.DirectoryRequest(), timeout=10
        )
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()


async def _silent() -> AsyncIterator[exchange_pb2.PublishRequest]:
    """A Publish stream that stays open and sends nothing."""
    await asyncio.Event().wait()
    yield exchange_pb2.PublishRequest()  # pragma: no cover - never reached


async def test_calls_on_one_connection_too_many_are_refused(pki: Path, broker: Broker) -> None:
    port = broker.port
    busy = [channel(pki, "USA", port) for _ in range(LIMIT)]
    extra = channel(pki, "USA", port)
    kor = channel(pki, "KOR", port)
    streams = []
    try:
        for ch in busy:
            call = exchange_pb2_grpc.ExchangeStub(ch).Publish(_silent())
            await call.wait_for_connection()
            streams.append(call)

        # Once the three streams are live, a call on a fourth connection is refused.
        async def refused() -> bool:
            return await directory(extra) == grpc.StatusCode.RESOURCE_EXHAUSTED

        got: list[bool] = []

        async def poll() -> None:
            while not got or not got[-1]:
                got.append(await refused())
                await asyncio.sleep(0.05)

        await asyncio.wait_for(poll(), 15)
        # More calls on a busy connection, and other partners, are served.
        assert await directory(busy[0]) == grpc.StatusCode.OK
        assert await directory(kor) == grpc.StatusCode.OK
        entries = await broker.audit.query(kind="auth.refused")
        mine = [e for e in entries if e.decision == "too_many_connections"]
        assert mine and all(e.actor == "urn:coalition:partner:USA" for e in mine)
        assert "3 connections" in json.loads(mine[0].detail_json)["reason"]

        # A busy connection's calls end: the fourth connection is served again.
        streams.pop().cancel()
        results: list[grpc.StatusCode] = []

        async def until_ok() -> None:
            while not results or results[-1] != grpc.StatusCode.OK:
                results.append(await directory(extra))
                await asyncio.sleep(0.05)

        await asyncio.wait_for(until_ok(), 15)
    finally:
        for call in streams:
            call.cancel()
        for ch in (*busy, extra, kor):
            await ch.close(None)


def test_connection_limit_counts_peers_not_calls() -> None:
    lim = ConnectionLimit(2)
    assert lim.enter("a", "p1") and lim.enter("a", "p1") and lim.enter("a", "p2")
    assert not lim.enter("a", "p3")  # a third connection
    assert lim.enter("a", "p2")  # another call on a busy one
    assert lim.enter("b", "p3")  # another identity
    lim.leave("a", "p2")
    lim.leave("a", "p2")
    assert lim.busy("a") == 1
    assert lim.enter("a", "p3")
    for peer in ("p1", "p1", "p3"):
        lim.leave("a", peer)
    lim.leave("a", "p9")  # unknown: ignored
    assert lim.busy("a") == 0 and lim.busy("b") == 1
    off = ConnectionLimit(0)
    assert all(off.enter("a", f"p{i}") for i in range(100))
