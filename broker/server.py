"""Build and run the broker: TLS credentials, stores, cores, servicers, health, reflection.

``start_broker(cfg)`` returns a running ``Broker`` bound to its port (port 0 picks a
free one, as the tests do); ``Broker.stop()`` is the graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from broker.admin import AdminCore
from broker.audit import AuditError, AuditLog
from broker.auth import AuthInterceptor
from broker.config import BrokerConfig
from broker.exchange import Clock, ExchangeCore, wall_clock_ms
from broker.registry import Registry
from broker.servicers import AdminServicer, ExchangeServicer
from broker.store import SqliteMessageStore
from coalition.pki import load_broker
from coalition.v1 import admin_pb2, admin_pb2_grpc, exchange_pb2, exchange_pb2_grpc

log = logging.getLogger("coalition.broker")

SERVICES = (
    exchange_pb2.DESCRIPTOR.services_by_name["Exchange"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)


@dataclass
class Broker:
    """A running broker and its parts."""

    server: grpc.aio.Server
    port: int
    exchange: ExchangeCore
    admin: AdminCore
    store: SqliteMessageStore
    audit: AuditLog
    registry: Registry
    health: HealthServicer
    _retention: asyncio.Task[None] | None = None

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, drain in-flight publishes, close streams, flush the stores."""
        log.info("shutting down", extra={"grace_s": grace})
        await self.health.enter_graceful_shutdown()
        self.exchange.shutdown()
        await self.server.stop(grace)
        self.exchange.close()
        await self.exchange.flush_audited()
        if self._retention is not None:
            self._retention.cancel()
        await self.store.close()
        try:
            await self.audit.checkpoint(self.exchange.clock())
        except AuditError as exc:
            # Disk full, most likely. The chain is intact up to its last entry; only the
            # signed checkpoint of its final head is missing. Close the rest regardless.
            log.critical("final audit checkpoint not written: %s", exc)
        with contextlib.suppress(AuditError):  # closed all the same; logged just above
            await self.audit.close()
        self.registry.close()
        log.info("stopped")


async def start_broker(cfg: BrokerConfig, *, clock: Clock = wall_clock_ms) -> Broker:
    """Open the stores and start serving on cfg.listen; returns once the port is bound."""
    creds = load_broker(Path(cfg.pki_dir))
    data = Path(cfg.data_dir)
    data.mkdir(parents=True, exist_ok=True, mode=0o700)  # noqa: ASYNC240 - once at start-up
    store = await SqliteMessageStore.open(
        data / "messages.db",
        max_bytes=cfg.max_store_bytes,
        retention_bytes=cfg.retention_bytes,
        max_age_ms=cfg.retention_ms,
    )
    audit = await AuditLog.open(
        data / "audit.db", creds.audit_key, checkpoint_every=cfg.audit_checkpoint_every
    )
    registry = Registry(data / "state.db")
    exchange = ExchangeCore(cfg, store, audit, registry, creds.ca_cert, clock)
    # Before serving: acceptances and registry changes a crash kept out of the audit log.
    recovered = await exchange.reconcile_audit()
    if recovered:
        log.warning("recorded %d audit entries missing after a crash", recovered)
    admin = AdminCore(exchange, registry, audit, creds.audit_key.public_key())
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(cfg, registry, audit, clock)],
        options=[
            ("grpc.max_receive_message_length", cfg.receive_limit),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    )
    exchange_pb2_grpc.add_ExchangeServicer_to_server(ExchangeServicer(exchange), server)
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(admin), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            *SERVICES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    tls = grpc.ssl_server_credentials(
        [(creds.tls_key_pem, creds.tls_cert_pem)],
        root_certificates=creds.ca_pem,
        require_client_auth=True,
    )
    port = server.add_secure_port(cfg.listen, tls)
    if port == 0:
        raise OSError(f"cannot listen on {cfg.listen}")
    await server.start()
    for name in ("", *SERVICES):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    broker = Broker(server, port, exchange, admin, store, audit, registry, health)
    broker._retention = asyncio.create_task(_retention_loop(store, clock))
    await audit.record(
        kind="broker.started",
        actor="broker",
        decision="allow",
        detail={"port": port},
        now_ms=clock(),
    )
    log.info("serving", extra={"listen": cfg.listen, "port": port, "data_dir": str(data)})
    return broker


async def _retention_loop(store: SqliteMessageStore, clock: Clock) -> None:
    while True:
        await asyncio.sleep(60)
        try:
            removed = await store.enforce_retention(clock())
            if removed:
                log.info("retention", extra={"removed": removed})
        except Exception:
            log.exception("retention sweep failed")
