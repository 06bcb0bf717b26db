"""Live Subscribe streams: each stream's state, and the live feed that hands it messages
publish just stored.

The store is the source of truth for deliveries: a subscription is woken when something
changes and pulls what is pending for it, so a slow or absent subscriber costs store
rows, not broker memory. The live feed spares a caught-up subscription that read:

- A store read that found nothing more pending sets ``live_after`` to the head offset
  of that read's snapshot. From then on publish hands each durably stored message to
  every live subscription (``hand_over``) and the delivery loop takes them from the feed
  (``take_live``) instead of reading them back from the store.
- A fed message at or below ``live_after``, or already in flight, was seen by the store
  read (delivered, excluded or settled there) and is dropped from the feed, never sent
  twice.
- The feed is bounded (``FEED_MAX_MESSAGES``, ``FEED_MAX_BYTES``). When a hand-over would
  take it past either bound, the feed is emptied and marked overflowed; the next turn
  of the delivery loop reads the store again, FLASH first, so a stalled subscriber costs
  store rows, not broker memory.
- Before every store read the feed is reset (``reset_feed``): that read sees everything
  fed so far.
- Acknowledgements settled while a store read was running are kept in
  ``acked_during_read``: the read may predate them, so they are not delivered from it.

Recorded before released, with the publish's one commit:

- A message enters a feed only after the store commit that holds it and its
  ``publish.accepted`` record.
- For each stream caught up when a publish starts (``live_after`` set, no overflow),
  publish decides the stream's routing of the request's messages before the commit
  (``pre_route``: the delivery loop's own checks, own message, subscribed topic,
  ``decide()`` under the partner's policy object, a key wrapped for it) and writes
  those delivery-decision records in that same commit (``routed_records``); the
  messages enter the feed with their ``Decided``.
- The delivery loop sends such a message without another commit only while the
  partner's policy object is the one it was decided under. After a policy change or a
  suspension it decides the message again and records that decision before sending.
- A reset (store read) or an overflow drops the feed with its decisions: those
  messages are read from the store, decided again and recorded normally. So every
  delivery sent has a durable decision record; a message decided at publish and sent
  after such a re-decision has two (as a message redelivered on a new stream does).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from broker.audit import AuditItem
from broker.audit.items import encode
from broker.audit_keeping import acceptance_records
from broker.config import BrokerConfig
from broker.errors import BrokerError, Forbidden, InvalidInput, Precondition
from broker.exchange.memo import Memo
from broker.registry import PartnerRecord
from broker.store import StoredMessage
from coalition.labels import Label
from coalition.policy import PartnerPolicy, PartnerStatus
from coalition.topics import PatternSet, TopicError
from coalition.v1 import envelope_pb2

FEED_MAX_MESSAGES = 1024
FEED_MAX_BYTES = 8 << 20
TOPIC_MEMO_SIZE = 1024

# A routing decision: the header to deliver under (None: not delivered), reason, why.
Route = tuple[envelope_pb2.Header | None, str, str]


class GatewayRoute(Protocol):
    """What makes a subscription a federation link's (broker.federation.egress): which
    senders it forwards (this nation's own) and which recipients are the peer's."""

    def takes(self, sender: str) -> bool: ...
    def reaches(self, recipient: str) -> bool: ...


@dataclass(frozen=True)
class Decided:
    """How publish routed a message to a caught-up stream, recorded in the message's own
    commit, and the partner's policy object it was decided under."""

    policy: PartnerPolicy
    header: envelope_pb2.Header | None
    reason: str
    why: str


@dataclass(eq=False)
class Subscription:
    """One live Subscribe stream (see the module docstring for its live feed)."""

    partner: str
    patterns: tuple[str, ...]
    window: int
    # The patterns as a subject tree, built once: matching a topic costs its tokens,
    # not the number of patterns.
    tree: PatternSet
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: set[int] = field(default_factory=set)
    acked_during_read: set[int] = field(default_factory=set)
    closed: BrokerError | None = None
    # The client half-closed: acknowledgements are settled, the stream ends with OK.
    finished: bool = False
    # Acknowledged but not yet settled in the store; one flusher task settles them in
    # batches, so a stream of acks costs one group-committed write per batch, not per ack.
    unsettled: set[int] = field(default_factory=set)
    flusher: asyncio.Task[None] | None = None
    live_after: int | None = None
    feed: list[StoredMessage] = field(default_factory=list)
    feed_bytes: int = 0
    feed_overflow: bool = False
    # Routing decided and recorded by publish for fed messages, by offset.
    decided: dict[int, Decided] = field(default_factory=dict)
    topic_ok: Memo[str, bool] = field(default_factory=lambda: Memo(TOPIC_MEMO_SIZE))
    # Expiry notices (see broker.retention): sent, not yet acknowledged; and the
    # partner's notice generation last read (a new one means more to read).
    notices_inflight: set[int] = field(default_factory=set)
    notice_gen: int = -1
    # Set for a federation link's subscription: routed on its peer's recipients.
    gateway: GatewayRoute | None = None

    def wants(self, topic: str) -> bool:
        """Whether the stream's patterns match topic (memoized: topics repeat)."""
        hit = self.topic_ok.get(topic)
        if hit is None:
            hit = self.tree.matches(topic)
            self.topic_ok.put(topic, hit)
        return hit

    def hand_over(
        self,
        fresh: Sequence[StoredMessage],
        size: int,
        decided: Mapping[int, Decided] | None = None,
    ) -> None:
        """Queue newly stored messages (size bytes of envelopes) for this subscription,
        with the routing publish decided and recorded for them, by offset."""
        if self.feed_overflow:
            return
        if (
            len(self.feed) + len(fresh) > FEED_MAX_MESSAGES
            or self.feed_bytes + size > FEED_MAX_BYTES
        ):
            self.feed.clear()
            self.decided.clear()
            self.feed_bytes = 0
            self.feed_overflow = True
            return
        self.feed.extend(fresh)
        self.feed_bytes += size
        if decided:
            self.decided.update(decided)

    def take_live(self, room: int) -> list[StoredMessage]:
        """Up to room fed messages that the last store read did not see, oldest first."""
        assert self.live_after is not None
        after, inflight = self.live_after, self.inflight
        out: list[StoredMessage] = []
        keep: list[StoredMessage] = []
        for m in self.feed:
            if m.offset <= after or m.offset in inflight:
                self.decided.pop(m.offset, None)
                continue  # the store read saw it (delivered, excluded or settled there)
            (out if len(out) < room else keep).append(m)
        self.feed = keep
        self.feed_bytes = sum(len(m.envelope) for m in keep)
        return out

    def reset_feed(self) -> None:
        """Before a store read: the read will see everything fed so far."""
        self.live_after = None
        self.feed.clear()
        self.decided.clear()
        self.feed_bytes = 0
        self.feed_overflow = False


class LiveStreams:
    """Every partner's live subscription (at most one each: a new one supersedes the old),
    and the partners' expiry-notice generations."""

    def __init__(self, cfg: BrokerConfig, record: Callable[[str], PartnerRecord]) -> None:
        self.cfg = cfg
        self._record = record
        self.by_partner: dict[str, set[Subscription]] = defaultdict(set)
        # Partners with audited expiry notices to read (broker.retention), by generation.
        self.notice_gen: dict[str, int] = {}

    def open(self, partner: str, topics: Sequence[str], window: int) -> Subscription:
        """Register a live stream for partner, superseding its previous one.

        Raises InvalidInput (no_topics, too_many_patterns, bad_topic) for a bad open,
        NotAuthenticated for an unknown partner, Forbidden (suspended,
        topic_not_permitted) for one policy does not allow.
        """
        if not topics:
            raise InvalidInput("no_topics", "subscribe needs at least one topic pattern")
        _check_pattern_limits(topics, self.cfg)
        try:
            tree = PatternSet(topics)
        except TopicError as exc:
            raise InvalidInput("bad_topic", str(exc)) from exc
        patterns = tuple(topics)
        rec = self._record(partner)
        if rec.policy.status is PartnerStatus.SUSPENDED:
            raise Forbidden("suspended", f"partner {partner} is suspended")
        allowed = rec.policy.subscribe_topics
        if rec.policy.status is PartnerStatus.ACTIVE:
            permitted = PatternSet(allowed)  # built once: each check walks the tree
            for p in patterns:
                if not permitted.covers(p):
                    raise Forbidden(
                        "topic_not_permitted",
                        f"{partner} may not subscribe to {p!r} (permitted: "
                        f"{', '.join(allowed) or 'none'})",
                    )
        win = min(max(window or self.cfg.subscriber_window, 1), self.cfg.subscriber_window)
        sub = Subscription(partner, patterns, win, tree)
        for old in self.by_partner[partner]:
            old.closed = Precondition("superseded", "a newer subscription replaced this one")
            old.wake.set()
        self.by_partner[partner] = {sub}
        return sub

    def close(self, sub: Subscription) -> None:
        """Forget sub (its stream ended)."""
        subs = self.by_partner.get(sub.partner)
        if subs is not None:
            subs.discard(sub)

    def hand_over(
        self,
        fresh: Sequence[StoredMessage],
        routes: Mapping[Subscription, Mapping[str, Decided]] | None = None,
    ) -> None:
        """Feed messages publish just stored durably to every live subscription, with
        the routing pre_route decided for a stream (by message id), if any."""
        size = sum(len(m.envelope) for m in fresh)
        for subs in self.by_partner.values():
            for s in subs:
                ahead = routes.get(s) if routes else None
                decided = {m.offset: ahead[m.message_id] for m in fresh} if ahead else None
                s.hand_over(fresh, size, decided)

    def pre_route(
        self,
        sender: str,
        messages: Sequence[tuple[str, envelope_pb2.Header, Label]],
        now: int,
        route: Callable[[Subscription, PartnerPolicy, envelope_pb2.Header, Label, int], Route],
    ) -> dict[Subscription, dict[str, Decided]]:
        """Each caught-up stream's routing of (message id, header, label) published by
        sender, decided now by route (the delivery loop's checks), by stream and id.

        route decides on the header's topic, the label and whether a key is wrapped for
        the stream's partner (for a federation link's stream: for a partner of its peer
        nation), and returns the header it was given or None: so it runs once per stream
        and (topic, label, key wrapped), the messages of a request mostly sharing them,
        and each message gets that decision under its own header."""
        out: dict[Subscription, dict[str, Decided]] = {}
        recipients: list[frozenset[str]] | None = None
        for subs in self.by_partner.values():
            for s in subs:
                if s.live_after is None or s.feed_overflow or s.closed is not None:
                    continue
                try:
                    policy = self._record(s.partner).policy
                except BrokerError:
                    continue
                if policy.status is PartnerStatus.SUSPENDED:
                    continue
                if sender == s.partner:
                    own = Decided(policy, None, "own_message", "")
                    out[s] = {mid: own for mid, _, _ in messages}
                    continue
                if recipients is None:  # once per request, for every stream
                    recipients = [
                        frozenset(w.recipient for w in h.wrapped_keys) for _, h, _ in messages
                    ]
                decided: dict[tuple[str, int, bool], Route] = {}
                mine: dict[str, Decided] = {}
                gw = s.gateway
                for (mid, header, label), keyed in zip(messages, recipients, strict=True):
                    wrapped = s.partner in keyed if gw is None else any(map(gw.reaches, keyed))
                    key = (header.topic, id(label), wrapped)
                    hit = decided.get(key)
                    if hit is None:
                        hit = decided[key] = route(s, policy, header, label, now)
                    mine[mid] = Decided(policy, None if hit[0] is None else header, *hit[1:])
                out[s] = mine
        return out

    def wake_all(self) -> None:
        for subs in self.by_partner.values():
            for s in subs:
                s.wake.set()

    def policy_changed(self, partner: str, rec: PartnerRecord | None) -> None:
        """Apply a policy change to partner's streams at once (suspension closes them)."""
        for s in self.by_partner.get(partner, set()):
            if rec is not None and rec.policy.status is PartnerStatus.SUSPENDED:
                s.closed = Forbidden("suspended", f"partner {partner} has been suspended")
            s.wake.set()

    def notices_ready(self, partners: Iterable[str]) -> None:
        """These partners have new audited expiry notices: their streams send them now."""
        for p in partners:
            self.notice_gen[p] = self.notice_gen.get(p, 0) + 1
            for s in self.by_partner.get(p, ()):
                s.wake.set()


def _check_pattern_limits(topics: Sequence[str], cfg: BrokerConfig) -> None:
    """Refuse an open with more patterns, or more pattern bytes, than the limits allow.

    Checked before any pattern is parsed, so an oversized open costs one pass over it.
    """
    if len(topics) > cfg.max_subscribe_patterns:
        raise InvalidInput(
            "too_many_patterns",
            f"the subscription has {len(topics)} topic patterns; at most "
            f"{cfg.max_subscribe_patterns} are allowed per subscription",
        )
    size = sum(len(t.encode()) for t in topics)
    if size > cfg.max_subscribe_pattern_bytes:
        raise InvalidInput(
            "too_many_patterns",
            f"the subscription's topic patterns take {size} bytes; at most "
            f"{cfg.max_subscribe_pattern_bytes} are allowed per subscription",
        )


def batch_audit(
    kind: str,
    partner: str,
    decision: str,
    msgs: Sequence[StoredMessage],
    extra: dict[str, object],
) -> AuditItem:
    """One audit entry for the same decision on several messages of one batch.

    message_id is set when the batch holds one message; detail always lists them all.
    """
    detail: dict[str, object] = {
        "offsets": [m.offset for m in msgs],
        "message_ids": [m.message_id for m in msgs],
        **extra,
    }
    mid = msgs[0].message_id if len(msgs) == 1 else ""
    return AuditItem(kind, "broker", partner, mid, decision, detail)


def decision_items(
    partner: str,
    sent: Sequence[StoredMessage],
    denied: Mapping[str, Sequence[tuple[StoredMessage, str]]],
) -> list[AuditItem]:
    """A delivery batch's decision records: one ``deliver`` entry for what is sent, one
    ``deliver.denied`` entry per reason for what is not."""
    out = []
    if sent:
        topics: dict[str, object] = {"topics": sorted({m.topic for m in sent})}
        out.append(batch_audit("deliver", partner, "allow", sent, topics))
    for reason, items in denied.items():
        batch = [m for m, _ in items]
        out.append(batch_audit("deliver.denied", partner, reason, batch, {"why": items[0][1]}))
    return out


def routed_records(
    routes: Mapping[Subscription, Mapping[str, Decided]], stored: Sequence[StoredMessage]
) -> list[str]:
    """The records of a publish's commit (MessageStore.append's records; pure, run in the
    store's writer): the acceptances, then each caught-up stream's decisions on them."""
    out = acceptance_records(stored)
    for sub, decided in routes.items():
        sent: list[StoredMessage] = []
        denied: dict[str, list[tuple[StoredMessage, str]]] = defaultdict(list)
        for m in stored:
            d = decided[m.message_id]
            if d.header is not None:
                sent.append(m)
            elif d.reason != "own_message":
                denied[d.reason].append((m, d.why))
        out += [encode(i) for i in decision_items(sub.partner, sent, denied)]
    return out
