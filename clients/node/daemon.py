"""The node daemon: connect, register keys, subscribe, store then acknowledge, reconnect.

Exactly-once into the inbox rests on two facts: a delivery is acknowledged only after
its row is committed, and the inbox refuses a second row for (sender, message_id). A
broker restart or a lost acknowledgement therefore costs a redelivery, never a loss
or a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Sequence

import grpc

from clients.node.config import NodeConfig
from clients.node.hook import hook_document, run_hook
from clients.node.inbox import GAP_BEHIND_S, GAP_GRACE_S, Entry, Expired, Inbox
from clients.node.logs import log
from clients.node.receive import Handled, Outcome, handle
from clients.sdk import BrokerTlsError, ClientError, PartnerClient, Subscription, wall_clock_ms
from coalition.pki import PartnerCredentials
from coalition.v1 import exchange_pb2

BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 5.0
RATE_EVERY_S = 10.0


class Backoff:
    """Jittered exponential backoff: 0.2, 0.4, 0.8 ... capped at 5 s, each times 0.5-1.0."""

    def __init__(
        self,
        base: float = BACKOFF_BASE_S,
        cap: float = BACKOFF_CAP_S,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.base, self.cap, self.rng = base, cap, rng
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * float(2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        # Jitter keeps many nodes from reconnecting in lockstep after a broker restart.
        return delay * (0.5 + self.rng() / 2)

    def reset(self) -> None:
        self.attempt = 0


def describe(exc: ClientError, target: str, me: str) -> str:
    """One status sentence for a failed connection attempt."""
    if isinstance(exc, BrokerTlsError):
        return f"broker {target}: {exc}"
    if exc.status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return f"broker {target} unreachable ({exc.message})"
    if exc.status == grpc.StatusCode.UNAUTHENTICATED:
        return f"broker {target} does not accept {me} yet (not admitted?): {exc.message}"
    if exc.status == grpc.StatusCode.PERMISSION_DENIED:
        return f"broker {target} refused {me}: {exc.message}"
    return f"broker {target}: {exc.status.name}: {exc.message}"


class NodeDaemon:
    """Receives for one partner until ``stop`` is set."""

    def __init__(self, cfg: NodeConfig, creds: PartnerCredentials) -> None:
        self.cfg = cfg
        self.me = creds.code
        self.client = PartnerClient(creds, cfg.broker)
        self.inbox = Inbox(cfg.inbox)
        self.stop = asyncio.Event()
        self.backoff = Backoff()
        self.stored = 0
        self._handling = asyncio.Lock()
        self._behind = True  # until the stream says caught_up; holes are judged after
        self._fell_behind = False

    async def run(self) -> int:
        """Serve until stop is set; returns the exit status (0)."""
        rate = asyncio.create_task(self._report_rate())
        try:
            await self._pending_hooks()
            log.info("connecting to %s as %s", self.cfg.broker, self.me)
            while not self.stop.is_set():
                try:
                    await self._session()
                except ClientError as exc:
                    if self.stop.is_set():
                        break
                    delay = self.backoff.next()
                    log.warning(
                        "%s, retrying in %.1f s", describe(exc, self.cfg.broker, self.me), delay
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), delay)
        finally:
            rate.cancel()
            await self.client.close()
            n, q = self.inbox.counts()
            self.inbox.close()
            log.info("stopped; inbox holds %d messages, %d quarantined", n, q)
        return 0

    async def _session(self) -> None:
        key_id = await self.client.register_keys()
        await self.client.directory(refresh=True)
        sub = self.client.subscribe(
            self.cfg.topics, window=self.cfg.window, on_expired=self._expired
        )
        sub.on_status = self._status
        self._behind, self._fell_behind = True, False
        consumer = asyncio.create_task(self._consume(sub))
        watcher = asyncio.create_task(self._watch_caught_up(sub))
        judge = asyncio.create_task(self._judge_gaps())
        stopper = asyncio.create_task(self.stop.wait())
        self.inbox.note("last_connected_ms", str(wall_clock_ms()))
        self.inbox.note("broker", self.cfg.broker)
        self.backoff.reset()
        log.info(
            "connected to %s as %s (key %s); subscribed to %s",
            self.cfg.broker,
            self.me,
            key_id,
            ", ".join(self.cfg.topics),
        )
        try:
            await asyncio.wait({consumer, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if consumer.done():
                consumer.result()  # raises the stream's ClientError
                raise ClientError(grpc.StatusCode.UNAVAILABLE, "the broker ended the stream")
            log.info("stopping: finishing the current message")
            async with self._handling:
                consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError, ClientError):
                await consumer
            await sub.aclose()
        finally:
            for t in (consumer, watcher, stopper, judge):
                t.cancel()
            sub.close()

    async def _consume(self, sub: Subscription) -> None:
        async for d in sub:
            async with self._handling:
                h = await handle(
                    d,
                    me=self.me,
                    opener=self.client.open,
                    inbox=self.inbox,
                    now_ms=wall_clock_ms(),
                    hook=self.cfg.hook is not None,
                )
                # Only now, with the row committed (or quarantined), may the broker forget it.
                await sub.ack([d.offset])
                self._report(h, d.offset, sub.caught_up.is_set())
                if h.entry is not None and self.cfg.hook is not None:
                    await self._hook(h.entry, None)

    async def _expired(self, notices: Sequence[exchange_pb2.Expired]) -> None:
        """Record the broker's expiry notices (before they are acknowledged) and warn."""
        now = wall_clock_ms()
        async with self._handling:
            new = self.inbox.record_expired(
                [
                    Expired(
                        sender=n.sender[:64],
                        message_id=n.message_id[:64],
                        sequence=n.sequence,
                        recipient_sequence=n.recipient_sequence,
                        topic=n.topic[:256],
                        reason=n.reason[:64],
                        offset=n.offset,
                        stored_ms=n.stored_ms,
                        removed_ms=n.removed_ms,
                        noticed_ms=now,
                    )
                    for n in notices
                ]
            )
        for e in new:
            log.warning(e.describe())

    def _report(self, h: Handled, offset: int, live: bool) -> None:
        if h.outcome is Outcome.QUARANTINED:
            log.warning("quarantined the delivery at offset %d: %s", offset, h.detail)
        elif h.outcome is Outcome.DUPLICATE:
            log.debug("delivery at offset %d is already in the inbox", offset)
        elif h.entry is not None:
            self.stored += 1
            e = h.entry
            log.debug("stored %s from %s (%s, %s)", e.message_id, e.sender, e.precedence, e.topic)
            if h.gap == "filled":
                log.info("sequence %d from %s arrived late", e.recipient_sequence, e.sender)

    def _warn_gaps(self, opened_by_ms: int | None = None) -> None:
        for g in self.inbox.take_unreported_gaps(opened_by_ms=opened_by_ms):
            log.warning(g.describe())

    async def _status(self, caught_up: bool) -> None:
        """In stream order: caught up (again), every hole still open was not a matter of
        delivery order (a backlog comes FLASH first), so it is warned about now."""
        if not caught_up:
            log.info("fell behind: the broker is delivering a backlog again (FLASH first)")
            self._fell_behind = True
        elif self._fell_behind:
            log.info("caught up again: that backlog is delivered")
            self._fell_behind = False
        self._behind = not caught_up
        if caught_up:
            self._warn_gaps()

    async def _judge_gaps(self) -> None:
        """Warn about holes open longer than the grace period (while caught up) or than
        GAP_BEHIND_S (while a backlog is delivered)."""
        while True:
            await asyncio.sleep(1.0)
            wait_s = GAP_BEHIND_S if self._behind else GAP_GRACE_S
            self._warn_gaps(wall_clock_ms() - int(wait_s * 1000))

    async def _watch_caught_up(self, sub: Subscription) -> None:
        await sub.caught_up.wait()
        n, q = self.inbox.counts()
        log.info("caught up: backlog delivered; inbox holds %d messages, %d quarantined", n, q)

    async def _hook(self, e: Entry, payload: bytes | None) -> None:
        assert self.cfg.hook is not None
        if payload is None:
            found = [p for x, p in self.inbox.find(e.message_id) if x.sender == e.sender]
            payload = found[0] if found else b""
        doc = hook_document(e, payload, content=self.cfg.hook.content, inbox=str(self.cfg.inbox))
        result = await run_hook(self.cfg.hook, doc)
        if result != "ok":
            log.warning("hook failed for %s: %s", e.message_id, result)
        self.inbox.set_hook_status(e.sender, e.message_id, "ok" if result == "ok" else "failed")

    async def _pending_hooks(self) -> None:
        """Run the hook for messages stored before a crash but not yet handed over."""
        if self.cfg.hook is None:
            return
        for e in self.inbox.entries(pending_hook=True):
            await self._hook(e, None)

    async def _report_rate(self) -> None:
        last = 0
        while True:
            await asyncio.sleep(RATE_EVERY_S)
            if self.stored != last:
                n = self.stored - last
                last = self.stored
                log.info(
                    "stored %d new messages in the last %g s (%.1f messages/s)",
                    n,
                    RATE_EVERY_S,
                    n / RATE_EVERY_S,
                )
