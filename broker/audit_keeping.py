"""The publish path's audit duties: its records into the store's outbox, the outbox
drainer, and the audit-failed state (the disk guard is broker.exchange.disk_guard).

A publish writes each stored message's ``publish.accepted`` record (and the request's
refusal records) in the store's own commit (MessageStore.append), and a delivery batch
its decision records (MessageStore.record) before it is sent; the drainer
(broker.audit.drainer, owned here) moves them into the audit log. ``audit_failed`` is
set when the drainer cannot write the audit log: publishes are then refused
(``audit_unavailable``) until the log can be written again (probe_audit), while the
outboxes keep every record. ExchangeCore (broker.exchange) holds one AuditKeeping.

What the refusal says depends on the backend (``unavailable``): on SQLite the log is a
local file and a full disk is the likely cause (RESOURCE_EXHAUSTED); on JetStream it is
the cluster (the audit or messages stream electing a leader, or without a quorum), which
passes by itself, so the refusal is UNAVAILABLE and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from broker.audit import AuditBackend, AuditError, AuditItem
from broker.audit.drainer import Drainer
from broker.audit.items import acceptance_item, encode
from broker.config import BrokerConfig
from broker.errors import BrokerError, Exhausted, Unavailable
from broker.registry import PartnerRegistry
from broker.store import MessageStore, StoredMessage, StoreError, StoreFull

log = logging.getLogger("coalition.broker")

Clock = Callable[[], int]


class AuditKeeping:
    """The outbox drainer, the store's outbox records, and the audit-failed state."""

    def __init__(
        self,
        cfg: BrokerConfig,
        store: MessageStore,
        audit: AuditBackend,
        registry: PartnerRegistry,
        clock: Clock,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.audit = audit
        self.registry = registry
        self.clock = clock
        self.audit_failed = False
        # The broker's wiring adds the message store's outbox (server.py); the registry's
        # is added here.
        self.drainer = Drainer(
            audit, interval_ms=cfg.audit_drain_interval_ms, on_failure=self._drain_failed
        )
        self.drainer.add_source("registry", registry)

    def _drain_failed(self, exc: Exception) -> None:
        if isinstance(exc, AuditError) and not self.audit_failed:
            self.audit_failed = True
            log.critical("audit log cannot be written; refusing publishes until it can")

    async def record(self, items: Sequence[AuditItem], now_ms: int) -> None:
        """Write decision records into the store's outbox, durable on return; raises
        StoreError (StoreFull) if the store cannot take them."""
        if items:
            await self.store.record([encode(i) for i in items], now_ms)
            self.drainer.notify()

    def recorded(self) -> None:
        """A store commit wrote records (an append): drain them soon."""
        self.drainer.notify()

    async def registry_changed(self) -> None:
        """After a registry write: drain its audit entry into the log now. If the log
        cannot take it, the entry stays in the registry's outbox (the change itself is
        durable), is drained once the log is writable again, and publishes are refused
        until then."""
        try:
            if self.audit_failed:
                await self.probe_audit(self.clock())
            else:
                await self.drainer.drain()
        except (AuditError, StoreError, BrokerError):
            self.audit_failed = True
            log.critical("audit log cannot be written; refusing publishes until it can")

    async def probe_audit(self, now: int) -> None:
        """While audit_failed: try to write the log again (an ``audit.recovered`` entry,
        then drain the outboxes); clear audit_failed if it can, else raise
        audit_unavailable (see unavailable: RESOURCE_EXHAUSTED on SQLite, UNAVAILABLE on
        JetStream)."""
        try:
            await self.audit.record(kind="audit.recovered", actor="broker", now_ms=now)
            try:
                await self.drainer.drain()
            except StoreError as exc:  # an outbox cannot be read: retried when notified
                log.error("could not read an audit outbox: %s", exc)
        except AuditError as exc:
            raise unavailable(
                self.cfg.store_backend, exc, "publishes are refused until it can"
            ) from exc
        self.audit_failed = False
        log.warning("audit log writable again; accepting publishes")


def unavailable(backend: str, exc: Exception, what: str) -> BrokerError:
    """The refusal while audit records cannot be written (``audit_unavailable``); what ends
    the sentence (what is refused meanwhile). SQLite: a full disk is the likely cause,
    RESOURCE_EXHAUSTED. JetStream: the cluster cannot take the write now (a stream
    electing its leader, or no quorum), UNAVAILABLE, retry; a full stream (StoreFull)
    stays RESOURCE_EXHAUSTED."""
    if backend == "jetstream" and not isinstance(exc, StoreFull):
        return Unavailable(
            "audit_unavailable",
            "the cluster cannot record audit entries right now (a leader election or no "
            f"quorum among the NATS servers); {what}",
        )
    return Exhausted(
        "audit_unavailable",
        f"the audit log cannot be written (the broker's disk is full?); {what}",
    )


def acceptance_records(stored: Sequence[StoredMessage]) -> list[str]:
    """The publish.accepted records of messages just stored (MessageStore.append's
    records: pure, run in the store's writer)."""
    return [encode(acceptance_item(m)) for m in stored]
