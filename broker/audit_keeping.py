"""Acceptance-record bookkeeping and recovery (the disk guard is broker.exchange.disk_guard).

A publish stores its messages first and writes their ``publish.accepted`` entries after;
AuditKeeping tracks which stored offsets have their entry (the audited mark), records
what is missing after a crash or an audit failure (reconcile_audit), records registry
changes' entries from the registry's outbox, and holds ``audit_failed``: while it is set,
publishes are refused until the log can record decisions again (probe_audit).
ExchangeCore (broker.exchange) holds one AuditKeeping and delegates to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Sequence

from broker.audit import AuditError, AuditItem, AuditLog
from broker.config import BrokerConfig
from broker.errors import Exhausted
from broker.registry import Registry
from broker.store import MessageStore, StoredMessage, StoreError

log = logging.getLogger("coalition.broker")

Clock = Callable[[], int]


class AuditKeeping:
    """The audited mark over stored offsets, its recovery, and the audit-failed state."""

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
        # Acceptance bookkeeping (see reconcile_audit): offsets stored whose entries are
        # queued but not committed yet; the audited mark (every offset at or below it has
        # its entry), which the next append persists in its own transaction; offsets above
        # the mark whose entries committed (offsets are contiguous: one per stored message).
        self.accepting: set[int] = set()
        self.audited_through = 0
        self._audited_above: set[int] = set()
        self._reconciling = asyncio.Lock()
        self._registry_flush = asyncio.Lock()

    def advance_audited(self, offsets: Sequence[int]) -> None:
        """These offsets' acceptance entries are durable: move the mark over the prefix."""
        above = self._audited_above
        above.update(offsets)
        mark = self.audited_through
        while mark + 1 in above:
            mark += 1
            above.remove(mark)
        self.audited_through = mark

    async def flush_audited(self) -> None:
        """Persist the audited mark now (at shutdown, when no next append will)."""
        try:
            await self.store.mark_audited(self.audited_through)
        except (StoreError, RuntimeError) as exc:
            # Harmless: their entries are in the log, so reconcile_audit finds them there
            # at the next start and records nothing twice.
            log.warning("could not mark accepted messages audited: %s", exc)

    async def reconcile_audit(self) -> int:
        """Record ``publish.accepted`` for stored messages whose acceptance entry never
        committed, and return how many.

        A publish writes its acceptance entries after the store commit, so a crash or an
        audit failure between the two leaves a stored (and deliverable) message with no
        record of the decision. The store keeps an audited mark (every message at or
        below it has its entry; each append moves it up to what had committed by then).
        This records the missing entries above it, marked ``recovered``, once per
        message: an entry already in the log (committed just before a crash) is found
        by sender and message id among the entries written since the message was stored.
        It first records what the registry's audit outbox still holds (see
        flush_registry_audit); the count returned covers both. The broker runs it before
        serving and when the audit log is writable again. Raises AuditError if the log
        cannot record them.
        """
        recovered = await self.flush_registry_audit(recovering=True)
        async with self._reconciling:
            self.audited_through = max(self.audited_through, await self.store.audited_through())
            while True:
                batch = [
                    m
                    for m in await self.store.unaudited()
                    if m.offset > self.audited_through
                    and m.offset not in self._audited_above
                    and m.offset not in self.accepting
                ]
                if not batch:
                    return recovered
                since = min(m.stored_ms for m in batch)
                have = {
                    (e.partner, e.message_id)
                    for e in await self.audit.query(kind="publish.accepted", since_ms=since)
                }
                missing = [m for m in batch if (m.sender, m.message_id) not in have]
                if missing:
                    await self.audit.record_many(
                        [
                            acceptance_item(m, stored_ms=m.stored_ms, recovered=True)
                            for m in missing
                        ],
                        now_ms=self.clock(),
                    )
                    log.warning(
                        "recorded missing acceptance entries",
                        extra={"count": len(missing), "first_offset": missing[0].offset},
                    )
                    recovered += len(missing)
                before = self.audited_through
                self.advance_audited([m.offset for m in batch])
                await self.store.mark_audited(self.audited_through)
                if self.audited_through == before:
                    return recovered  # held below by a publish still writing its entries

    async def flush_registry_audit(self, *, recovering: bool = False) -> int:
        """Record the audit entries of committed registry changes still in its outbox
        (see Registry.pending_audit), in order, and forget them; return how many.

        Each entry's detail carries ``ref`` (``registry:<outbox id>``). recovering (at
        start and when the audit log is writable again) first looks for that ref among
        the entries of the same kind and partner since the change, so an entry that
        committed just before a crash is not written twice, and marks the others
        ``recovered`` with the change's time. Raises AuditError.
        """
        async with self._registry_flush:
            pending = await self.registry.pending_audit()
            items: list[AuditItem] = []
            for oid, item, at in pending:
                ref = f"registry:{oid}"
                if recovering and await self._has_ref(item, ref, at):
                    continue
                extra: dict[str, object] = {"ref": ref}
                if recovering:
                    extra.update(recovered=True, changed_ms=at)
                items.append(dataclasses.replace(item, detail={**(item.detail or {}), **extra}))
            await self.audit.record_many(items, now_ms=self.clock())
            await self.registry.audit_recorded([oid for oid, _, _ in pending])
            if recovering and items:
                log.warning("recorded missing registry audit entries", extra={"count": len(items)})
            return len(items)

    async def _has_ref(self, item: AuditItem, ref: str, since_ms: int) -> bool:
        for e in await self.audit.query(kind=item.kind, partner=item.partner, since_ms=since_ms):
            with contextlib.suppress(ValueError, AttributeError):
                if json.loads(e.detail_json).get("ref") == ref:
                    return True
        return False

    async def registry_changed(self) -> None:
        """After a registry write: record its audit entry now. If the audit log cannot,
        the entry stays in the registry's outbox (the change itself is durable), is
        recorded once the log is writable again, and publishes are refused until then."""
        try:
            if self.audit_failed:  # entries may be waiting: record them first, as recovered
                await self.probe_audit(self.clock())
            else:
                await self.flush_registry_audit()
        except (AuditError, Exhausted):
            self.audit_failed = True
            log.critical("audit log cannot be written; refusing publishes until it can")

    async def probe_audit(self, now: int) -> None:
        """While audit_failed: try to write the log again (an ``audit.recovered`` entry,
        then reconcile_audit); clear audit_failed if it can, else raise Exhausted
        audit_unavailable."""
        try:
            await self.audit.record(kind="audit.recovered", actor="broker", now_ms=now)
            try:
                await self.reconcile_audit()
            except StoreError as exc:  # retried at the next start; publishing may go on
                log.error("could not reconcile acceptance entries: %s", exc)
        except AuditError as exc:
            raise Exhausted(
                "audit_unavailable",
                "the audit log cannot be written (disk full?); publishes are refused until it can",
            ) from exc
        self.audit_failed = False
        log.warning("audit log writable again; accepting publishes")


def acceptance_item(m: StoredMessage, **extra: object) -> AuditItem:
    """The publish.accepted entry of a stored message (extra joins its detail)."""
    return AuditItem(
        "publish.accepted",
        m.sender,
        m.sender,
        m.message_id,
        "allow",
        {
            "offset": m.offset,
            "topic": m.topic,
            "sequence": m.sequence,
            "digest": m.digest.hex(),
            "classification": m.classification,
            **extra,
        },
    )
