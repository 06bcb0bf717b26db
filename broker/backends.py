"""Open the message store, the audit log and the registry on the configured backend.

``[store] backend = "sqlite"`` (the default) keeps all three in SQLite files in the data
directory, for one broker. ``"jetstream"`` keeps them in a NATS JetStream cluster, so
several brokers serve one coalition (docs/cluster.md): the broker connects, checks that
the cluster is as durable as the SQLite backend (broker.jetstream.durability), opens the
three parts, and then checks the replicas of every stream and bucket they use. The data
directory then holds only the broker's lock.

The JetStream modules (and nats-py) are imported only for that backend.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryptography.hazmat.primitives import serialization

from broker.audit import AuditBackend, AuditLog
from broker.audit.drainer import OutboxSource
from broker.config import BrokerConfig
from broker.registry import PartnerRegistry, Registry
from broker.store import MessageStore, SqliteMessageStore
from coalition.pki import BrokerCredentials

if TYPE_CHECKING:
    from nats.aio.client import Client

    from broker.jetstream.connect import ClusterSettings

log = logging.getLogger("coalition.broker")

CONNECT_WAIT_S = 30.0

Clock = Callable[[], int]


class BrokerStore(MessageStore, OutboxSource, Protocol):
    """The message store with its audit outbox and commit timing, as every backend
    provides it."""

    def time_commits(self, hook: Callable[[float], None] | None) -> None:
        """Call hook with each commit's duration in seconds (None: stop)."""


@dataclass
class Backend:
    """The three stores one broker runs on, and (JetStream) its cluster connection."""

    kind: str
    store: BrokerStore
    audit: AuditBackend
    registry: PartnerRegistry
    nc: Client | None = None
    settings: ClusterSettings | None = None
    # Durability weaker than required, allowed by the operator (audited at start).
    weaknesses: list[str] = field(default_factory=list)

    @property
    def files(self) -> bool:
        """Whether the stores are files in the data directory (sizes, audit.db)."""
        return self.kind == "sqlite"

    async def disconnect(self) -> None:
        """Close the cluster connection, last (after every store is closed)."""
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()


async def _connect(settings: ClusterSettings, name: str) -> Client:
    """Connect, waiting at most CONNECT_WAIT_S for a first server (nats-py would retry
    for ever); each connection error is one log line, repeats while starting left out."""
    from broker.jetstream.connect import connect

    starting = True
    seen: set[str] = set()

    async def on_error(exc: Exception) -> None:
        said = f"{type(exc).__name__}: {exc}"
        if not starting or said not in seen:
            seen.add(said)
            log.warning("NATS connection: %s", said)

    try:
        nc = await asyncio.wait_for(
            connect(settings, name=f"coalition-broker {name}", error_cb=on_error), CONNECT_WAIT_S
        )
    except Exception as exc:  # nats-py raises its own types; one line for the operator
        last = "; ".join(sorted(seen)) or str(exc) or type(exc).__name__
        raise OSError(
            f"no NATS server answered in {CONNECT_WAIT_S:.0f} s "
            f"({', '.join(settings.servers)}): {last}"
        ) from exc
    starting = False
    return nc


def cluster_settings(cfg: BrokerConfig) -> ClusterSettings:
    """The [store] section as the JetStream modules take it."""
    from broker.jetstream.connect import ClusterSettings

    return ClusterSettings(
        servers=cfg.store_servers,
        prefix=cfg.store_prefix,
        replicas=cfg.store_replicas,
        tls_ca=cfg.store_tls_ca,
        tls_cert=cfg.store_tls_cert,
        tls_key=cfg.store_tls_key,
        allow_data_loss=cfg.allow_data_loss,
    )


async def open_backend(cfg: BrokerConfig, creds: BrokerCredentials, clock: Clock) -> Backend:
    """Open store, audit log and registry for cfg.store_backend.

    Raises DurabilityError (a ValueError) for a cluster weaker than required without
    allow_data_loss, OSError when no NATS server answers, and what each store raises.
    """
    if cfg.store_backend == "jetstream":
        return await _open_jetstream(cfg, creds, clock)
    data = Path(cfg.data_dir)
    store = await SqliteMessageStore.open(
        data / "messages.db",
        max_bytes=cfg.max_store_bytes,
        retention_bytes=cfg.retention_bytes,
        max_age_ms=cfg.retention_ms,
        sender_bytes=cfg.sender_quota,
    )
    audit = await AuditLog.open(
        data / "audit.db",
        creds.audit_key,
        checkpoint_every=cfg.audit_checkpoint_every,
        refusal_threshold=cfg.refusal_audit_threshold,
        refusal_interval_ms=cfg.refusal_audit_interval_ms,
        clock=clock,
    )
    return Backend("sqlite", store, audit, Registry(data / "state.db"))


async def _open_jetstream(cfg: BrokerConfig, creds: BrokerCredentials, clock: Clock) -> Backend:
    from broker.jetstream.audit import JetStreamAuditLog
    from broker.jetstream.connect import tls_context
    from broker.jetstream.durability import check_servers, check_streams
    from broker.jetstream.registry import JetStreamRegistry
    from broker.jetstream.store import JetStreamMessageStore

    settings = cluster_settings(cfg)
    audit_cert = b""
    if creds.audit_cert is not None:
        audit_cert = creds.audit_cert.public_bytes(serialization.Encoding.DER)
    weak = await check_servers(settings, cfg.store_monitor, tls_context(settings))
    nc = await _connect(settings, cfg.name)
    try:
        store = await JetStreamMessageStore.open(
            nc,
            settings,
            max_bytes=cfg.max_store_bytes,
            retention_bytes=cfg.retention_bytes,
            max_age_ms=cfg.retention_ms,
            sender_bytes=cfg.sender_quota,
        )
        audit = await JetStreamAuditLog.open(
            nc,
            settings,
            creds.audit_key,
            checkpoint_every=cfg.audit_checkpoint_every,
            refusal_threshold=cfg.refusal_audit_threshold,
            refusal_interval_ms=cfg.refusal_audit_interval_ms,
            clock=clock,
            # Its checkpoints carry this broker's audit certificate, and the CA lets the
            # log trust the other brokers' (each broker may have its own audit key).
            certificate=audit_cert,
            ca=creds.ca_cert,
        )
        registry = await JetStreamRegistry.open(nc, settings)
        weak += await check_streams(settings, nc)
    except BaseException:
        await nc.close()
        raise
    return Backend(
        "jetstream",
        store,
        audit,
        registry,
        nc=nc,
        settings=settings,
        weaknesses=weak,
    )
