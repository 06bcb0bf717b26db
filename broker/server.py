"""Build and run the broker: TLS credentials, stores, cores, servicers, health, reflection.

``start_broker(cfg)`` returns a running ``Broker`` bound to its port (port 0 picks a
free one, as the tests do); ``Broker.stop()`` is the graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from broker.admin import AdminCore
from broker.admin_types import Counts
from broker.admin_types import ExchangeLink as AdminExchangeLink
from broker.audit import AuditBackend, AuditError
from broker.backends import Backend, BrokerStore, open_backend
from broker.config import BrokerConfig
from broker.errors import BrokerError
from broker.exchange import Clock, ExchangeCore
from broker.grpc.admin import AdminServicer
from broker.grpc.exchange import ExchangeServicer
from broker.grpc.federation import SERVICE as FEDERATION_SERVICE
from broker.grpc.federation import attach, load_trust, root_bundle
from broker.grpc.interceptor import AuthInterceptor
from broker.grpc.status import status_name
from broker.listen import DataDirLock, parse_listen, refuse_taken
from broker.metrics import MetricsExporter
from broker.metrics.federation import FederationCollector
from broker.registry import PartnerRegistry
from broker.retention import Retention
from broker.store import SqliteMessageStore, StoreError
from coalition.clock import wall_clock_ms
from coalition.pki import load_broker
from coalition.v1 import admin_pb2, admin_pb2_grpc, exchange_pb2, exchange_pb2_grpc

log = logging.getLogger("coalition.broker")
# Below this much free space (or the configured reserve) a failed start-up write is
# taken for a full disk, not a fault.
_LOW_DISK = 1 << 20
# The longest one shutdown step may take on JetStream (each waits through elections).
CLOSE_STEP_S = 30.0

SERVICES = (
    exchange_pb2.DESCRIPTOR.services_by_name["Exchange"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)


class ExchangeLink:
    """The admin core's view of the exchange (broker.admin_types.ExchangeLink)."""

    def __init__(self, exchange: ExchangeCore) -> None:
        self._ex = exchange

    def policy_changed(self, partner: str) -> None:
        self._ex.policy_changed(partner)

    def live_streams(self, partner: str | None = None) -> int:
        if partner is None:
            return sum(len(subs) for subs in self._ex.live.values())
        return len(self._ex.live.get(partner, ()))

    def counters(self, partner: str) -> Counts:
        c = self._ex.counters[partner]
        return Counts(c.published, c.delivered, c.refused, dict(c.refusals))

    def in_flight(self, partner: str) -> int:
        return sum(len(s.inflight) for s in self._ex.live.get(partner, ()))


@dataclass
class Broker:
    """A running broker and its parts."""

    server: grpc.aio.Server
    port: int
    exchange: ExchangeCore
    admin: AdminCore
    store: BrokerStore
    audit: AuditBackend
    registry: PartnerRegistry
    health: HealthServicer
    _retention: asyncio.Task[None] | None = None
    retention: Retention | None = None
    auth: AuthInterceptor | None = None
    lock: DataDirLock | None = None
    metrics: MetricsExporter | None = None  # None unless cfg.metrics_listen is set
    backend: Backend | None = None
    peers: Any = None  # broker.jetstream.peers.Peers when brokers share a cluster
    federation: Any = None  # broker.grpc.federation.Federation when [federation] is set

    async def reload(self, cfg: BrokerConfig) -> None:
        """Apply what may change while serving (SIGHUP): the revoked serials. Live calls
        made with a newly revoked certificate end at once. Raises ValueError."""
        if self.auth is not None:
            await self.auth.set_revoked(cfg.revoked_serials)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, drain in-flight publishes, close streams, flush the stores."""
        log.info("shutting down", extra={"grace_s": grace})
        await self.health.enter_graceful_shutdown()
        if self.metrics is not None:
            await self.metrics.stop()  # scrapes read the stores closed below
        if self.federation is not None:
            await self.federation.stop()
        self.exchange.shutdown()
        await self.server.stop(grace)
        self.exchange.close()
        # On JetStream each step below waits through elections; a cluster that stops
        # answering must not hold the process, so each is bounded there too.
        bound = None if self.backend is None or self.backend.files else CLOSE_STEP_S
        if self.peers is not None:
            await _bounded(self.peers.close(), "giving back the partner leases", bound)
        if self._retention is not None:
            self._retention.cancel()
        # Everything the outboxes hold goes into the chain before the final checkpoint
        # (what cannot, stays in its outbox for the next start).
        await _bounded(self.exchange.books.drainer.close(), "draining the outboxes", bound)
        await _bounded(self.store.close(), "closing the message store", bound)
        try:
            checkpoint = self.audit.checkpoint(self.exchange.clock())
            await _bounded(checkpoint, "the final audit checkpoint", bound)
        except AuditError as exc:
            # Disk full, most likely. The chain is intact up to its last entry; only the
            # signed checkpoint of its final head is missing. Close the rest regardless.
            log.critical("final audit checkpoint not written: %s", exc)
        with contextlib.suppress(AuditError):  # closed all the same; logged just above
            await _bounded(self.audit.close(), "closing the audit log", bound)
        self.registry.close()
        if self.backend is not None:
            await _bounded(self.backend.disconnect(), "closing the cluster connection", bound)
        if self.lock is not None:
            self.lock.release()
        log.info("stopped")


async def _bounded(step: Awaitable[object], what: str, bound: float | None) -> None:
    """Await step, at most bound seconds (None: no bound); past it, say so and go on."""
    try:
        async with asyncio.timeout(bound):
            await step
    except TimeoutError:
        log.critical("shutdown: %s did not finish in %.0f s; closing the rest", what, bound)


async def start_broker(cfg: BrokerConfig, *, clock: Clock = wall_clock_ms) -> Broker:
    """Open the stores and start serving on cfg.listen; returns once the port is bound.

    Refused (OSError/ValueError, one line) before anything is written: a listen address
    without a port, a data directory another broker holds, an address in use.
    """
    parse_listen(cfg.listen)
    if cfg.metrics_listen:
        parse_listen(cfg.metrics_listen)
    data = Path(cfg.data_dir)
    data.mkdir(parents=True, exist_ok=True, mode=0o700)  # noqa: ASYNC240 - once at start-up
    lock = DataDirLock(data).acquire()
    try:
        refuse_taken(cfg.listen)
        if cfg.metrics_listen:
            refuse_taken(cfg.metrics_listen)
        broker = await _start_broker(cfg, clock)
    except BaseException:
        lock.release()
        raise
    broker.lock = lock
    return broker


async def _start_broker(cfg: BrokerConfig, clock: Clock) -> Broker:
    creds = load_broker(Path(cfg.pki_dir))
    trust = load_trust(cfg)  # refused before anything is opened (FederationError)
    data = Path(cfg.data_dir)
    data.mkdir(parents=True, exist_ok=True, mode=0o700)  # noqa: ASYNC240 - once at start-up
    backend = await open_backend(cfg, creds, clock)
    store, audit, registry = backend.store, backend.audit, backend.registry
    if backend.kind == "jetstream" and cfg.live_delivery:
        # The live feed sees only this broker's publishes; with brokers sharing the store
        # every delivery is read from it (woken across brokers, broker.jetstream.peers).
        cfg = cfg.with_overrides(live_delivery=False)
    exchange = ExchangeCore(
        cfg, store, audit, registry, creds.ca_cert, clock, status_of=status_name
    )
    drainer = exchange.books.drainer
    drainer.add_source("messages", store)
    audit.before_read = drainer.drain  # audit reads see every committed decision
    audit.read_through = drainer.undrained
    # Before serving: the audit records the outboxes still hold (a crash or an audit
    # failure left them there) go into the chain, each once. On a full disk this cannot
    # be written: serve anyway (deliveries, admin reads) and refuse publishes until it
    # can (the next publish after space is freed drains them).
    unwritten: list[str] = []
    try:
        drained = await drainer.start()
        if drained:
            log.info("drained %d audit records left in the outboxes", drained)
    except (AuditError, StoreError, BrokerError) as exc:
        _degrade_or_raise(cfg, exc, exchange)
        unwritten.append("the audit records left in the outboxes")
    retention = Retention(exchange, store, clock, max_notices=cfg.max_notices_per_partner)
    try:
        await retention.start()  # streams send the notices left by the last run
    except (StoreError, BrokerError) as exc:
        _degrade_or_raise(cfg, exc, exchange)
        unwritten.append("the expiry notices left by the last run")
    _warn_overcommitted(cfg, len(registry.all()))
    audit_cert_der = b""
    if creds.audit_cert is not None:
        audit_cert_der = creds.audit_cert.public_bytes(serialization.Encoding.DER)
    link: AdminExchangeLink = ExchangeLink(exchange)
    peers = None
    if backend.nc is not None:  # before serving: every stream claims its partner's lease
        from broker.jetstream.wiring import join_cluster

        peers, link = await join_cluster(backend, cfg, exchange, link, clock)
    admin = AdminCore(
        registry,
        store,
        audit,
        exchange.books,
        link,
        creds.ca_cert,
        clock,
        creds.audit_key.public_key(),
        audit_cert_der,
    )
    admin.trust = trust
    auth = AuthInterceptor(cfg, registry, audit, clock)
    server = grpc.aio.server(
        interceptors=[auth],
        options=[
            ("grpc.max_receive_message_length", cfg.receive_limit),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.max_pings_without_data", 0),
            # Without this gRPC binds with SO_REUSEPORT: a second broker on the same port
            # would start too, and the kernel would share the connections between them.
            ("grpc.so_reuseport", 0),
            *_keepalive(cfg),
            *_stream_limits(cfg),
        ],
    )
    exchange_pb2_grpc.add_ExchangeServicer_to_server(ExchangeServicer(exchange), server)
    admin_pb2_grpc.add_AdminServicer_to_server(
        AdminServicer(admin, lambda: auth.authorizer.revoked), server
    )
    fed = None
    if trust is not None:
        fed = await attach(cfg, trust, creds, exchange, audit, server, auth)
        admin.federation = fed.view
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            *SERVICES,
            *((FEDERATION_SERVICE,) if fed is not None else ()),
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    tls = grpc.ssl_server_credentials(
        [(creds.tls_key_pem, creds.tls_cert_pem)],
        root_certificates=root_bundle(creds, trust),
        require_client_auth=True,
    )
    try:
        port = server.add_secure_port(cfg.listen, tls)
    except RuntimeError:  # "Failed to bind": taken since refuse_taken looked, or unbindable
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {cfg.listen}")
    await server.start()
    for name in ("", *SERVICES):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    broker = Broker(server, port, exchange, admin, store, audit, registry, health, auth=auth)
    broker.backend, broker.peers = backend, peers
    if fed is not None:
        broker.federation = fed
        fed.start()
    if cfg.metrics_listen:
        broker.metrics = await _start_metrics(cfg, broker)
    broker.retention = retention
    broker._retention = asyncio.create_task(
        _retention_loop(retention, cfg.retention_interval_ms / 1000)
    )
    try:
        await audit.record(
            kind="broker.started",
            actor="broker",
            decision="allow",
            detail={"port": port},
            now_ms=clock(),
        )
    except AuditError as exc:
        _degrade_or_raise(cfg, exc, exchange)
        unwritten.append("broker.started")
    _report_disk(cfg, unwritten)
    log.info("serving", extra={"listen": cfg.listen, "port": port, "data_dir": str(data)})
    return broker


async def _start_metrics(cfg: BrokerConfig, b: Broker) -> MetricsExporter:
    """The Prometheus endpoint on its own plain-HTTP address (broker.metrics)."""
    files = isinstance(b.store, SqliteMessageStore)  # else JetStream: no audit.db
    audit_db = Path(cfg.data_dir) / "audit.db" if files else None
    metrics = MetricsExporter(b.exchange, b.store, b.registry, audit_db, audit_count=b.audit.count)
    metrics.attach(b.exchange, {"messages": b.store, "audit": b.audit})
    if b.federation is not None:
        metrics.registry.register(FederationCollector(b.federation.state))
    if b.auth is not None:
        b.auth.on_refused = metrics.instruments.auth_refused
    try:
        await metrics.start(cfg.metrics_listen)
    except OSError:
        await b.stop(grace=0)
        raise
    return metrics


def _stream_limits(cfg: BrokerConfig) -> list[tuple[str, int]]:
    """grpc core options that bound what one HTTP/2 connection can make the broker hold.

    MAX_CONCURRENT_STREAMS is advertised to clients; with overload protection (made
    explicit here, grpc's default) a stream counts against it until the server has
    released it, not just until the client reset it, and streams beyond it are refused
    with RST_STREAM(REFUSED_STREAM) in the transport, before any Python runs. So a
    HEADERS+RST_STREAM flood (CVE-2023-44487) queues at most this many calls per
    connection instead of every stream it opens. Connections with no call for
    max_connection_idle_ms are closed (clients reconnect on their next call). A limit
    of 0 leaves grpc's default (unlimited, never closed).
    """
    opts = [("grpc.http.overload_protection", 1)]
    if cfg.max_streams_per_connection > 0:
        opts.append(("grpc.max_concurrent_streams", cfg.max_streams_per_connection))
    if cfg.max_connection_idle_ms > 0:
        opts.append(("grpc.max_connection_idle_ms", cfg.max_connection_idle_ms))
    return opts


def _keepalive(cfg: BrokerConfig) -> list[tuple[str, int]]:
    """Accept the clients' keepalive pings (the SDK's every 30 s) on idle streams: grpc's
    default minimum of 5 min would answer them with GOAWAY too_many_pings, dropping an
    idle subscription every few minutes."""
    return [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", cfg.min_ping_interval_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", cfg.min_ping_interval_ms),
    ]


def _free_bytes(cfg: BrokerConfig) -> int | None:
    try:
        return shutil.disk_usage(cfg.data_dir).free
    except OSError:
        return None


def _degrade_or_raise(cfg: BrokerConfig, exc: Exception, exchange: ExchangeCore) -> None:
    """A start-up write failed: on a full disk, serve without it (publishes refused until
    the audit log can be written); otherwise it is a real fault, raised."""
    free = _free_bytes(cfg)
    if free is None or free >= max(cfg.min_free_bytes, _LOW_DISK):
        raise exc
    exchange.audit_failed = True


def _report_disk(cfg: BrokerConfig, unwritten: list[str]) -> None:
    """One log line when starting on a (nearly) full disk: what works and what is refused."""
    free = _free_bytes(cfg)
    if free is None:
        return
    mib = f"{free / 1048576:.1f} MiB free, {cfg.min_free_bytes / 1048576:.1f} MiB reserve"
    if unwritten:
        log.critical(
            f"the data disk is full ({mib}): could not record {' and '.join(unwritten)}; "
            "serving deliveries and admin reads, refusing publishes (audit_unavailable) "
            "until space is freed"
        )
    elif free < cfg.min_free_bytes:
        log.warning(
            f"the data disk is nearly full ({mib}): publishes are refused (store_full) "
            "until space is freed; deliveries and admin calls are served"
        )


async def _retention_loop(retention: Retention, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            await retention.sweep()
        except Exception:
            log.exception("retention sweep failed")


def _warn_overcommitted(cfg: BrokerConfig, partners: int) -> None:
    """Quotas keep one partner from filling the store; say when several together could."""
    if partners * cfg.sender_quota > cfg.max_store_bytes:
        log.warning(
            "the partners' store quotas together exceed the store: %d partners x %d bytes > "
            "max_store_bytes %d; if they all fill their quotas, publishes get store_full",
            partners,
            cfg.sender_quota,
            cfg.max_store_bytes,
        )
