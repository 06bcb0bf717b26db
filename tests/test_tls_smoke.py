"""grpcio accepts the coalition certificates: real mTLS on loopback, port 0.

Also pins what ``ServicerContext.auth_context()`` exposes, which the broker's
authentication interceptor relies on.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coalition import pki
from coalition.identity import Identity, identity_from_auth_context


@dataclass
class Seen:
    contexts: list[dict[str, list[bytes]]] = field(default_factory=list)


class RecordingHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    async def Check(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[
            health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        ],
    ) -> health_pb2.HealthCheckResponse:
        self.seen.contexts.append({k: list(v) for k, v in context.auth_context().items()})
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@dataclass
class Server:
    port: int
    root: Path
    seen: Seen


@pytest.fixture
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Server]:
    root = tmp_path_factory.mktemp("tls") / "pki"
    # grpc checks validity against the real clock, so this PKI starts now.
    pki.make_dev_pki(root, ["KOR"], ["op1"], time.time_ns() // 1_000_000)
    broker = pki.load_broker(root)
    seen = Seen()
    srv = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(RecordingHealth(seen), srv)
    creds = grpc.ssl_server_credentials(
        [(broker.tls_key_pem, broker.tls_cert_pem)],
        root_certificates=broker.ca_pem,
        require_client_auth=True,
    )
    port = srv.add_secure_port("127.0.0.1:0", creds)
    await srv.start()
    try:
        yield Server(port, root, seen)
    finally:
        await srv.stop(None)


async def _check(target: str, creds: grpc.ChannelCredentials) -> int:
    async with grpc.aio.secure_channel(target, creds) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        return int(reply.status)


async def test_partner_cert_is_accepted_and_identity_visible(server: Server) -> None:
    kor = pki.load_partner(server.root / "partners" / "KOR")
    creds = grpc.ssl_channel_credentials(kor.ca_pem, kor.tls_key_pem, kor.tls_cert_pem)
    status = await _check(f"localhost:{server.port}", creds)
    assert status == health_pb2.HealthCheckResponse.SERVING
    ctx = server.seen.contexts[-1]
    print("auth_context keys:", sorted(ctx))
    assert ctx["transport_security_type"] == [b"ssl"]
    assert ctx["peer_uri"] == [b"urn:coalition:partner:KOR"]
    assert b"urn:coalition:partner:KOR" in ctx["x509_subject_alternative_name"]
    assert ctx["ssl_tls_version"] == [b"TLSv1.3"]
    assert len(ctx["x509_pem_cert"]) == 1
    assert identity_from_auth_context(ctx) == Identity.partner("KOR")


async def test_operator_cert_over_ip_literal(server: Server) -> None:
    op = pki.load_operator(server.root / "operators" / "op1")
    creds = grpc.ssl_channel_credentials(op.ca_pem, op.tls_key_pem, op.tls_cert_pem)
    # The broker cert carries IP:127.0.0.1 so clients may dial the address directly.
    assert await _check(f"127.0.0.1:{server.port}", creds) == 1
    assert identity_from_auth_context(server.seen.contexts[-1]) == Identity.operator("op1")


async def test_client_cert_from_another_ca_is_refused(server: Server, tmp_path: Path) -> None:
    rogue = tmp_path / "rogue"
    pki.make_dev_pki(rogue, ["KOR"], [], time.time_ns() // 1_000_000)
    impostor = pki.load_partner(rogue / "partners" / "KOR")
    real_ca = (server.root / "ca" / "ca.crt").read_bytes()
    # Trusts the real broker, but presents a KOR certificate from another CA.
    creds = grpc.ssl_channel_credentials(real_ca, impostor.tls_key_pem, impostor.tls_cert_pem)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await _check(f"localhost:{server.port}", creds)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.seen.contexts == []


async def test_client_without_cert_is_refused(server: Server) -> None:
    creds = grpc.ssl_channel_credentials((server.root / "ca" / "ca.crt").read_bytes())
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await _check(f"localhost:{server.port}", creds)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.seen.contexts == []


async def test_client_refuses_a_broker_from_another_ca(server: Server, tmp_path: Path) -> None:
    rogue = tmp_path / "rogue"
    pki.make_dev_pki(rogue, [], [], time.time_ns() // 1_000_000)
    kor = pki.load_partner(server.root / "partners" / "KOR")
    rogue_ca = (rogue / "ca" / "ca.crt").read_bytes()
    creds = grpc.ssl_channel_credentials(rogue_ca, kor.tls_key_pem, kor.tls_cert_pem)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await _check(f"localhost:{server.port}", creds)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
