"""The outbox drainer: moves audit records from their outboxes into the audit log's chain.

A decision's audit record is written in the same commit as the decision, into an outbox
(the message store's, the registry's); see MessageStore. The drainer takes each source's
rows in id order and appends them to the hash chain in large batches, one audit
transaction per batch (AuditLog.append_outbox: each entry keeps its row's time, at most
one checkpoint is signed per batch). That transaction also moves the source's drained
mark (the highest id in the chain) in the audit database; only after it commits does the
source forget the rows. So a crash at any point appends each record exactly once:

- before the audit commit: the rows are still in the outbox, above the mark; drained
  at the next start;
- after the audit commit, before the outbox forgot them: the rows are at or below the
  mark; start() deletes them unread (and append_outbox would skip them anyway).

What remains for recovery is only that: start() forgets what the mark covers and drains
the rest before the broker serves. The drainer runs in the background (woken by
notify() after each commit that wrote records, at most once per ``interval_ms`` so
records batch up under load) and on demand (drain(): before every audit read, at
shutdown, when the audit log is probed after a failure). When the audit log cannot take
them (a full disk), reads show them beside the chain (undrained): recorded, not chained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from broker.audit.backend import AuditBackend
from broker.audit.items import AuditItem, OutboxEntry, decode, item_entry, outbox_entry
from broker.store.base import OutboxRow
from broker.tasks import stop_task

log = logging.getLogger("coalition.broker.audit")

BATCH = 4096  # outbox rows per audit transaction


class OutboxSource(Protocol):
    """Where audit records wait for the drainer (the message store, the registry)."""

    async def read_outbox(self, after: int, limit: int) -> list[OutboxRow]:
        """Up to limit rows with id above after, in id order."""
        ...

    async def forget_outbox(self, through: int) -> None:
        """The audit log holds every row with id at or below through: delete them."""
        ...


class Drainer:
    """Drains named outbox sources into one audit log; see the module docstring."""

    def __init__(
        self,
        audit: AuditBackend,
        *,
        interval_ms: int = 200,
        on_failure: Callable[[Exception], None] | None = None,
    ) -> None:
        self.audit = audit
        self.interval_ms = interval_ms
        self._on_failure = on_failure
        self._sources: dict[str, OutboxSource] = {}
        self._through: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.drained = 0  # rows appended to the chain since start (for tests and metrics)
        self.batches = 0  # audit transactions that appended rows

    def add_source(self, name: str, source: OutboxSource) -> None:
        """Drain source under name (its drained mark in the audit log is kept per name)."""
        self._sources[name] = source

    async def start(self) -> int:
        """Before serving: forget what each source's mark covers, drain the rest, then
        drain in the background. Returns how many rows were drained; raises AuditError
        (the background drainer starts all the same and retries when notified)."""
        try:
            for name, source in self._sources.items():
                mark = await self.audit.drained_through(name)
                self._through[name] = mark
                await source.forget_outbox(mark)
            return await self.drain()
        finally:
            if self._task is None:
                self._task = asyncio.create_task(self._run(), name="audit-drainer")

    async def undrained(self, limit: int = 10_000) -> list[tuple[int, AuditItem]]:
        """What the outboxes hold beyond the chain, oldest first per source, as (time,
        entry): what a read shows when the log cannot take it (read-through)."""
        out: list[tuple[int, AuditItem]] = []
        for name, source in self._sources.items():
            for row in await source.read_outbox(self._through.get(name, 0), limit):
                with contextlib.suppress(ValueError):
                    out.append((row.time_ms, decode(row.record)))
        return out

    def notify(self) -> None:
        """Records were committed to an outbox: drain them soon."""
        self._wake.set()

    async def drain(self) -> int:
        """Append every row now in the outboxes to the chain; return how many.

        Raises AuditError if the audit log cannot take them (they stay in their outbox),
        StoreError if an outbox cannot be read.
        """
        async with self._lock:
            total = 0
            for name, source in self._sources.items():
                while True:
                    after = self._through.get(name, 0)
                    rows = await source.read_outbox(after, BATCH)
                    if not rows:
                        break
                    mark = await self.audit.append_outbox(name, _entries(name, rows))
                    self._through[name] = max(after, mark)
                    total += len(rows)
                    self.batches += 1
                    try:
                        await source.forget_outbox(mark)
                    except Exception as exc:  # kept and skipped; forgotten at the next start
                        log.warning("could not forget drained audit records: %s", exc)
                    if len(rows) < BATCH:
                        break
            self.drained += total
            return total

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            started = loop.time()
            try:
                await self.drain()
            except RuntimeError:  # closed underneath
                return
            except Exception as exc:
                log.critical("audit records not drained yet (kept in their outbox): %s", exc)
                if self._on_failure is not None:
                    self._on_failure(exc)
                await asyncio.sleep(1)  # the next notify() or drain() retries
                continue
            # At most one drain per interval: what arrives meanwhile is one batch.
            await asyncio.sleep(max(self.interval_ms / 1000 - (loop.time() - started), 0))

    async def close(self) -> None:
        """Stop the background drainer and drain what is left (failures are logged: the
        records stay in their outbox and are drained at the next start)."""
        if self._task is not None:
            await stop_task(self._task)
            self._task = None
        try:
            await self.drain()
        except Exception as exc:
            log.critical("audit records left in their outbox at shutdown: %s", exc)


def _entries(source: str, rows: Sequence[OutboxRow]) -> list[OutboxEntry]:
    """The chain entries of outbox rows, each at its row's time. A row that does not
    decode (the outbox was altered) becomes an ``audit.unreadable`` entry naming it."""
    out = []
    for row in rows:
        try:
            out.append(outbox_entry(row.id, row.time_ms, row.record))
        except ValueError as exc:
            log.error("outbox row %s:%d does not decode: %s", source, row.id, exc)
            detail = {"source": source, "id": row.id}
            item = AuditItem("audit.unreadable", "broker", "", "", "deny", detail)
            out.append(item_entry(item, row.id, row.time_ms))
    return out
