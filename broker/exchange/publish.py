"""The publish pipeline: from a partner's envelopes to stored messages and their audit.

Each envelope, in order: the partner's rate bucket (a request over its rate is refused
whole, before any work), size, header and signature (v1's, or v2's inclusion path and
batch root, each root checked once: broker.exchange.signatures; verified in arrival
order, on the verify thread for large requests), the kernel's header checks (coalition.checks), the
origination policy, the rate again, then the disk guard and one store append for the
request. Every envelope gets an outcome (Accepted or Refused). The append's one commit
carries the acceptances' audit records, the refusals' (one by one up to a threshold,
then summarised by the audit log) and the caught-up streams' delivery decisions; the
stored messages are then handed to live subscriptions at once.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from broker.audit import AuditBackend, AuditError, AuditItem
from broker.audit.items import encode
from broker.audit_keeping import AuditKeeping, acceptance_records
from broker.config import BrokerConfig
from broker.errors import (
    AlreadyExists,
    BrokerError,
    Exhausted,
    Forbidden,
    InvalidInput,
    NotAuthenticated,
    Precondition,
    Unavailable,
)
from broker.exchange.decisions import Decisions
from broker.exchange.delivery import Counters, Parsed
from broker.exchange.disk_guard import DiskGuard
from broker.exchange.headers import routing_header
from broker.exchange.live import Decided, LiveStreams, Route, Subscription, routed_records
from broker.exchange.outcomes import Accepted, PublishOutcome, Refused
from broker.exchange.ratelimit import RateLimits
from broker.exchange.signatures import EnvelopeSignatures
from broker.registry import PartnerRegistry
from broker.store import (
    Appended,
    MessageStore,
    NewMessage,
    Rejected,
    StoredMessage,
    StoreError,
    StoreFull,
    stored_message,
)
from coalition import envelope as env
from coalition.checks import HeaderProblem, check_header
from coalition.labels import Label
from coalition.policy import PartnerPolicy, decide_origination
from coalition.v1 import envelope_pb2

log = logging.getLogger("coalition.broker")

# A publish request of at most this many envelopes and bytes is verified on the event
# loop when the verify thread is idle (see PublishPipeline._verify_in_order); the byte
# bound keeps digesting large payloads off the loop.
INLINE_VERIFY_MAX = 8
INLINE_VERIFY_MAX_BYTES = 256 * 1024


class PublishPipeline:
    """Authorize and store envelopes; one per broker (it owns the one verify thread)."""

    def __init__(
        self,
        cfg: BrokerConfig,
        store: MessageStore,
        audit: AuditBackend,
        registry: PartnerRegistry,
        clock: Callable[[], int],
        *,
        books: AuditKeeping,
        live: LiveStreams,
        decisions: Decisions,
        counters: dict[str, Counters],
        signatures: EnvelopeSignatures,
        remember: Callable[[int, Parsed], None],
        route: Callable[[Subscription, PartnerPolicy, envelope_pb2.Header, Label, int], Route],
        closing: Callable[[], bool],
        status_of: Callable[[BrokerError], str],
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.audit = audit
        self.registry = registry
        self.clock = clock
        self.books = books
        self.live = live
        self.decisions = decisions
        self.counters = counters
        self.signatures = signatures
        self._remember = remember
        self._route = route
        self._closing = closing
        self._status_of = status_of
        self.rates = RateLimits(cfg, registry)
        self.disk = DiskGuard(cfg, clock)
        self._verifier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")
        self._verifying = 0  # requests handed to the verify thread, not yet resumed
        # Metrics hooks (broker.metrics), no-ops unless metrics are on.
        self.on_outcomes: Callable[[str, Sequence[PublishOutcome]], None] = _ignore
        self.on_verified: Callable[[float], None] = _ignore
        # After a commit that stored messages (brokers sharing a cluster wake each other).
        self.on_stored: Callable[[int], None] = _ignore  # the highest offset stored

    async def publish(
        self, partner: str, envelopes: Sequence[envelope_pb2.Envelope]
    ) -> list[PublishOutcome]:
        """Run each envelope through the pipeline; outcomes in order, durable when returned.

        Raises Unavailable when the broker is shutting down and Exhausted
        audit_unavailable while the audit log cannot record decisions; every other
        refusal is a Refused outcome of its envelope.
        """
        if self._closing():
            raise Unavailable("shutting_down", "the broker is shutting down; retry shortly")
        now = self.clock()
        bucket, rate = self.rates.bucket(partner, now)
        if bucket.empty(now, rate):
            # Over its rate, refused envelopes included: refuse the whole request before
            # any signature check or store work (its audit entries are summarised too).
            return await self._throttled(partner, envelopes, rate, now)
        if self.books.audit_failed:
            try:
                await self.books.probe_audit(now)
            except BrokerError:
                bucket.charge(len(envelopes))
                raise
        results: list[PublishOutcome | None] = [None] * len(envelopes)
        accepted: list[tuple[int, NewMessage, envelope_pb2.Header]] = []
        labels: dict[int, Label] = {}
        signed = await self._verify_in_order(partner, envelopes)
        for i, (e, checked) in enumerate(zip(envelopes, signed, strict=True)):
            if isinstance(checked, BrokerError):
                # Not raised here: its traceback would hold this frame (and the request).
                bucket.charge()  # refused work counts against the rate as well
                results[i] = _refusal(e, checked)
                continue
            try:
                header, raw = checked
                label, msg = self._validate(partner, raw, header, now)
            except BrokerError as err:
                if err.code != "rate_limited":
                    bucket.charge()  # refused work counts against the rate as well
                results[i] = _refusal(e, err)
                continue
            accepted.append((i, msg, header))
            labels[i] = label
        fresh: list[StoredMessage] = []
        msgs = [m for _, m, _ in accepted]
        if msgs:
            low = self.disk.too_full(sum(len(m.envelope) for m in msgs))
            if low is not None:
                for i, _, header in accepted:
                    results[i] = _refusal(envelopes[i], low, header)
                accepted, msgs = [], []
        # The request's refusals so far, and the acceptances, are recorded in the append's
        # own commit (a commit carries its audit records; see MessageStore), and so are
        # the caught-up streams' delivery decisions (see broker.exchange.live).
        early = self._refusal_audits(partner, results, now)
        late: list[AuditItem] = []
        outcomes: list[Appended | Rejected | StoreFull] = []
        routes: dict[Subscription, dict[str, Decided]] = {}
        if msgs and self.cfg.live_delivery:
            mine = [(m.message_id, h, labels[i]) for i, m, h in accepted]
            routes = self.live.pre_route(partner, mine, now, self._route)
        if msgs or early:
            records = functools.partial(routed_records, routes) if routes else acceptance_records
            try:
                outcomes = list(
                    await self.store.append(
                        msgs, now, records=records, also=[encode(a) for a in early]
                    )
                )
            except StoreFull as exc:
                outcomes, late = [exc for _ in msgs], early
            self.books.recorded()
        refused_late: list[PublishOutcome | None] = [None] * len(results)
        for (i, msg, header), out in zip(accepted, outcomes, strict=True):
            if isinstance(out, Appended):
                self._remember(out.offset, (header, labels[i]))
                fresh.append(stored_message(msg, out.offset, now))
                results[i] = Accepted(msg.message_id, msg.sequence, out.offset)
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
            results[i] = refused_late[i] = _refusal(envelopes[i], refusal, header)
        if fresh:
            # Durable with their acceptance records: subscribers may have them now.
            if self.cfg.live_delivery:
                self.live.hand_over(fresh, routes)
            self.live.wake_all()
            self.on_stored(max(m.offset for m in fresh))
        late += self._refusal_audits(partner, refused_late, now)
        if late:  # refused by the store itself: recorded before the answer
            try:
                await self.books.record(late, now)
            except StoreError:
                self.books.audit_failed = True
                log.critical("audit records cannot be written; refusing publishes until they can")
        done = [r for r in results if r is not None]
        self.on_outcomes(partner, done)
        return done

    async def _throttled(
        self, partner: str, envelopes: Sequence[envelope_pb2.Envelope], rate: int, now: int
    ) -> list[PublishOutcome]:
        """Refuse a whole request rate_limited, cheaply: no signature check, no store."""
        err = Exhausted(
            "rate_limited",
            f"{partner} is over its rate of {rate} messages/s (refused envelopes count too); "
            "slow down and retry",
        )
        results: list[PublishOutcome] = [_refusal(e, err) for e in envelopes]
        audits = self._refusal_audits(partner, results, now)
        if audits:
            try:
                await self.audit.record_many(audits, now_ms=now)
            except AuditError:
                self.books.audit_failed = True
                log.critical("audit log cannot be written; refusing publishes until it can")
        self.on_outcomes(partner, results)
        return results

    def _refusal_audits(
        self, partner: str, results: Sequence[PublishOutcome | None], now: int
    ) -> list[AuditItem]:
        """The publish.refused entries to record one by one for the refused results (None:
        not decided here); the audit log counts the rest into its summaries (see
        AuditLog.admit_refusal)."""
        out: list[AuditItem] = []
        for i, r in enumerate(results):
            if not isinstance(r, Refused):
                continue
            self.counters[partner].refused += 1
            err = r.error
            self.counters[partner].refusals[err.code] += 1
            item = AuditItem(
                "publish.refused",
                partner,
                partner,
                r.message_id,
                err.code,
                {"reason": err.message, "status": self._status_of(err), "index": i},
            )
            if self.audit.admit_refusal(item, now):
                out.append(item)
                log.info(
                    "publish refused",
                    extra={"partner": partner, "reason": err.code, "message_id": r.message_id},
                )
        return out

    async def _verify_in_order(
        self, partner: str, envelopes: Sequence[envelope_pb2.Envelope]
    ) -> list[tuple[envelope_pb2.Header, bytes] | BrokerError]:
        """_signed(partner, envelopes), with requests leaving this step in arrival order.

        Large requests (by count or bytes) go to the one verify thread, so the event loop
        serves other streams meanwhile; one thread, first in first out, keeps their
        order. A small request is checked right here when nothing is queued for that
        thread: handing a few signatures to a thread costs more in wake-ups and CPU
        queueing than it spares the loop. "Nothing queued" counts a request until its
        task has resumed on the loop, and a publish reaches the store's queue without
        waiting after this step, so an inline check can never overtake an earlier request.
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
    ) -> list[tuple[envelope_pb2.Header, bytes] | BrokerError]:
        """Size, header and signature of each envelope, in order: its header and its
        serialized bytes (sized, stored and digested as they are), or why not.

        Runs on the verify thread or the loop (see _verify_in_order): it only reads broker
        state, apart from the root cache, which only this step touches and never from two
        threads at once (the loop checks inline only while the thread is idle); libsodium
        releases the GIL while it checks an Ed25519 signature.
        """
        started = time.perf_counter()
        out: list[tuple[envelope_pb2.Header, bytes] | BrokerError] = []
        for e in envelopes:
            try:
                out.append(self._check_signed(partner, e))
            except BrokerError as err:
                # Without its traceback: that would hold this frame, whose `out` holds
                # the error (a cycle that keeps the request's bytes until a GC pass).
                out.append(err.with_traceback(None))
        self.on_verified(time.perf_counter() - started)
        return out

    def _check_signed(
        self, partner: str, e: envelope_pb2.Envelope
    ) -> tuple[envelope_pb2.Header, bytes]:
        raw = e.SerializeToString()  # once: upb's ByteSize() serializes too
        size = len(raw)
        if size > self.cfg.max_envelope_bytes:
            raise InvalidInput(
                "oversized",
                f"envelope is {size} bytes; the limit is {self.cfg.max_envelope_bytes} bytes",
            )
        rec = self.registry.get(partner)
        if rec is None:
            raise NotAuthenticated("unknown_sender", f"partner {partner} is not registered")
        return self.signatures.verify(partner, e), raw  # v1 or v2 (broker.exchange.signatures)

    def _validate(
        self, partner: str, raw: bytes, header: envelope_pb2.Header, now: int
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
                parse_label=self.decisions.label,
            )
        except HeaderProblem as exc:
            if exc.code == "originator_mismatch":
                raise Forbidden(exc.code, exc.message) from exc
            raise InvalidInput(exc.code, exc.message) from exc
        decision = self.decisions.decided(decide_origination, rec.policy, label, header.topic, now)
        if not decision.allowed:
            raise Forbidden(decision.reason.value, decision.explanation)
        bucket, rate = self.rates.bucket(partner, now)
        if not bucket.take(now, rate):
            raise Exhausted("rate_limited", f"{partner} is over its rate of {rate} messages/s")
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

    def close(self) -> None:
        """Release the verify thread, once the server no longer calls in."""
        self._verifier.shutdown(wait=True)


def _ignore(*_: object) -> None:
    pass


def _refusal(
    e: envelope_pb2.Envelope, err: BrokerError, header: envelope_pb2.Header | None = None
) -> Refused:
    return Refused(header.message_id if header else _message_id_or_empty(e), err)


def _quota_refusal(partner: str, out: Rejected, size: int) -> Exhausted:
    """quota_exceeded: the sender's stored bytes, its quota, and what the envelope needs."""
    return Exhausted(
        "quota_exceeded",
        f"{partner}'s share of the message store is full: it holds {out.used} of its "
        f"{out.limit} bytes and this envelope needs {size} more; retry once its stored "
        "messages have been removed by retention",
    )


def _message_id_or_empty(e: envelope_pb2.Envelope) -> str:
    try:
        return routing_header(e).message_id
    except env.InvalidEnvelope:
        return ""
