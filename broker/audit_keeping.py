"""The publish path's audit duties: its records into the store's outbox, the
audit-failed state, and the disk guard.

A publish writes each stored message's ``publish.accepted`` record (and the request's
refusal records) in the store's own commit (MessageStore.append), and a delivery batch
its decision records (MessageStore.record) before it is sent; the drainer
(broker.audit.drainer, owned here) moves them into the audit log. ``audit_failed`` is
set when the drainer cannot write the audit log: publishes are then refused
(``audit_unavailable``) until the log can be written again (probe_audit), while the
outboxes keep every record. ExchangeCore (broker.exchange) holds one AuditKeeping.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from broker.audit import AuditError, AuditItem, AuditLog
from broker.audit.drainer import Drainer
from broker.audit.items import acceptance_item, encode
from broker.config import BrokerConfig
from broker.errors import Exhausted
from broker.registry import Registry
from broker.store import MessageStore, StoredMessage, StoreError

log = logging.getLogger("coalition.broker")

Clock = Callable[[], int]
# Disk a publish request takes beyond twice its envelope bytes (see disk_too_full).
_DISK_PER_REQUEST = 64 * 1024


class AuditKeeping:
    """The outbox drainer, the audit-failed state, and the publish path's disk guard."""

    def __init__(
        self,
        cfg: BrokerConfig,
        store: MessageStore,
        audit: AuditLog,
        registry: Registry,
        clock: Clock,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.audit = audit
        self.registry = registry
        self.clock = clock
        self.audit_failed = False
        self._disk_free = (0, 0)  # (checked at ms, free bytes then)
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

    def disk_too_full(self, incoming: int) -> Exhausted | None:
        """A refusal if storing incoming envelope bytes would eat into the free-space reserve.

        A request takes more disk than its bytes at first: SQLite writes them to the WAL
        and later into the database file, and every commit rewrites the B-tree and index
        pages it touches in both the store and the audit log (measured: ~54 KiB for one
        9.7 KiB envelope). So the estimate is twice the bytes plus a fixed cost per
        request; counting only the bytes let fast publishers fill the disk between two
        free-space checks, and then the audit log could not record its entries.

        The WAL files count as spent too: a checkpoint copies their pages into the
        database files (up to ~4 MiB each at once), which the free space does not show
        until it happens. Their size is an upper bound of what is still to come.
        """
        if self.cfg.min_free_bytes <= 0:
            return None
        need = 2 * incoming + _DISK_PER_REQUEST
        now = self.clock()
        at, free = self._disk_free
        # statvfs at most every 100 ms, or sooner when the margin looks thin.
        if now - at > 100 or free - need < 2 * self.cfg.min_free_bytes:
            try:
                free = shutil.disk_usage(self.cfg.data_dir).free - _wal_bytes(self.cfg.data_dir)
            except OSError:
                return None
            self._disk_free = (now, free)
        else:
            self._disk_free = (at, free - need)
        if free - need >= self.cfg.min_free_bytes:
            return None
        return Exhausted(
            "store_full",
            f"the broker's disk is nearly full ({free / 1048576:.1f} MiB free, "
            f"{self.cfg.min_free_bytes / 1048576:.1f} MiB kept in reserve); "
            "refusing new messages until space is freed",
        )

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
        except (AuditError, StoreError, Exhausted):
            self.audit_failed = True
            log.critical("audit log cannot be written; refusing publishes until it can")

    async def probe_audit(self, now: int) -> None:
        """While audit_failed: try to write the log again (an ``audit.recovered`` entry,
        then drain the outboxes); clear audit_failed if it can, else raise Exhausted
        audit_unavailable."""
        try:
            await self.audit.record(kind="audit.recovered", actor="broker", now_ms=now)
            try:
                await self.drainer.drain()
            except StoreError as exc:  # an outbox cannot be read: retried when notified
                log.error("could not read an audit outbox: %s", exc)
        except AuditError as exc:
            raise Exhausted(
                "audit_unavailable",
                "the audit log cannot be written (disk full?); publishes are refused until it can",
            ) from exc
        self.audit_failed = False
        log.warning("audit log writable again; accepting publishes")


def _wal_bytes(data_dir: Path) -> int:
    """The size of the SQLite WAL files in data_dir (not yet copied into their databases)."""
    total = 0
    for wal in Path(data_dir).glob("*.db-wal"):
        with contextlib.suppress(OSError):  # gone between listing and stat: nothing owed
            total += wal.stat().st_size
    return total


def acceptance_records(stored: Sequence[StoredMessage]) -> list[str]:
    """The publish.accepted records of messages just stored (MessageStore.append's
    records: pure, run in the store's writer)."""
    return [encode(acceptance_item(m)) for m in stored]
