"""AuditBackend: what every audit log offers the broker, whatever holds its chain (the
SQLite file of broker.audit.log, the JetStream stream of broker.jetstream.audit).

The parts that do not depend on where the chain lives are here once: the read hooks
(``before_read`` drains the outboxes first, ``read_through`` shows what could not be
drained) and the refusal summaries (see RefusalSummary). Callers type against
AuditBackend; each backend implements the abstract methods with the contract written
on them.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.audit.items import AuditItem, OutboxEntry, entry_fields
from broker.audit.pages import matches
from broker.audit.refusals import RefusalSummary
from broker.tasks import stop_task
from coalition.audit_chain import VerifyResult
from coalition.v1 import audit_pb2

__all__ = ["AuditBackend", "AuditError"]

log = logging.getLogger("coalition.broker.audit")


class AuditError(Exception):
    """The audit log could not be written or read; str() says why."""


class AuditBackend(abc.ABC):
    """An append-only hash-chained audit log (see broker.audit.log for the contract)."""

    _refusals: RefusalSummary
    _clock: Callable[[], int]

    def _init_front(self, refusals: RefusalSummary | None, clock: Callable[[], int]) -> None:
        self._refusals = refusals or RefusalSummary(0, 1)
        self._clock = clock
        self._summarizer: asyncio.Task[None] | None = None
        # Run before every read so it sees what outboxes hold (set by the broker's wiring
        # to the drainer's drain). Its failure is logged; the read goes on.
        self.before_read: Callable[[], Awaitable[object]] | None = None
        # If before_read fails: the records it could not append, as (time, entry), which
        # query() then shows after the chain's entries with seq 0 and no hash.
        self.read_through: Callable[[], Awaitable[list[tuple[int, AuditItem]]]] | None = None

    # -- what each backend implements ---------------------------------------------------
    @property
    @abc.abstractmethod
    def commits(self) -> int:
        """Write transactions committed since open (for tests and metrics)."""

    @abc.abstractmethod
    def time_commits(self, hook: Callable[[float], None] | None) -> None:
        """Call hook with each commit's duration in seconds (None: stop)."""

    @abc.abstractmethod
    async def record_many(self, items: Sequence[AuditItem], *, now_ms: int) -> list[int]:
        """Append entries in one write (one link each in the chain); their seqs."""

    @abc.abstractmethod
    async def append_outbox(self, source: str, rows: Sequence[OutboxEntry]) -> int:
        """Append outbox rows above source's drained mark and move the mark, atomically."""

    @abc.abstractmethod
    async def drained_through(self, source: str) -> int:
        """The highest outbox id of source whose entry is in the chain, 0 if none."""

    @abc.abstractmethod
    async def checkpoint(self, now_ms: int) -> audit_pb2.AuditCheckpoint:
        """Sign the current head, store and return the checkpoint."""

    @abc.abstractmethod
    async def query(
        self,
        *,
        partner: str = "",
        kind: str = "",
        since_ms: int = 0,
        until_ms: int = 0,
        limit: int = 0,
        tail: bool = False,
    ) -> list[audit_pb2.AuditEntry]:
        """Entries in seq order, filtered (see AuditLog.query)."""

    @abc.abstractmethod
    def export(self) -> AsyncIterator[audit_pb2.AuditEntry | audit_pb2.AuditCheckpoint]:
        """Every entry in seq order, each followed by the checkpoints taken at its seq."""

    @abc.abstractmethod
    async def verify(self, public_key: Ed25519PublicKey) -> VerifyResult:
        """Recompute the chain and check every checkpoint; report the first break."""

    @abc.abstractmethod
    async def count(self) -> int:
        """Number of entries in the chain."""

    @abc.abstractmethod
    async def close(self, now_ms: int | None = None) -> None:
        """Write pending summaries (stop_summaries), sign an unsigned head, release."""

    async def signer_certificates(self) -> list[bytes]:
        """DER of the audit certificates of other keys that signed checkpoints this log
        has read (empty when only this broker's key signs), for exports."""
        return []

    # -- shared ---------------------------------------------------------------------------
    async def record(
        self,
        *,
        kind: str,
        actor: str,
        partner: str = "",
        message_id: str = "",
        decision: str = "allow",
        detail: Mapping[str, object] | None = None,
        now_ms: int,
    ) -> int:
        """Append one entry, durable on return; return its seq.

        detail must be plain JSON and must never hold plaintext, keys or tokens.
        Raises ValueError for an empty kind or a detail that is not plain JSON; AuditError.
        """
        item = AuditItem(kind, actor, partner, message_id, decision, detail)
        return (await self.record_many([item], now_ms=now_ms))[0]

    async def _catch_up(self) -> bool:
        """Run before_read; False if it failed (reads answer with what the chain holds)."""
        if self.before_read is None:
            return True
        try:
            await self.before_read()
        except Exception as exc:
            log.error("audit outbox not drained before a read: %s", exc)
            return False
        return True

    async def _unchained(
        self, partner: str, kind: str, since_ms: int, until_ms: int
    ) -> list[audit_pb2.AuditEntry]:
        """read_through's records that match query()'s filters, as entries with seq 0."""
        if self.read_through is None:
            return []
        try:
            waiting = await self.read_through()
        except Exception as exc:
            log.error("audit outbox not readable: %s", exc)
            return []
        return [
            entry_fields(item, t)
            for t, item in waiting
            if matches(item, t, partner, kind, since_ms, until_ms)
        ]

    # -- refusals a partner can cause at will -------------------------------------------
    def admit_refusal(self, item: AuditItem, now_ms: int, source: str = "") -> bool:
        """Whether to record this refusal entry one by one (True), or count it into its
        interval's summary (False; written once the interval closes, or at close()).

        source is who the threshold counts against (default: the entry's partner, else
        its actor). A caller that gets True must record the item itself.
        """
        if self._refusals.admit(item, source or item.partner or item.actor, now_ms):
            return True
        if self._summarizer is None or self._summarizer.done():
            self._summarizer = asyncio.get_running_loop().create_task(self._summarize())
        return False

    async def record_refusal(self, item: AuditItem, *, now_ms: int, source: str = "") -> bool:
        """Record a refusal entry, or count it (see admit_refusal); True if written now.

        Raises AuditError (only when it writes) and ValueError like record().
        """
        if not self.admit_refusal(item, now_ms, source):
            return False
        await self.record_many([item], now_ms=now_ms)
        return True

    async def flush_refusals(self, now_ms: int, *, final: bool = False) -> int:
        """Write the summaries of intervals closed by now_ms (every pending one when final);
        how many entries. Raises AuditError, and then keeps the counts for the next try."""
        taken = self._refusals.take_due(now_ms, final=final)
        if not taken:
            return 0
        items = [self._refusals.summary(k, t) for k, t in taken]
        try:
            await self.record_many(items, now_ms=now_ms)
        except BaseException:
            self._refusals.restore(taken)
            raise
        for item in items:
            log.info(
                "refusals summarised",
                extra={
                    "kind": item.kind,
                    "partner": item.partner or item.actor,
                    "reason": item.decision,
                    "count": (item.detail or {}).get("count"),
                },
            )
        return len(items)

    async def _summarize(self) -> None:
        """Write each interval's summaries once it has closed, while any are pending."""
        while (due := self._refusals.next_due_ms()) is not None:
            await asyncio.sleep(max(due - self._clock(), 0) / 1000 + 0.05)
            try:
                await self.flush_refusals(self._clock())
            except AuditError as exc:
                log.critical("refusal summaries not written yet (kept, retried): %s", exc)
                await asyncio.sleep(1)
            except RuntimeError:  # closed
                return

    async def stop_summaries(self, now_ms: int | None) -> None:
        """At close: stop the summarizer and write every pending summary (if the log
        cannot take them, their counts are logged at CRITICAL instead)."""
        if self._summarizer is not None:
            await stop_task(self._summarizer)
        at = self._clock() if now_ms is None else now_ms
        try:
            await self.flush_refusals(at, final=True)
        except (AuditError, RuntimeError) as exc:
            lost = self._refusals.take_due(at, final=True)
            log.critical(
                "refusal summaries not written: %s (counts: %s)",
                exc,
                "; ".join(f"{k[0]} {k[1]} {k[2]}={t.count}" for k, t in lost),
            )
