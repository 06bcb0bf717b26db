"""Operating the broker: health, reflection, certificate refusals, TLS 1.3, config,
the command line, a full store and the rate limit — all over real mTLS."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from broker.auth import AuthRefused
from broker.config import BrokerConfig, ConfigError, load_config
from broker.grpc.interceptor import AuthInterceptor
from broker.grpc.status import status_of
from broker.server import Broker
from clients.sdk import ClientError, PartnerClient, secure_channel
from coalition.identity import Identity
from coalition.labels import parse_label
from coalition.pki import (
    PartnerCredentials,
    issue_tls_cert,
    load_broker,
    load_ca,
    load_partner,
    make_dev_pki,
)
from coalition.v1 import exchange_pb2
from tests.helpers import admit, now_ms, partner, policy, running_broker

ROOT = Path(__file__).resolve().parent.parent
LABEL = parse_label("NATO SECRET // REL TO KOR, USA")
DAY_MS = 86_400_000


@pytest.fixture
async def broker(pki: Path, tmp_path: Path) -> AsyncIterator[Broker]:
    b = await running_broker(pki, tmp_path / "broker")
    for code in ("KOR", "USA"):
        await admit(pki, b.port, policy(code))
    try:
        yield b
    finally:
        await b.stop(grace=1)


def kor_with_cert(pki: Path, cert_pem: bytes, key_pem: bytes) -> PartnerCredentials:
    """KOR's credentials with another TLS certificate."""
    creds = load_partner(pki / "partners" / "KOR")
    return dataclasses.replace(creds, tls_cert_pem=cert_pem, tls_key_pem=key_pem)


def new_kor_tls(pki: Path, issued_ms: int, valid_days: int = 1) -> tuple[x509.Certificate, bytes]:
    """A KOR TLS certificate from the coalition CA, issued at issued_ms; (cert, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_tls_cert(
        load_ca(pki), Identity.partner("KOR"), key.public_key(), issued_ms, valid_days=valid_days
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert, key_pem


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# -- health and reflection ----------------------------------------------------------------


async def test_health_and_reflection_over_mtls(pki: Path, broker: Broker) -> None:
    kor = load_partner(pki / "partners" / "KOR")
    target = f"127.0.0.1:{broker.port}"
    async with secure_channel(target, kor.ca_pem, kor.tls_cert_pem, kor.tls_key_pem) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "coalition.v1.Exchange", "coalition.v1.Admin"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health.Check(health_pb2.HealthCheckRequest(service="nope.v1.X"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        services: set[str] = set()
        async for resp in stub.ServerReflectionInfo(iter([request]), timeout=5):
            services |= {s.name for s in resp.list_services_response.service}
        assert {"coalition.v1.Exchange", "coalition.v1.Admin", "grpc.health.v1.Health"} <= services
        # Reflection serves the descriptors too, so grpcurl-style tools work.
        ask = reflection_pb2.ServerReflectionRequest(file_containing_symbol="coalition.v1.Admin")
        async for resp in stub.ServerReflectionInfo(iter([ask]), timeout=5):
            assert resp.file_descriptor_response.file_descriptor_proto


# -- certificates ---------------------------------------------------------------------------


async def test_revoked_certificate_is_unauthenticated_and_audited(
    pki: Path, tmp_path: Path
) -> None:
    cert, key_pem = new_kor_tls(pki, now_ms())
    serial = format(cert.serial_number, "x")
    b = await running_broker(pki, tmp_path / "broker", revoked_serials=(serial.upper(),))
    try:
        await admit(pki, b.port, policy("KOR"))
        before = await b.audit.count()
        async with PartnerClient(
            kor_with_cert(pki, pem(cert), key_pem), f"127.0.0.1:{b.port}"
        ) as c:
            with pytest.raises(ClientError) as info:
                await c.directory()
            assert info.value.status == grpc.StatusCode.UNAUTHENTICATED
            assert "revoked" in info.value.message
        [entry] = await b.audit.query(kind="auth.refused")
        assert entry.decision == "cert_revoked"
        assert entry.actor == "urn:coalition:partner:KOR"
        detail = json.loads(entry.detail_json)
        assert detail["method"] == "/coalition.v1.Exchange/Directory"
        # The broker saw the call arrive over TLS 1.3 (recorded servicer-side).
        assert detail["tls"] == "TLSv1.3"
        assert await b.audit.count() == before + 1
        # KOR's own, unrevoked certificate still works.
        async with partner(pki, "KOR", b.port) as ok:
            assert "KOR" in (await ok.directory()).peers
    finally:
        await b.stop(grace=1)


@pytest.mark.parametrize("kind", ["other_ca", "expired"])
async def test_foreign_and_expired_certificates_fail_the_handshake(
    kind: str, pki: Path, broker: Broker, tmp_path: Path
) -> None:
    if kind == "other_ca":
        rogue = tmp_path / "rogue"
        make_dev_pki(rogue, ["KOR"], [], now_ms())
        other = load_partner(rogue / "partners" / "KOR")
        cert_pem, key_pem = other.tls_cert_pem, other.tls_key_pem
    else:
        cert, key_pem = new_kor_tls(pki, now_ms() - 3 * DAY_MS, valid_days=1)
        assert cert.not_valid_after_utc.timestamp() * 1000 < now_ms()
        cert_pem = pem(cert)
    entries_before = await broker.audit.count()
    async with PartnerClient(
        kor_with_cert(pki, cert_pem, key_pem), f"127.0.0.1:{broker.port}"
    ) as c:
        with pytest.raises(ClientError) as info:
            await c.directory()
    assert info.value.status == grpc.StatusCode.UNAVAILABLE
    # Refused by TLS before any gRPC call existed: the interceptor and the servicers never
    # ran, so there is no audit entry (see docs/broker.md, "TLS handshake refusals").
    assert await broker.audit.count() == entries_before
    assert broker.exchange.counters["KOR"].refused == 0


async def test_tls13_is_negotiated_and_required(pki: Path, broker: Broker) -> None:
    """Servicer side: behind the broker's interceptor a call sees TLSv1.3; others are refused."""
    seen: list[dict[str, list[bytes]]] = []
    interceptor = AuthInterceptor(
        BrokerConfig(operators=("op1",)), broker.registry, broker.audit, now_ms
    )

    class Recording(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
        async def Check(self, request: Any, context: Any) -> health_pb2.HealthCheckResponse:
            seen.append({k: list(v) for k, v in context.auth_context().items()})
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    class Probe:
        def __init__(self, auth: dict[str, list[bytes]]) -> None:
            self.auth = auth

        def auth_context(self) -> dict[str, list[bytes]]:
            return self.auth

    creds = load_broker(pki)
    server = grpc.aio.server(interceptors=[interceptor])
    health_pb2_grpc.add_HealthServicer_to_server(Recording(), server)
    port = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            [(creds.tls_key_pem, creds.tls_cert_pem)],
            root_certificates=creds.ca_pem,
            require_client_auth=True,
        ),
    )
    await server.start()
    try:
        kor = load_partner(pki / "partners" / "KOR")
        target = f"127.0.0.1:{port}"
        async with secure_channel(target, kor.ca_pem, kor.tls_cert_pem, kor.tls_key_pem) as ch:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        await server.stop(None)
    [auth] = seen
    assert auth["ssl_tls_version"] == [b"TLSv1.3"]
    method = "/grpc.health.v1.Health/Check"
    ident = interceptor.authorize(Probe(auth), method)  # type: ignore[arg-type]
    assert ident == Identity.partner("KOR")
    downgraded = {**auth, "ssl_tls_version": [b"TLSv1.2"]}
    with pytest.raises(AuthRefused) as info:
        interceptor.authorize(Probe(downgraded), method)  # type: ignore[arg-type]
    assert info.value.code == "tls_version"
    assert status_of(info.value.error) == grpc.StatusCode.UNAUTHENTICATED


# -- configuration and command line ---------------------------------------------------------


def test_example_config_parses() -> None:
    path = ROOT / "examples" / "broker.toml"
    cfg = load_config(path)
    assert cfg.listen == "127.0.0.1:7443"
    assert cfg.pki_dir == (path.parent / "../pki").resolve()
    assert cfg.data_dir == (path.parent / "../data/broker").resolve()
    assert cfg.operators == ("op1", "op2")
    # Every key in the example takes its documented default except those it sets.
    defaults = BrokerConfig()
    assert cfg.max_envelope_bytes == defaults.max_envelope_bytes
    assert cfg.audit_checkpoint_every == defaults.audit_checkpoint_every
    assert cfg.revoked_serials == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[broker]\nlisen = '127.0.0.1:1'\n", "unknown key 'lisen' in [broker]"),
        ("[brokr]\nlisten = '127.0.0.1:1'\n", "unknown section [brokr]"),
        ("[limits]\nmax_store_bytes = '1G'\n", "max_store_bytes must be an integer"),
        ("[broker]\noperators = 'op1'\n", "operators must be a list of strings"),
        ("[log]\njson = 'yes'\n", "json must be true or false"),
        ("[broker\n", "cannot read config"),
    ],
)
def test_bad_config_is_a_clear_error(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_serve_help_and_bad_config_exit_codes(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "broker.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    for flag in ("--config", "--pki", "--data", "--listen", "--operators", "--port-file"):
        assert flag in out.stdout
    assert "SIGTERM" in out.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[broker]\nlisen = 'x'\n")
    out = subprocess.run(
        [sys.executable, "-m", "broker.cli", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert "unknown key 'lisen'" in out.stderr


# -- limits ---------------------------------------------------------------------------------


async def test_full_store_refuses_per_envelope_and_keeps_serving(pki: Path, tmp_path: Path) -> None:
    # One sender fills its share (sender_store_bytes) long before the store's own bound.
    b = await running_broker(
        pki, tmp_path / "broker", max_store_bytes=64 * 1024, sender_store_bytes=8 * 1024
    )
    try:
        for code in ("KOR", "USA"):
            await admit(pki, b.port, policy(code))
        async with partner(pki, "KOR", b.port) as kor, partner(pki, "USA", b.port) as usa:
            await usa.register_keys()
            accepted: list[str] = []
            results: list[exchange_pb2.PublishResult] = []
            for i in range(20):  # each ~2.5 KiB: the store fills within a few
                s = await kor.seal(b"x" * 1024 + bytes([i]), topic="intel.a", label=LABEL)
                [r] = await kor.publish([s.envelope])
                results.append(r)
                if r.outcome == exchange_pb2.ACCEPTED:
                    accepted.append(r.message_id)
                else:
                    break
            assert accepted, "the first message fits"
            full = results[-1]
            assert (full.outcome, full.status, full.reason_code) == (
                exchange_pb2.REFUSED,
                "RESOURCE_EXHAUSTED",
                "quota_exceeded",
            )
            assert "full" in full.reason
            # A batch: every envelope gets its own quota_exceeded result.
            batch = [
                (await kor.seal(b"y", topic="intel.a", label=LABEL)).envelope for _ in range(3)
            ]
            again = await kor.publish(batch)
            assert [(r.status, r.reason_code) for r in again] == [
                ("RESOURCE_EXHAUSTED", "quota_exceeded")
            ] * 3
            assert len({r.message_id for r in again}) == 3
            # Still serving: the directory answers and what was stored is delivered.
            assert "USA" in (await kor.directory(refresh=True)).peers
            sub = usa.subscribe(["intel.>"])
            got: list[str] = []
            async for d in sub:
                got.append((await usa.open(d)).header.message_id)
                await sub.ack([d.offset])
                if len(got) == len(accepted):
                    break
            await sub.aclose()
            assert got == accepted
            refusals = await b.audit.query(kind="publish.refused")
            assert [e.decision for e in refusals] == ["quota_exceeded"] * 4
    finally:
        await b.stop(grace=1)


async def test_rate_limit(pki: Path, tmp_path: Path) -> None:
    b = await running_broker(pki, tmp_path / "broker", default_publish_rate_per_s=2)
    try:
        for code in ("KOR", "USA"):
            await admit(pki, b.port, policy(code))
        async with partner(pki, "KOR", b.port) as kor, partner(pki, "USA", b.port) as usa:
            await usa.register_keys()
            batch = [
                (await kor.seal(f"m{i}".encode(), topic="intel.a", label=LABEL)).envelope
                for i in range(5)
            ]
            results = await kor.publish(batch)  # one batch: one instant, a bucket of 2
            assert [r.outcome for r in results] == [exchange_pb2.ACCEPTED] * 2 + [
                exchange_pb2.REFUSED
            ] * 3
            for r in results[2:]:
                assert (r.status, r.reason_code) == ("RESOURCE_EXHAUSTED", "rate_limited")
                assert "2 messages/s" in r.reason
            assert (await b.store.stats()).messages == 2
    finally:
        await b.stop(grace=1)
