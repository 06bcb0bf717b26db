"""The delivery loop: what a subscription is sent, in what order, and its acknowledgements.

Each turn reads what is pending for the subscriber (from the store, FLASH first, or from
its live feed, see broker.exchange.live), routes every message on the envelope's own
signed header under the subscriber's policy now (or takes the decision publish made and
recorded for a caught-up stream, see broker.exchange.live), records the decisions in the
store's outbox (MessageStore.record) and only then hands the batch to the stream.
Acknowledgements settle the subscriber's cursor in the store; expiry notices go out
before deliveries when there are new ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from broker.audit_keeping import AuditKeeping
from broker.audit_keeping import unavailable as audit_unavailable
from broker.config import BrokerConfig
from broker.errors import Forbidden, Unavailable
from broker.exchange.decisions import Decisions
from broker.exchange.headers import routing_header
from broker.exchange.live import LiveStreams, Route, Subscription, decision_items
from broker.exchange.memo import Memo
from broker.exchange.outcomes import (
    DeliveryBatch,
    ExpiryBatch,
    StreamItem,
    StreamStatus,
)
from broker.registry import PartnerRecord
from broker.store import MessageStore, StoredMessage, StoreError
from coalition import envelope as env
from coalition.labels import Label, LabelError
from coalition.policy import PartnerPolicy, PartnerStatus, Reason, decide
from coalition.v1 import envelope_pb2

log = logging.getLogger("coalition.broker")

PARSE_MEMO_SIZE = 1024
NOTICE_PAGE = 512  # expiry notices per ExpiryBatch

Parsed = tuple[envelope_pb2.Header, Label]


@dataclass
class Counters:
    published: int = 0
    delivered: int = 0
    refused: int = 0
    refusals: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class DeliveryLoop:
    """Deliveries, acknowledgements and expiry notices of live subscriptions."""

    def __init__(
        self,
        cfg: BrokerConfig,
        store: MessageStore,
        books: AuditKeeping,
        clock: Callable[[], int],
        live: LiveStreams,
        decisions: Decisions,
        counters: dict[str, Counters],
        record: Callable[[str], PartnerRecord],
        closing: Callable[[], bool],
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.books = books
        self.clock = clock
        self.live = live
        self.decisions = decisions
        self.counters = counters
        self._record = record
        self._closing = closing
        # Stored envelopes' headers and labels by offset, parsed once for every subscriber
        # (publish seeds it with what it already parsed).
        self._parsed_memo: Memo[int, Parsed] = Memo(PARSE_MEMO_SIZE)
        self._notice_drops: set[asyncio.Task[int]] = set()
        # Metrics hook (broker.metrics): each batch's allowed count and denials by reason.
        self.on_routed: Callable[[int, dict[str, list[tuple[StoredMessage, str]]]], None] = _ignore
        # Brokers sharing a cluster (broker.jetstream.peers): make sub the one stream
        # serving its partner before anything is read for it; raises a BrokerError.
        self.claim: Callable[[Subscription], Awaitable[None]] = _no_claim

    # -- acknowledgements ---------------------------------------------------------------------
    def note_acks(self, sub: Subscription, offsets: Sequence[int]) -> None:
        """Record acknowledgements; a flusher task settles them (batched) in the store.

        Offsets not in flight are ignored; acknowledged expiry notices are forgotten.
        """
        sub.unsettled.update(o for o in offsets if o in sub.inflight)
        if sub.notices_inflight:
            self._drop_notices(sub, offsets)
        if sub.unsettled and (sub.flusher is None or sub.flusher.done()):
            sub.flusher = asyncio.create_task(self._flush_acks(sub))

    async def _flush_acks(self, sub: Subscription) -> None:
        while sub.unsettled:
            offs = sorted(sub.unsettled)
            sub.unsettled.clear()
            try:
                await self.store.settle(sub.partner, offs)
            except Exception as exc:  # the stream ends; its unsettled offsets come again
                log.warning("acknowledgements of %s not settled: %s", sub.partner, exc)
                if sub.closed is None:
                    sub.closed = Unavailable(
                        "acks_unavailable",
                        "the broker could not record your acknowledgements (its message "
                        "store did not answer); reconnect: what they covered is delivered "
                        "again",
                    )
                sub.wake.set()
                return
            sub.inflight.difference_update(offs)
            sub.acked_during_read.update(offs)
            sub.wake.set()

    async def acknowledge(self, sub: Subscription, offsets: Sequence[int] = ()) -> None:
        """Settle acknowledged deliveries (and any noted before) so the cursor advances."""
        self.note_acks(sub, offsets)
        if sub.flusher is not None:
            await sub.flusher

    # -- the loop -------------------------------------------------------------------------------
    async def deliveries(self, sub: Subscription) -> AsyncIterator[StreamItem]:
        """Yield what sub is to be sent, as policy allows it now, backlog first by precedence.

        Yields an ExpiryBatch when there are new expiry notices, a DeliveryBatch whose
        decisions are already audited, and a StreamStatus when the subscription catches up
        (or falls behind again). Ends when the client half-closed; raises the BrokerError
        that closed the stream (superseded, suspended), Unavailable when the broker shuts
        down, and audit_unavailable when the audit log cannot be written
        (broker.audit_keeping.unavailable).
        """
        caught_up_sent = False
        await self.claim(sub)
        while True:
            sub.wake.clear()
            if sub.closed is not None:
                raise sub.closed
            if sub.finished:
                return
            if self._closing():
                raise Unavailable("shutting_down", "the broker is shutting down; reconnect later")
            rec = self._record(sub.partner)
            if rec.policy.status is PartnerStatus.SUSPENDED:
                raise Forbidden("suspended", f"partner {sub.partner} has been suspended")
            if sub.notice_gen != self.live.notice_gen.get(sub.partner, -1):
                async for notices in self._expiry_notices(sub):
                    yield notices
            room = sub.window - len(sub.inflight)
            if room <= 0:
                await sub.wake.wait()
                continue
            if sub.live_after is not None and not sub.feed_overflow:
                batch = sub.take_live(room)
            else:
                if sub.live_after is not None and caught_up_sent:
                    # Fell behind (its live feed overflowed): the store is read again,
                    # FLASH first, so say so; caught_up follows once that backlog is out.
                    caught_up_sent = False
                    yield StreamStatus(caught_up=False)
                sub.reset_feed()
                sub.acked_during_read.clear()
                try:
                    stored, head = await self.store.pending_and_head(
                        sub.partner, room, exclude=sub.inflight
                    )
                except StoreError:  # no cursor yet: not admitted
                    await sub.wake.wait()
                    continue
                batch = [
                    m
                    for m in stored
                    if m.offset not in sub.inflight and m.offset not in sub.acked_during_read
                ]
                if len(stored) < room and self.cfg.live_delivery:
                    # Nothing more is pending up to head: go live from there.
                    sub.live_after = head
            if not batch:
                if not caught_up_sent:
                    caught_up_sent = True
                    yield StreamStatus(caught_up=True, backlog=0)
                await sub.wake.wait()
                continue
            now = self.clock()
            skipped: list[int] = []
            sent: list[StoredMessage] = []
            headers: list[envelope_pb2.Header] = []
            denied: dict[str, list[tuple[StoredMessage, str]]] = defaultdict(list)
            unrecorded: list[StoredMessage] = []
            for m in batch:
                ahead = sub.decided.pop(m.offset, None)
                if ahead is not None and ahead.policy is rec.policy:
                    routed, reason, why = ahead.header, ahead.reason, ahead.why
                else:  # decided again, recorded below (see broker.exchange.live)
                    ahead = None
                    routed, reason, why = self._route(sub, rec, m, now)
                if routed is None:
                    skipped.append(m.offset)
                    if reason != "own_message" and ahead is None:
                        denied[reason].append((m, why))
                    continue
                sub.inflight.add(m.offset)
                sent.append(m)
                headers.append(routed)
                if ahead is None:
                    unrecorded.append(m)
            self.counters[sub.partner].delivered += len(sent)
            self.on_routed(len(sent), denied)
            # Recorded before it leaves: every delivery decision is durable (in the
            # store's outbox) first.
            try:
                await self.books.record(decision_items(sub.partner, unrecorded, denied), now)
            except StoreError as exc:
                raise audit_unavailable(
                    self.cfg.store_backend, exc, "deliveries resume once it can, reconnect later"
                ) from exc
            if sent:
                yield DeliveryBatch(sent, headers)
            if skipped:
                # Settled in the background with the acknowledgements; until then they
                # count as in flight, so no read delivers them meanwhile.
                sub.inflight.update(skipped)
                self.note_acks(sub, skipped)

    # -- routing --------------------------------------------------------------------------------
    def remember(self, offset: int, parsed: Parsed) -> None:
        """Seed the parse memo with a stored envelope's header and label (publish has them)."""
        self._parsed_memo.put(offset, parsed)

    def _parsed(self, m: StoredMessage) -> Parsed:
        """The stored envelope's header and label, parsed once for every subscriber.

        Raises InvalidEnvelope or LabelError if the stored bytes were tampered with.
        """
        hit = self._parsed_memo.get(m.offset)
        if hit is not None:
            return hit
        header = routing_header(envelope_pb2.Envelope.FromString(m.envelope))
        parsed = (header, self.decisions.label(header.label))
        self._parsed_memo.put(m.offset, parsed)
        return parsed

    def _route(
        self, sub: Subscription, rec: PartnerRecord, m: StoredMessage, now: int
    ) -> tuple[envelope_pb2.Header | None, str, str]:
        """The header to deliver m under, or None with the reason and why it is not."""
        if m.sender == sub.partner:
            return None, "own_message", ""
        # Route on the envelope's own header (which the recipient verifies under the
        # sender's signature), never on a separate store column that could be edited alone.
        try:
            header, label = self._parsed(m)
        except (env.InvalidEnvelope, LabelError) as exc:  # validated at publish: tampering
            return None, "malformed", str(exc)
        return self.route_parsed(sub, rec.policy, header, label, now)

    def route_parsed(
        self,
        sub: Subscription,
        policy: PartnerPolicy,
        header: envelope_pb2.Header,
        label: Label,
        now: int,
    ) -> Route:
        """_route's checks once parsed (another partner's message): topic, policy, key.
        Pure: publish runs it before its commit for caught-up streams (pre_route)."""
        gw = sub.gateway
        if gw is not None and not gw.takes(header.sender):
            return None, "forwarded", "a message from another nation is never forwarded again"
        if not sub.wants(header.topic):
            return None, "not_subscribed", f"topic {header.topic} is outside this subscription"
        d = self.decisions.decided(decide, policy, label, header.topic, now)
        if d.reason is not Reason.ALLOW:
            return None, d.reason.value, d.explanation
        if gw is not None:
            if not any(gw.reaches(w.recipient) for w in header.wrapped_keys):
                return None, "no_key_wrapped", "the sender wrapped no key for that nation"
        elif not any(w.recipient == sub.partner for w in header.wrapped_keys):
            return None, "no_key_wrapped", "the sender wrapped no key for this partner"
        return header, "allow", ""

    # -- expiry notices -------------------------------------------------------------------------
    async def _expiry_notices(self, sub: Subscription) -> AsyncIterator[ExpiryBatch]:
        """The partner's unacknowledged expiry notices not in flight, in pages."""
        gen = self.live.notice_gen.get(sub.partner, -1)
        after = 0
        while True:
            page = await self.store.notices(sub.partner, NOTICE_PAGE, after=after)
            fresh = [n for n in page if n.offset not in sub.notices_inflight]
            if fresh:
                sub.notices_inflight.update(n.offset for n in fresh)
                yield ExpiryBatch(fresh)
            if len(page) < NOTICE_PAGE:
                sub.notice_gen = gen
                return
            after = page[-1].offset

    def _drop_notices(self, sub: Subscription, offsets: Sequence[int]) -> None:
        done = [o for o in offsets if o in sub.notices_inflight]
        if not done:
            return
        sub.notices_inflight.difference_update(done)
        task = asyncio.create_task(self.store.drop_notices(sub.partner, done))
        self._notice_drops.add(task)
        task.add_done_callback(self._notice_dropped)

    def _notice_dropped(self, task: asyncio.Task[int]) -> None:
        self._notice_drops.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Kept in the store: sent again on the next subscription.
            log.warning("could not forget acknowledged expiry notices: %s", task.exception())


def _ignore(*_: object) -> None:
    pass


async def _no_claim(_: Subscription) -> None:
    pass
