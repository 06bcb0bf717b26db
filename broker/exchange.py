"""The Exchange core: the publish pipeline, live subscriptions and routing.

Servicers translate protobuf to calls on this class; this class holds no gRPC code.
The store is the source of truth for deliveries: a subscription is woken when
something changes and pulls what is pending for it, so a slow or absent
subscriber costs store rows, not broker memory.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.audit import AuditError, AuditItem, AuditLog
from broker.audit.items import encode
from broker.audit_keeping import AuditKeeping, acceptance_records
from broker.config import BrokerConfig
from broker.directory import PartnerDirectory
from broker.directory import SigningCertNotValid as SigningCertNotValid
from broker.errors import (
    AlreadyExists,
    BrokerError,
    Exhausted,
    Forbidden,
    InvalidInput,
    NotAuthenticated,
    Precondition,
    Unavailable,
    status_name,
)
from broker.registry import PartnerRecord, Registry
from broker.store import (
    Appended,
    MessageStore,
    NewMessage,
    Rejected,
    StoredMessage,
    StoreError,
    StoreFull,
)
from broker.store.base import Notice
from coalition import envelope as env
from coalition.checks import HeaderProblem, check_header
from coalition.clock import wall_clock_ms
from coalition.labels import Label, LabelError, label_from_proto
from coalition.policy import (
    Decision,
    PartnerPolicy,
    PartnerStatus,
    Reason,
    decide,
    decide_origination,
)
from coalition.topics import PatternSet, TopicError
from coalition.v1 import directory_pb2, envelope_pb2, exchange_pb2, label_pb2

log = logging.getLogger("coalition.broker")

Clock = Callable[[], int]
_PARSE_CACHE_SIZE = 1024
# A caught-up subscription's live feed holds at most this much; beyond it the feed is
# dropped and the subscription reads from the store again (FLASH first), so a stalled
# subscriber costs store rows, not broker memory.
_FEED_MAX_MESSAGES = 1024
_FEED_MAX_BYTES = 8 << 20
_LABEL_CACHE_SIZE = 1024
# A publish request of at most this many envelopes and bytes is verified on the event
# loop when the verify thread is idle (see ExchangeCore._verify_in_order); the byte bound
# keeps digesting large payloads (~0.5 ms per 256 KiB here) off the loop.
INLINE_VERIFY_MAX = 8
INLINE_VERIFY_MAX_BYTES = 256 * 1024
_DECISION_CACHE_SIZE = 4096
_NOTICE_PAGE = 512  # expiry notices per SubscribeResponse


@dataclass
class Counters:
    published: int = 0
    delivered: int = 0
    refused: int = 0


@dataclass(eq=False)
class Subscription:
    """One live Subscribe stream, and its live feed.

    The live feed's invariants (one place; live_after, hand_over, take_live, decided):

    - A message enters the feed only after the store commit that holds it and its
      ``publish.accepted`` record (recorded before released).
    - For a stream caught up when a publish starts, publish decides the routing of the
      request's messages before its commit, with the same checks as ``_route`` (own
      message, subscribed topic, ``decide()`` under the partner's policy object, a key
      wrapped for it), and writes those delivery-decision records in that same commit;
      the messages then enter the feed with their ``Decided``. The stream sends such a
      message without another commit only if the partner's policy object is still the
      one it was decided under; otherwise (policy change, suspension) it decides again
      and records normally before sending.
    - A reset (a store read) or an overflow drops the feed and its decisions: those
      messages are read from the store, decided again and recorded normally. So every
      delivery sent has a durable decision record; one decided at publish and sent
      after such a re-decision has two (as a message redelivered on a new stream does).
    - Nothing fed is lost: an overflowing feed sends the stream back to the store,
      FLASH first, and the store is the source of truth for what is pending.
    """

    partner: str
    patterns: tuple[str, ...]
    window: int
    # The patterns as a subject tree, built once: matching a topic costs its tokens,
    # not the number of patterns.
    tree: PatternSet
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: set[int] = field(default_factory=set)
    # Offsets acknowledged while deliveries() was reading the store: that read may predate
    # the acknowledgement, so these must not be delivered again from it.
    acked_during_read: set[int] = field(default_factory=set)
    closed: BrokerError | None = None
    # The client half-closed: acknowledgements are settled, the stream ends with OK.
    finished: bool = False
    # Acknowledged but not yet settled in the store; one flusher task settles them in
    # batches, so a stream of acks costs one group-committed write per batch, not per ack.
    unsettled: set[int] = field(default_factory=set)
    flusher: asyncio.Task[None] | None = None
    # Live delivery. Set when a store read found nothing more pending: the head offset
    # of that read's snapshot. From then on, messages above it arrive through `feed`,
    # handed over by publish once durable, instead of being read back from the store.
    live_after: int | None = None
    feed: list[StoredMessage] = field(default_factory=list)
    feed_bytes: int = 0
    # The feed outgrew its bound and was dropped: the next turn reads the store.
    feed_overflow: bool = False
    # Routing decided and recorded by publish for fed messages (see the invariants).
    decided: dict[int, Decided] = field(default_factory=dict)
    topic_ok: dict[str, bool] = field(default_factory=dict)
    # Expiry notices (see broker.retention): sent, not yet acknowledged; and the
    # partner's notice generation last read (a new one means more to read).
    notices_inflight: set[int] = field(default_factory=set)
    notice_gen: int = -1

    def wants(self, topic: str) -> bool:
        """Whether the stream's patterns match topic (memoized: topics repeat)."""
        hit = self.topic_ok.get(topic)
        if hit is None:
            hit = self.tree.matches(topic)
            if len(self.topic_ok) >= 1024:
                self.topic_ok.clear()
            self.topic_ok[topic] = hit
        return hit

    def hand_over(
        self,
        fresh: Sequence[StoredMessage],
        size: int,
        decided: Mapping[int, Decided] | None = None,
    ) -> None:
        """Queue newly stored messages for this subscription (publish calls this), with
        the routing publish decided and recorded for them, by offset."""
        if self.feed_overflow:
            return
        if (
            len(self.feed) + len(fresh) > _FEED_MAX_MESSAGES
            or self.feed_bytes + size > _FEED_MAX_BYTES
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


@dataclass(frozen=True)
class Decided:
    """How publish routed a message to a caught-up stream, recorded in the message's own
    commit: the header to deliver it under (None: not delivered, for reason and why),
    and the partner's policy object it was decided under."""

    policy: PartnerPolicy
    header: envelope_pb2.Header | None
    reason: str
    why: str


class TokenBucket:
    """Per-partner publish rate limit: every envelope the broker works on takes a token,
    accepted or refused (a refusal costs a signature check and an audit entry too).

    A refused envelope is charged after the fact (charge()), which may leave the bucket
    in debt by at most one request's envelopes; while it holds less than one token,
    whole requests are refused before any work (empty()).
    """

    def __init__(self, rate: int, now_ms: int) -> None:
        self.rate = max(rate, 1)
        self.tokens = float(self.rate)
        self.at = now_ms

    def _refill(self, now_ms: int, rate: int) -> None:
        self.rate = max(rate, 1)
        elapsed = max(now_ms - self.at, 0)
        self.tokens = min(float(self.rate), self.tokens + elapsed * self.rate / 1000)
        self.at = max(self.at, now_ms)

    def take(self, now_ms: int, rate: int) -> bool:
        """Take one token if there is one."""
        self._refill(now_ms, rate)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def charge(self, n: int = 1) -> None:
        """Take n tokens for work already done (refused envelopes), into debt if need be."""
        self.tokens -= n

    def empty(self, now_ms: int, rate: int) -> bool:
        """Whether not even one token is left (refilled up to now_ms first)."""
        self._refill(now_ms, rate)
        return self.tokens < 1


class ExchangeCore:
    """Authorize, store and route envelopes; serve the directory."""

    def __init__(
        self,
        cfg: BrokerConfig,
        store: MessageStore,
        audit: AuditLog,
        registry: Registry,
        ca_cert: x509.Certificate,
        clock: Clock = wall_clock_ms,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.audit = audit
        self.registry = registry
        self.ca_cert = ca_cert
        self.clock = clock
        self.live: dict[str, set[Subscription]] = defaultdict(set)
        self.counters: dict[str, Counters] = defaultdict(Counters)
        self._buckets: dict[str, TokenBucket] = {}
        self.closing = False
        self._verifier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")
        self._verifying = 0  # requests handed to the verify thread, not yet resumed
        self._label_cache: dict[bytes, Label] = {}
        self._decisions: dict[
            tuple[object, int, int, str], tuple[PartnerPolicy, Label, Decision]
        ] = {}
        self.books = AuditKeeping(cfg, store, audit, registry, clock)
        self.keys = PartnerDirectory(
            cfg,
            registry,
            ca_cert,
            clock,
            label=self._label,
            decided=self._decided,
            on_change=self.books.registry_changed,
        )
        self._parse_cache: OrderedDict[int, tuple[envelope_pb2.Header, Label]] = OrderedDict()
        # Partners with audited expiry notices to read (broker.retention), by generation.
        self.notice_gen: dict[str, int] = {}
        self._notice_drops: set[asyncio.Task[int]] = set()

    # -- identity helpers (see broker.directory) ---------------------------------------------
    def signer(self, sender: str, key_id: str) -> Ed25519PublicKey:
        """The certified signing key of sender, valid now (PartnerDirectory.signer)."""
        return self.keys.signer(sender, key_id)

    async def publish(
        self, partner: str, envelopes: Sequence[envelope_pb2.Envelope]
    ) -> list[exchange_pb2.PublishResult]:
        """Run each envelope through the pipeline; results in order, durable when returned."""
        if self.closing:
            raise Unavailable("shutting_down", "the broker is shutting down; retry shortly")
        now = self.clock()
        bucket, rate = self._bucket(partner, now)
        if bucket.empty(now, rate):
            # Over its rate, refused envelopes included: refuse the whole request before
            # any signature check or store work (its audit entries are summarised too).
            return await self._throttled(partner, envelopes, rate, now)
        if self.audit_failed:
            try:
                await self.books.probe_audit(now)
            except BrokerError:
                bucket.charge(len(envelopes))
                raise
        results: list[exchange_pb2.PublishResult | None] = [None] * len(envelopes)
        accepted: list[tuple[int, NewMessage, envelope_pb2.Header]] = []
        labels: dict[int, Label] = {}
        signed = await self._verify_in_order(partner, envelopes)
        for i, (e, checked) in enumerate(zip(envelopes, signed, strict=True)):
            if isinstance(checked, BrokerError):
                # Not raised here: its traceback would hold this frame (and the request).
                bucket.charge()  # refused work counts against the rate as well
                results[i] = self._refusal(e, checked)
                continue
            try:
                header = checked
                label, msg = self._validate(partner, e, header, now)
            except BrokerError as err:
                if err.code != "rate_limited":
                    bucket.charge()  # refused work counts against the rate as well
                results[i] = self._refusal(e, err)
                continue
            accepted.append((i, msg, header))
            labels[i] = label
        fresh: list[StoredMessage] = []
        msgs = [m for _, m, _ in accepted]
        if msgs:
            low = self.books.disk_too_full(sum(len(m.envelope) for m in msgs))
            if low is not None:
                for i, _, header in accepted:
                    results[i] = self._refusal(envelopes[i], low, header)
                accepted, msgs = [], []
        # The request's refusals so far are recorded in the store's commit with the
        # acceptances (see MessageStore: a commit carries its audit records).
        early = self._refusal_audits(partner, results, now)
        late: list[AuditItem] = []
        outcomes: list[Appended | Rejected | StoreFull] = []
        routes = self._pre_route(partner, accepted, labels, now) if msgs else {}
        if msgs or early:
            records = functools.partial(_routed_records, routes) if routes else acceptance_records
            try:
                outcomes = list(
                    await self.store.append(
                        msgs, now, records=records, also=[encode(a) for a in early]
                    )
                )
            except StoreFull as exc:
                outcomes, late = [exc for _ in msgs], early
            self.books.recorded()
        refused_late: list[exchange_pb2.PublishResult | None] = [None] * len(results)
        for (i, msg, header), out in zip(accepted, outcomes, strict=True):
            if isinstance(out, Appended):
                self._remember(out.offset, (header, labels[i]))
                fresh.append(_stored(msg, out.offset, now))
                results[i] = exchange_pb2.PublishResult(
                    message_id=msg.message_id,
                    outcome=exchange_pb2.ACCEPTED,
                    sequence=msg.sequence,
                    offset=out.offset,
                )
                self.counters[partner].published += 1
                continue
            if isinstance(out, StoreFull):
                refusal: BrokerError = Exhausted("store_full", str(out))
            elif out.reason == "quota_exceeded":
                refusal = _quota_refusal(partner, out, len(msg.envelope))
            elif out.reason == "duplicate_id":
                refusal = AlreadyExists(
                    "replay", f"message id {msg.message_id} was already published (replay refused)"
                )
            else:
                refusal = Precondition(
                    "sequence_not_increasing",
                    f"sequence {msg.sequence} is not above the last accepted sequence "
                    f"from {partner}",
                )
            results[i] = refused_late[i] = self._refusal(envelopes[i], refusal, header)
        if fresh:
            # Stored durably with their acceptance records: subscribers may have them now.
            if self.cfg.live_delivery:
                size = sum(len(m.envelope) for m in fresh)
                for subs in self.live.values():
                    for s in subs:
                        ahead = routes.get(s)
                        s.hand_over(
                            fresh,
                            size,
                            {m.offset: ahead[m.message_id] for m in fresh} if ahead else None,
                        )
            self.wake_all()
        late += self._refusal_audits(partner, refused_late, now)
        if late:  # refused by the store itself: recorded before the answer
            try:
                await self.books.record(late, now)
            except StoreError:
                self.audit_failed = True
                log.critical("audit records cannot be written; refusing publishes until they can")
        return [r for r in results if r is not None]

    def _pre_route(
        self,
        sender: str,
        accepted: Sequence[tuple[int, NewMessage, envelope_pb2.Header]],
        labels: Mapping[int, Label],
        now: int,
    ) -> dict[Subscription, dict[str, Decided]]:
        """The caught-up streams' routing of accepted messages, decided now, by stream
        and message id (see Subscription: the live feed's invariants)."""
        if not self.cfg.live_delivery:
            return {}
        out: dict[Subscription, dict[str, Decided]] = {}
        for subs in self.live.values():
            for s in subs:
                if s.live_after is None or s.feed_overflow or s.closed is not None:
                    continue
                rec = self.registry.get(s.partner)
                if rec is None or rec.policy.status is PartnerStatus.SUSPENDED:
                    continue
                out[s] = {
                    msg.message_id: Decided(
                        rec.policy,
                        *(
                            (None, "own_message", "")
                            if sender == s.partner
                            else self._route_parsed(s, rec.policy, header, labels[i], now)
                        ),
                    )
                    for i, msg, header in accepted
                }
        return out

    def _bucket(self, partner: str, now: int) -> tuple[TokenBucket, int]:
        """The partner's token bucket and its rate (policy, else the broker's default)."""
        rec = self.registry.get(partner)
        rate = (rec.policy.publish_rate_per_s if rec else 0) or self.cfg.default_publish_rate_per_s
        bucket = self._buckets.get(partner)
        if bucket is None:
            bucket = self._buckets[partner] = TokenBucket(rate, now)
        return bucket, rate

    async def _throttled(
        self, partner: str, envelopes: Sequence[envelope_pb2.Envelope], rate: int, now: int
    ) -> list[exchange_pb2.PublishResult]:
        """Refuse a whole request rate_limited, cheaply: no signature check, no store."""
        err = Exhausted(
            "rate_limited",
            f"{partner} is over its rate of {rate} messages/s (refused envelopes count too); "
            "slow down and retry",
        )
        results = [self._refusal(e, err) for e in envelopes]
        audits = self._refusal_audits(partner, results, now)
        if audits:
            try:
                await self.audit.record_many(audits, now_ms=now)
            except AuditError:
                self.audit_failed = True
                log.critical("audit log cannot be written; refusing publishes until it can")
        return results

    def _refusal_audits(
        self,
        partner: str,
        results: Sequence[exchange_pb2.PublishResult | None],
        now: int,
    ) -> list[AuditItem]:
        """The publish.refused entries to record one by one for the refused results (None:
        not decided here); the audit log counts the rest into its summaries (see
        AuditLog.admit_refusal)."""
        out: list[AuditItem] = []
        for i, r in enumerate(results):
            if r is None or r.outcome != exchange_pb2.REFUSED:
                continue
            self.counters[partner].refused += 1
            item = AuditItem(
                "publish.refused",
                partner,
                partner,
                r.message_id,
                r.reason_code,
                {"reason": r.reason, "status": r.status, "index": i},
            )
            if self.audit.admit_refusal(item, now):
                out.append(item)
                log.info(
                    "publish refused",
                    extra={"partner": partner, "reason": r.reason_code, "message_id": r.message_id},
                )
        return out

    # -- acceptance records (see broker.audit_keeping) ----------------------------------------
    @property
    def audit_failed(self) -> bool:
        """Whether the audit log could not record a decision: publishes are refused
        until it can again (AuditKeeping.audit_failed)."""
        return self.books.audit_failed

    @audit_failed.setter
    def audit_failed(self, failed: bool) -> None:
        self.books.audit_failed = failed

    async def registry_changed(self) -> None:
        """After a registry write: record its audit entry (AuditKeeping.registry_changed)."""
        await self.books.registry_changed()

    def _refusal(
        self,
        e: envelope_pb2.Envelope,
        err: BrokerError,
        header: envelope_pb2.Header | None = None,
    ) -> exchange_pb2.PublishResult:
        mid = header.message_id if header else _message_id_or_empty(e)
        return exchange_pb2.PublishResult(
            message_id=mid,
            outcome=exchange_pb2.REFUSED,
            reason_code=err.code,
            reason=err.message,
            status=status_name(err),
        )

    async def _verify_in_order(
        self, partner: str, envelopes: Sequence[envelope_pb2.Envelope]
    ) -> list[envelope_pb2.Header | BrokerError]:
        """_signed(partner, envelopes), with requests leaving this step in arrival order.

        Large requests (by count or bytes) go to the one verify thread, so the event loop
        serves other streams meanwhile; one thread, first in first out, keeps their
        order. A small request is checked right here when nothing is queued for that
        thread: handing a few signatures (~0.15 ms each here) to a thread costs more in
        wake-ups and CPU queueing than it spares the loop (at 500 msg/s, ~9 ms of a
        message's latency). "Nothing queued" counts a request until its task has resumed
        on the loop, and a publish reaches the store's queue without waiting after this
        step, so an inline check can never overtake an earlier request.
        """
        if (
            self._verifying == 0
            and len(envelopes) <= INLINE_VERIFY_MAX
            and sum(e.ByteSize() for e in envelopes) <= INLINE_VERIFY_MAX_BYTES
        ):
            return self._signed(partner, envelopes)
        self._verifying += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._verifier, self._signed, partner, envelopes
            )
        finally:
            self._verifying -= 1

    def _signed(
        self, partner: str, envelopes: Sequence[envelope_pb2.Envelope]
    ) -> list[envelope_pb2.Header | BrokerError]:
        """Size, header and signature of each envelope, in order: its header or why not.

        Runs on the verify thread or the loop (see _verify_in_order): it only reads broker
        state, and cryptography releases the GIL while it checks an Ed25519 signature.
        """
        out: list[envelope_pb2.Header | BrokerError] = []
        for e in envelopes:
            try:
                out.append(self._check_signed(partner, e))
            except BrokerError as err:
                # Without its traceback: that would hold this frame, whose `out` holds
                # the error (a cycle that keeps the request's bytes until a GC pass).
                out.append(err.with_traceback(None))
        return out

    def _check_signed(self, partner: str, e: envelope_pb2.Envelope) -> envelope_pb2.Header:
        size = e.ByteSize()
        if size > self.cfg.max_envelope_bytes:
            raise InvalidInput(
                "oversized",
                f"envelope is {size} bytes; the limit is {self.cfg.max_envelope_bytes} bytes",
            )
        rec = self.registry.get(partner)
        if rec is None:
            raise NotAuthenticated("unknown_sender", f"partner {partner} is not registered")

        def signer(sender: str, key_id: str) -> Ed25519PublicKey:
            # Called by env.verify once the header parsed, before the signature check:
            # an envelope claiming another sender is refused as such, not as a bad
            # signature. BrokerError is not KeyError, so env.verify lets it through.
            if sender != partner:
                raise Forbidden(
                    "sender_mismatch",
                    f"envelope sender {sender!r} is not the authenticated partner {partner!r}",
                )
            try:
                return self.signer(sender, key_id)
            except SigningCertNotValid as exc:
                raise NotAuthenticated(exc.code, exc.message) from None
            except KeyError:
                raise NotAuthenticated(
                    "unknown_signing_key",
                    f"signing key {key_id} is not {partner}'s certified key",
                ) from None

        try:
            header = env.verify(e, signer)
        except env.InvalidEnvelope as exc:
            if exc.reason is env.Failure.MALFORMED:
                raise InvalidInput("malformed", f"envelope is malformed: {exc}") from exc
            code = "bad_signature" if exc.reason is env.Failure.BAD_SIGNATURE else exc.reason.value
            raise NotAuthenticated(code, f"envelope does not verify: {exc}") from exc
        return header

    def _validate(
        self, partner: str, e: envelope_pb2.Envelope, header: envelope_pb2.Header, now: int
    ) -> tuple[Label, NewMessage]:
        """The checks after the signature (label, topic, policy, rate); the message to store."""
        rec = self.registry.get(partner)
        if rec is None:
            raise NotAuthenticated("unknown_sender", f"partner {partner} is not registered")
        try:  # the checks a node makes too (coalition.checks), then policy and rate
            label = check_header(
                header,
                partner,
                now_ms=now,
                clock_skew_ms=self.cfg.clock_skew_ms,
                whose_clock="the broker's",
                parse_label=self._label,
            )
        except HeaderProblem as exc:
            if exc.code == "originator_mismatch":
                raise Forbidden(exc.code, exc.message) from exc
            raise InvalidInput(exc.code, exc.message) from exc
        decision = self._decided(decide_origination, rec.policy, label, header.topic, now)
        if not decision.allowed:
            raise Forbidden(decision.reason.value, decision.explanation)
        rate = rec.policy.publish_rate_per_s or self.cfg.default_publish_rate_per_s
        bucket = self._buckets.setdefault(partner, TokenBucket(rate, now))
        if not bucket.take(now, rate):
            raise Exhausted("rate_limited", f"{partner} is over its rate of {rate} messages/s")
        raw = e.SerializeToString()
        msg = NewMessage(
            message_id=header.message_id,
            sender=partner,
            sequence=header.sequence,
            topic=header.topic,
            precedence=int(header.precedence),
            classification=int(label.classification),
            label=header.label.SerializeToString(),
            created_ms=header.created_ms,
            expiry_ms=label.expiry_time_ms,
            envelope=raw,
            digest=hashlib.sha256(raw).digest(),
        )
        return label, msg

    # -- subscribe ------------------------------------------------------------------------------
    def open_subscription(self, partner: str, topics: Sequence[str], window: int) -> Subscription:
        """Register a live stream; raises InvalidInput/Forbidden for a bad or forbidden open."""
        if self.closing:
            raise Unavailable("shutting_down", "the broker is shutting down; retry shortly")
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
        for old in self.live[partner]:
            old.closed = Precondition("superseded", "a newer subscription replaced this one")
            old.wake.set()
        self.live[partner] = {sub}
        return sub

    def close_subscription(self, sub: Subscription) -> None:
        subs = self.live.get(sub.partner)
        if subs is not None:
            subs.discard(sub)

    def note_acks(self, sub: Subscription, offsets: Sequence[int]) -> None:
        """Record acknowledgements; a flusher task settles them (batched) in the store."""
        sub.unsettled.update(o for o in offsets if o in sub.inflight)
        if sub.notices_inflight:
            self._drop_notices(sub, offsets)
        if sub.unsettled and (sub.flusher is None or sub.flusher.done()):
            sub.flusher = asyncio.create_task(self._flush_acks(sub))

    async def _flush_acks(self, sub: Subscription) -> None:
        while sub.unsettled:
            offs = sorted(sub.unsettled)
            sub.unsettled.clear()
            await self.store.settle(sub.partner, offs)
            sub.inflight.difference_update(offs)
            sub.acked_during_read.update(offs)
            sub.wake.set()

    async def acknowledge(self, sub: Subscription, offsets: Sequence[int] = ()) -> None:
        """Settle acknowledged deliveries (and any noted before) so the cursor advances."""
        self.note_acks(sub, offsets)
        if sub.flusher is not None:
            await sub.flusher

    async def deliveries(self, sub: Subscription) -> AsyncIterator[exchange_pb2.SubscribeResponse]:
        """Yield deliveries for sub as policy allows them now, backlog first by precedence."""
        caught_up_sent = False
        while True:
            sub.wake.clear()
            if sub.closed is not None:
                raise sub.closed
            if sub.finished:
                return
            if self.closing:
                raise Unavailable("shutting_down", "the broker is shutting down; reconnect later")
            rec = self._record(sub.partner)
            if rec.policy.status is PartnerStatus.SUSPENDED:
                raise Forbidden("suspended", f"partner {sub.partner} has been suspended")
            if sub.notice_gen != self.notice_gen.get(sub.partner, -1):
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
                    yield exchange_pb2.SubscribeResponse(
                        status=exchange_pb2.SubscribeStatus(caught_up=False)
                    )
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
                    yield exchange_pb2.SubscribeResponse(
                        status=exchange_pb2.SubscribeStatus(caught_up=True, backlog=0)
                    )
                await sub.wake.wait()
                continue
            now = self.clock()
            skipped: list[int] = []
            sent: list[StoredMessage] = []
            denied: dict[str, list[tuple[StoredMessage, str]]] = defaultdict(list)
            resp = exchange_pb2.SubscribeResponse()
            out = resp.batch  # filled in place: SubscribeResponse(batch=out) copies it all
            unrecorded: list[StoredMessage] = []
            for m in batch:
                ahead = sub.decided.pop(m.offset, None)
                if ahead is not None and ahead.policy is rec.policy:
                    routed, reason, why = ahead.header, ahead.reason, ahead.why
                else:  # decided again, recorded below (see the live feed's invariants)
                    ahead = None
                    routed, reason, why = self._route(sub, rec, m, now)
                if routed is None:
                    skipped.append(m.offset)
                    if reason != "own_message" and ahead is None:
                        denied[reason].append((m, why))
                    continue
                sub.inflight.add(m.offset)
                sent.append(m)
                if ahead is None:
                    unrecorded.append(m)
                # add() + copy into place: appending a built Delivery to the repeated
                # field costs ~10x more (upb copies the whole message again).
                d = out.deliveries.add(
                    offset=m.offset, topic=routed.topic, precedence=routed.precedence
                )
                d.envelope.MergeFromString(m.envelope)
                d.label.CopyFrom(routed.label)
            self.counters[sub.partner].delivered += len(sent)
            audits = _decision_items(sub.partner, unrecorded, denied)
            # Recorded before it leaves: every delivery decision is durable (in the store's
            # outbox) first.
            try:
                await self.books.record(audits, now)
            except StoreError as exc:
                raise Exhausted(
                    "audit_unavailable",
                    "the audit log cannot be written (the broker's disk is full?); "
                    "deliveries resume once it can, reconnect later",
                ) from exc
            if out.deliveries:
                yield resp
            if skipped:
                # Settled in the background with the acknowledgements; until then they
                # count as in flight, so no read delivers them meanwhile.
                sub.inflight.update(skipped)
                self.note_acks(sub, skipped)

    def notices_ready(self, partners: Iterable[str]) -> None:
        """These partners have new audited expiry notices: their streams send them now."""
        for p in partners:
            self.notice_gen[p] = self.notice_gen.get(p, 0) + 1
            for s in self.live.get(p, ()):
                s.wake.set()

    async def _expiry_notices(
        self, sub: Subscription
    ) -> AsyncIterator[exchange_pb2.SubscribeResponse]:
        """The partner's unacknowledged expiry notices not in flight, in pages."""
        gen = self.notice_gen.get(sub.partner, -1)
        after = 0
        while True:
            page = await self.store.notices(sub.partner, _NOTICE_PAGE, after=after)
            fresh = [n for n in page if n.offset not in sub.notices_inflight]
            if fresh:
                sub.notices_inflight.update(n.offset for n in fresh)
                yield exchange_pb2.SubscribeResponse(
                    expired=exchange_pb2.ExpiredBatch(expired=[_expired(n) for n in fresh])
                )
            if len(page) < _NOTICE_PAGE:
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

    def _decided(
        self,
        fn: Callable[[PartnerPolicy, Label, str, int], Decision],
        policy: PartnerPolicy,
        label: Label,
        topic: str,
        now: int,
    ) -> Decision:
        """fn(policy, label, topic, now), memoized while neither policy nor label changes.

        Policies and labels are immutable and replaced, not edited, so their identity is
        the key (each entry holds them, so an id is never reused while cached). Only label
        expiry depends on the time: labels that expire are decided afresh every time.
        """
        if label.expiry_time_ms:
            return fn(policy, label, topic, now)
        key = (fn, id(policy), id(label), topic)
        hit = self._decisions.get(key)
        if hit is not None and hit[0] is policy and hit[1] is label:
            return hit[2]
        d = fn(policy, label, topic, now)
        if len(self._decisions) >= _DECISION_CACHE_SIZE:
            self._decisions.clear()
        self._decisions[key] = (policy, label, d)
        return d

    def _label(self, msg: label_pb2.Label) -> Label:
        """label_from_proto, memoized by the label's wire bytes (labels repeat a lot).

        Raises LabelError like label_from_proto.
        """
        key = msg.SerializeToString()
        hit = self._label_cache.get(key)
        if hit is None:
            hit = label_from_proto(msg)
            if len(self._label_cache) >= _LABEL_CACHE_SIZE:
                self._label_cache.clear()
            self._label_cache[key] = hit
        return hit

    def _parsed(self, m: StoredMessage) -> tuple[envelope_pb2.Header, Label]:
        """The stored envelope's header and label, parsed once for every subscriber.

        A small LRU by offset, seeded by publish with what it already parsed. Raises
        InvalidEnvelope or LabelError if the stored bytes were tampered with.
        """
        hit = self._parse_cache.get(m.offset)
        if hit is not None:
            self._parse_cache.move_to_end(m.offset)
            return hit
        header = env.parse_header(envelope_pb2.Envelope.FromString(m.envelope))
        parsed = (header, self._label(header.label))
        self._remember(m.offset, parsed)
        return parsed

    def _remember(self, offset: int, parsed: tuple[envelope_pb2.Header, Label]) -> None:
        self._parse_cache[offset] = parsed
        if len(self._parse_cache) > _PARSE_CACHE_SIZE:
            self._parse_cache.popitem(last=False)

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
        return self._route_parsed(sub, rec.policy, header, label, now)

    def _route_parsed(
        self,
        sub: Subscription,
        policy: PartnerPolicy,
        header: envelope_pb2.Header,
        label: Label,
        now: int,
    ) -> tuple[envelope_pb2.Header | None, str, str]:
        """_route's checks after the parse (another partner's message): topic, policy,
        wrapped key. Pure: publish runs it before the commit for caught-up streams."""
        if not sub.wants(header.topic):
            return None, "not_subscribed", f"topic {header.topic} is outside this subscription"
        d = self._decided(decide, policy, label, header.topic, now)
        if d.reason is not Reason.ALLOW:
            return None, d.reason.value, d.explanation
        if not any(w.recipient == sub.partner for w in header.wrapped_keys):
            return None, "no_key_wrapped", "the sender wrapped no key for this partner"
        return header, "allow", ""

    def _record(self, partner: str) -> PartnerRecord:
        return self.keys.record(partner)

    def wake_all(self) -> None:
        for subs in self.live.values():
            for s in subs:
                s.wake.set()

    def policy_changed(self, partner: str) -> None:
        """Apply a policy change to live streams at once (suspension closes them)."""
        rec = self.registry.get(partner)
        for s in self.live.get(partner, set()):
            if rec is not None and rec.policy.status is PartnerStatus.SUSPENDED:
                s.closed = Forbidden("suspended", f"partner {partner} has been suspended")
            s.wake.set()

    # -- directory, keys, recipients (see broker.directory) -----------------------------------
    def directory(self, partner: str) -> list[directory_pb2.DirectoryEntry]:
        """What partner may see of the directory (PartnerDirectory.directory)."""
        return self.keys.directory(partner)

    def directory_entry(self, partner: str) -> directory_pb2.DirectoryEntry:
        """The operators' full view of one partner (PartnerDirectory.directory_entry)."""
        return self.keys.directory_entry(partner)

    async def register_keys(self, partner: str, signed: directory_pb2.SignedKeyBundle) -> str:
        """Verify a key bundle and make it current (PartnerDirectory.register_keys)."""
        return await self.keys.register_keys(partner, signed)

    def eligible(self, label: Label, topic: str, *, exclude: str = "") -> list[str]:
        """Partners allowed label on topic now, with keys (PartnerDirectory.eligible)."""
        return self.keys.eligible(label, topic, exclude=exclude)

    def recipients(self, partner: str, label_pb: label_pb2.Label, topic: str) -> list[str]:
        """Recipients for a label partner may originate (PartnerDirectory.recipients)."""
        return self.keys.recipients(partner, label_pb, topic)

    def partner_record(self, partner: str) -> PartnerRecord:
        """partner's record, or NotFound (PartnerDirectory.partner_record)."""
        return self.keys.partner_record(partner)

    def shutdown(self) -> None:
        """Stop taking new work and end live streams."""
        self.closing = True
        self.wake_all()

    def close(self) -> None:
        """Release the verify thread, once the server no longer calls in."""
        self._verifier.shutdown(wait=True)


def _stored(msg: NewMessage, offset: int, stored_ms: int) -> StoredMessage:
    """The message as the store now holds it (what a read of offset would return)."""
    return StoredMessage(
        offset=offset,
        stored_ms=stored_ms,
        message_id=msg.message_id,
        sender=msg.sender,
        sequence=msg.sequence,
        topic=msg.topic,
        precedence=msg.precedence,
        classification=msg.classification,
        label=msg.label,
        created_ms=msg.created_ms,
        expiry_ms=msg.expiry_ms,
        envelope=msg.envelope,
        digest=msg.digest,
    )


def _quota_refusal(partner: str, out: Rejected, size: int) -> Exhausted:
    """quota_exceeded: the sender's stored bytes, its quota, and what the envelope needs."""
    return Exhausted(
        "quota_exceeded",
        f"{partner}'s share of the message store is full: it holds {out.used} of its "
        f"{out.limit} bytes and this envelope needs {size} more; retry once its stored "
        "messages have been removed by retention",
    )


def _expired(n: Notice) -> exchange_pb2.Expired:
    return exchange_pb2.Expired(
        offset=n.offset,
        sender=n.sender,
        message_id=n.message_id,
        sequence=n.sequence,
        recipient_sequence=n.recipient_sequence,
        topic=n.topic,
        reason=n.reason,
        stored_ms=n.stored_ms,
        removed_ms=n.removed_ms,
    )


def _batch_audit(
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


def _decision_items(
    partner: str,
    sent: Sequence[StoredMessage],
    denied: Mapping[str, Sequence[tuple[StoredMessage, str]]],
) -> list[AuditItem]:
    """A delivery batch's decision records: one ``deliver`` entry for what is sent, one
    ``deliver.denied`` entry per reason for what is not."""
    out = []
    if sent:
        topics: dict[str, object] = {"topics": sorted({m.topic for m in sent})}
        out.append(_batch_audit("deliver", partner, "allow", sent, topics))
    for reason, items in denied.items():
        batch = [m for m, _ in items]
        out.append(_batch_audit("deliver.denied", partner, reason, batch, {"why": items[0][1]}))
    return out


def _routed_records(
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
        out += [encode(i) for i in _decision_items(sub.partner, sent, denied)]
    return out


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


def _message_id_or_empty(e: envelope_pb2.Envelope) -> str:
    try:
        return env.parse_header(e).message_id
    except env.InvalidEnvelope:
        return ""
