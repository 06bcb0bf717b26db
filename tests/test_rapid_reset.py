"""HTTP/2 rapid reset (the CVE-2023-44487 pattern) against a real broker process.

A partner with a valid client certificate speaks HTTP/2 itself (hyper-h2 over Python's
ssl, mutual TLS on loopback): on each of 3 connections it sends 20,000 HEADERS frames
for /coalition.v1.Exchange/Directory, each followed at once by RST_STREAM. Meanwhile
another partner makes ordinary calls, each on a fresh connection. Before the broker
bounded the streams one connection may hold, 8-15 of 14-20 such calls failed
CANCELLED. Waits are bounded and nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest

from broker.config import BrokerConfig
from clients.sdk import secure_channel
from coalition.pki import load_partner
from coalition.v1 import exchange_pb2, exchange_pb2_grpc
from tests.helpers import admit, policy
from tests.test_broker_faults import BrokerProcess

pytestmark = pytest.mark.slow

CONNECTIONS = 3
PAIRS_PER_CONNECTION = 20_000
METHOD = "/coalition.v1.Exchange/Directory"


@dataclass
class Flood:
    """What the attacking connections sent and what the broker answered."""

    pairs: int = 0
    connections: int = 0
    # MAX_CONCURRENT_STREAMS as the broker's SETTINGS announced it (None: unlimited).
    max_streams: int | None = None
    goaways: int = 0
    errors: list[str] = field(default_factory=list)


def rapid_reset(
    pki: Path, port: int, code: str, pairs: int, flood: Flood, lock: threading.Lock
) -> None:
    """HEADERS + RST_STREAM pairs on one connection (a new one if the broker closes it)."""
    d = pki / "partners" / code
    ctx = ssl.create_default_context(cafile=str(pki / "ca" / "ca.crt"))
    ctx.load_cert_chain(str(d / "tls.crt"), str(d / "tls.key"))
    ctx.set_alpn_protocols(["h2"])
    headers = [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", METHOD),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    sent = 0
    while sent < pairs:
        with contextlib.ExitStack() as stack:
            raw = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock = stack.enter_context(ctx.wrap_socket(raw, server_hostname="localhost"))
            with lock:
                flood.connections += 1
            conn = h2.connection.H2Connection(
                h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
            )
            conn.initiate_connection()
            sock.sendall(conn.data_to_send())
            closed = False
            try:
                while sent < pairs and not closed:
                    for _ in range(min(100, pairs - sent)):
                        sid = conn.get_next_available_stream_id()
                        conn.send_headers(sid, headers)
                        conn.reset_stream(sid)
                        sent += 1
                    sock.sendall(conn.data_to_send())
                    # Read what the broker sent (settings, resets, pings) without waiting.
                    while not closed and select.select([sock], [], [], 0)[0]:
                        data = sock.recv(1 << 16)
                        if not data:
                            closed = True
                            break
                        for ev in conn.receive_data(data):
                            if isinstance(ev, h2.events.RemoteSettingsChanged):
                                limit = ev.changed_settings.get(
                                    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
                                )
                                if limit is not None:
                                    with lock:
                                        flood.max_streams = limit.new_value
                            elif isinstance(ev, h2.events.ConnectionTerminated):
                                with lock:
                                    flood.goaways += 1
                                closed = True
                        sock.sendall(conn.data_to_send())
            except (OSError, h2.exceptions.ProtocolError) as exc:
                with lock:
                    flood.errors.append(repr(exc))
    with lock:
        flood.pairs += sent


@pytest.fixture
def broker_proc(pki: Path, tmp_path: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(pki, tmp_path / "data")
    try:
        yield b
    finally:
        b.cleanup()


async def ordinary_call(pki: Path, port: int) -> grpc.StatusCode:
    """One Directory call by USA on a connection of its own."""
    creds = load_partner(pki / "partners" / "USA")
    channel = secure_channel(
        f"127.0.0.1:{port}", creds.ca_pem, creds.tls_cert_pem, creds.tls_key_pem
    )
    try:
        stub = exchange_pb2_grpc.ExchangeStub(channel)
        resp = await stub.Directory(exchange_pb2.DirectoryRequest(), timeout=20)
        assert {e.partner for e in resp.entries} >= {"UKR", "USA"}
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        await channel.close(None)


async def test_rapid_reset_does_not_fail_other_partners_calls(
    pki: Path, broker_proc: BrokerProcess
) -> None:
    await broker_proc.start()
    port = broker_proc.port
    for code in ("UKR", "USA"):
        await admit(pki, port, policy(code))
    assert await ordinary_call(pki, port) == grpc.StatusCode.OK

    flood = Flood()
    lock = threading.Lock()
    attackers = [
        threading.Thread(
            target=rapid_reset,
            args=(pki, port, "UKR", PAIRS_PER_CONNECTION, flood, lock),
            daemon=True,
        )
        for _ in range(CONNECTIONS)
    ]
    for t in attackers:
        t.start()
    during: list[grpc.StatusCode] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 50
    while any(t.is_alive() for t in attackers):
        assert loop.time() < deadline, "the flood did not end in time"
        during.append(await ordinary_call(pki, port))
        await asyncio.sleep(0.2)
    for t in attackers:
        t.join(5)
    after = await ordinary_call(pki, port)

    assert flood.pairs == CONNECTIONS * PAIRS_PER_CONNECTION, flood
    assert flood.errors == [], flood.errors
    # The calls overlapped the flood (before the fix, 8-15 of 14-20 failed CANCELLED).
    assert len(during) >= 5, during
    failed = [c for c in during if c != grpc.StatusCode.OK]
    print(f"{len(failed)} of {len(during)} ordinary calls failed during the flood")
    assert failed == [], f"{len(failed)} of {len(during)} ordinary calls failed: {failed}"
    assert after == grpc.StatusCode.OK
    # The mechanism: the broker announces its per-connection stream limit (and grpc
    # counts a reset stream against it until the broker has released the call).
    assert flood.max_streams == BrokerConfig().max_streams_per_connection, flood
