"""The TLS key exchange must be hybrid post-quantum (X25519MLKEM768).

grpc Python has no setting for the server's key exchange groups: its TLS stack offers
X25519MLKEM768, X25519, P-256, P-384 and P-521 and completes a handshake with a client
that offers only a classical group. grpc does report the negotiated group to the server
(auth context ``ssl_negotiated_key_exchange_group``), so the broker's interceptor refuses
every call on a connection whose group is not hybrid, as it refuses TLS < 1.3.

The classical clients here are a real grpc client whose TLS is done by Python's ssl module
(OpenSSL) restricted to one group, through a loopback bridge: grpc (plaintext HTTP/2) ->
bridge -> TLS 1.3 with the partner's certificate -> the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.server import Broker
from coalition.v1 import exchange_pb2, exchange_pb2_grpc
from tests.helpers import admit, eventually, partner, policy, running_broker


@pytest.fixture
async def broker(pki: Path, tmp_path: Path) -> AsyncIterator[Broker]:
    b = await running_broker(pki, tmp_path / "broker")
    await admit(pki, b.port, policy("KOR"))
    try:
        yield b
    finally:
        await b.stop(grace=1)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def classical_tls_bridge(pki: Path, broker_port: int, group: str) -> AsyncIterator[int]:
    """A loopback port whose connections reach the broker over TLS 1.3 as KOR, offering
    only the key exchange group `group` (OpenSSL's name)."""
    d = pki / "partners" / "KOR"
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca" / "ca.crt"))
    ctx.load_cert_chain(d / "tls.crt", d / "tls.key")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    ctx.set_ecdh_curve(group)  # with OpenSSL 3 this sets the offered groups to this one
    tasks: set[asyncio.Future[Any]] = set()

    async def handle(down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(
            "127.0.0.1", broker_port, ssl=ctx, server_hostname="localhost"
        )
        both = asyncio.gather(_pipe(down_r, up_w), _pipe(up_r, down_w), return_exceptions=True)
        tasks.add(both)
        await both

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)


@pytest.mark.parametrize("group", ["X25519", "prime256v1", "secp384r1", "secp521r1"])
async def test_classical_key_exchange_is_refused_and_audited(
    group: str, pki: Path, broker: Broker
) -> None:
    before = await broker.audit.count()
    async with (
        classical_tls_bridge(pki, broker.port, group) as port,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        stub = exchange_pb2_grpc.ExchangeStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Directory(exchange_pb2.DirectoryRequest(), timeout=10)
    # UNAUTHENTICATED, not UNAVAILABLE: the TLS handshake itself completed (grpc cannot be
    # told to refuse classical groups); the interceptor refused the call. If grpc ever
    # refuses in the handshake, this changes and docs/security.md must say so.
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
    assert group in (info.value.details() or "")
    assert "X25519MLKEM768 is required" in (info.value.details() or "")
    [entry] = await broker.audit.query(kind="auth.refused")
    assert entry.decision == "key_exchange"
    detail = json.loads(entry.detail_json)
    assert detail["method"] == "/coalition.v1.Exchange/Directory"
    assert detail["tls"] == "TLSv1.3"
    assert await broker.audit.count() == before + 1
    assert broker.exchange.counters["KOR"].refused == 0


async def test_a_grpc_client_negotiates_the_hybrid_group_and_is_served(
    pki: Path, broker: Broker
) -> None:
    async with partner(pki, "KOR", broker.port) as kor:
        assert "KOR" in (await kor.directory()).peers
        sub = kor.subscribe(["intel.>"])
        feed = aiter(sub)
        task = asyncio.ensure_future(anext(feed))
        await sub.caught_up.wait()
        assert broker.auth is not None and broker.auth.live_calls() == 1  # the stream
        await sub.aclose()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert await broker.audit.query(kind="auth.refused") == []
    # Every finished call is forgotten (the revocation and expiry bookkeeping).
    await eventually(lambda: broker.auth is not None and broker.auth.live_calls() == 0)
