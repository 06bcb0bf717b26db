"""The Exchange core: the publish pipeline, live subscriptions and routing.

Servicers translate protobuf to calls on this class; this class holds no gRPC code.
The store is the source of truth for deliveries: a subscription is woken when
something changes and pulls what is pending for it, so a slow or absent
subscriber costs store rows, not broker memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.audit import AuditError, AuditItem, AuditLog
from broker.config import BrokerConfig
from broker.errors import (
    AlreadyExists,
    BrokerError,
    Exhausted,
    Forbidden,
    InvalidInput,
    NotAuthenticated,
    NotFound,
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
from coalition.identity import (
    IdentityError,
    datetime_to_ms,
    verify_key_bundle,
    verify_signing_cert,
)
from coalition.labels import Label, LabelError, label_from_proto
from coalition.policy import (
    Decision,
    PartnerPolicy,
    PartnerStatus,
    Reason,
    decide,
    decide_origination,
    eligibility,
)
from coalition.topics import PatternSet, TopicError, validate_topic
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
# Disk a publish request takes beyond twice its envelope bytes (see _disk_too_full).
_DISK_PER_REQUEST = 64 * 1024
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
    """One live Subscribe stream."""

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

    def hand_over(self, fresh: Sequence[StoredMessage], size: int) -> None:
        """Queue newly stored messages for this subscription (publish calls this)."""
        if self.feed_overflow:
            return
        if (
            len(self.feed) + len(fresh) > _FEED_MAX_MESSAGES
            or self.feed_bytes + size > _FEED_MAX_BYTES
        ):
            self.feed.clear()
            self.feed_bytes = 0
            self.feed_overflow = True
            return
        self.feed.extend(fresh)
        self.feed_bytes += size

    def take_live(self, room: int) -> list[StoredMessage]:
        """Up to room fed messages that the last store read did not see, oldest first."""
        assert self.live_after is not None
        after, inflight = self.live_after, self.inflight
        out: list[StoredMessage] = []
        keep: list[StoredMessage] = []
        for m in self.feed:
            if m.offset <= after or m.offset in inflight:
                continue  # the store read saw it (delivered, excluded or settled there)
            (out if len(out) < room else keep).append(m)
        self.feed = keep
        self.feed_bytes = sum(len(m.envelope) for m in keep)
        return out

    def reset_feed(self) -> None:
        """Before a store read: the read will see everything fed so far."""
        self.live_after = None
        self.feed.clear()
        self.feed_bytes = 0
        self.feed_overflow = False


class SigningCertNotValid(KeyError):
    """A partner's signing certificate is outside its validity period by the broker's clock
    now (code ``signing_cert_expired`` or ``signing_cert_not_yet_valid``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message  # not KeyError's quoted repr


@dataclass(frozen=True)
class CertifiedKey:
    """A verified signing key, cached with what makes it stale: the period in which its
    certificate and the CA's are both valid. Checked against the clock at every use."""

    key: Ed25519PublicKey
    not_before_ms: int
    not_after_ms: int

    def check(self, sender: str, now_ms: int) -> None:
        """Raise SigningCertNotValid unless not_before <= now <= not_after."""
        _check_period(sender, self.not_before_ms, self.not_after_ms, now_ms)


def _check_period(sender: str, not_before_ms: int, not_after_ms: int, now_ms: int) -> None:
    if now_ms > not_after_ms:
        raise SigningCertNotValid(
            "signing_cert_expired",
            f"{sender}'s signing certificate (or the CA's) expired at {_iso(not_after_ms)}; "
            "envelopes signed under it are refused",
        )
    if now_ms < not_before_ms:
        raise SigningCertNotValid(
            "signing_cert_not_yet_valid",
            f"{sender}'s signing certificate is not valid before {_iso(not_before_ms)} "
            "by the broker's clock",
        )


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms // 1000))


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
        self._signers: dict[tuple[str, str], CertifiedKey] = {}
        self._key_changes: dict[str, deque[int]] = {}
        self.closing = False
        self.audit_failed = False
        self._verifier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")
        self._verifying = 0  # requests handed to the verify thread, not yet resumed
        self._label_cache: dict[bytes, Label] = {}
        self._decisions: dict[
            tuple[object, int, int, str], tuple[PartnerPolicy, Label, Decision]
        ] = {}
        self._disk_free = (0, 0)  # (checked at ms, free bytes then)
        # Acceptance bookkeeping (see reconcile_audit): offsets stored whose entries are
        # queued but not committed yet; the audited mark (every offset at or below it has
        # its entry), which the next append persists in its own transaction; offsets above
        # the mark whose entries committed (offsets are contiguous: one per stored message).
        self._accepting: set[int] = set()
        self._audited_through = 0
        self._audited_above: set[int] = set()
        self._reconciling = asyncio.Lock()
        self._registry_flush = asyncio.Lock()
        self._parse_cache: OrderedDict[int, tuple[envelope_pb2.Header, Label]] = OrderedDict()
        # Partners with audited expiry notices to read (broker.retention), by generation.
        self.notice_gen: dict[str, int] = {}
        self._notice_drops: set[asyncio.Task[int]] = set()

    # -- identity helpers -------------------------------------------------------------------
    def signer(self, sender: str, key_id: str) -> Ed25519PublicKey:
        """The certified signing key of sender, valid now by the broker's clock.

        Raises SigningCertNotValid (a KeyError) when its certificate or the CA's is expired
        or not yet valid, KeyError when the key is unknown or not certified. The parsed key
        is cached with its validity period, which is compared with the clock at every use,
        so a certificate that expires while the broker runs stops verifying then.
        """
        now = self.clock()
        cached = self._signers.get((sender, key_id))
        if cached is None:
            rec = self.registry.get(sender)
            if rec is None:
                raise KeyError(sender)
            cert = x509.load_der_x509_certificate(rec.signing_cert)
            if format(cert.serial_number, "x") != key_id:
                raise KeyError(key_id)
            period = (
                datetime_to_ms(max(cert.not_valid_before_utc, self.ca_cert.not_valid_before_utc)),
                datetime_to_ms(min(cert.not_valid_after_utc, self.ca_cert.not_valid_after_utc)),
            )
            _check_period(sender, *period, now)
            try:
                key = verify_signing_cert(rec.signing_cert, self.ca_cert, sender, now)
            except IdentityError as exc:
                raise KeyError(sender) from exc
            cached = CertifiedKey(key, *period)
            self._signers[(sender, key_id)] = cached
        cached.check(sender, now)
        return cached.key

    # -- publish ------------------------------------------------------------------------------
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
                await self._probe_audit(now)
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
        audits: list[AuditItem] = []
        fresh: list[StoredMessage] = []
        if accepted:
            msgs = [m for _, m, _ in accepted]
            low = self._disk_too_full(sum(len(m.envelope) for m in msgs))
            if low is not None:
                for i, _, header in accepted:
                    results[i] = self._refusal(envelopes[i], low, header)
                accepted, msgs = [], []
            outcomes: list[Appended | Rejected | StoreFull]
            try:
                outcomes = list(
                    await self.store.append(msgs, now, audited_through=self._audited_through)
                )
            except StoreFull as exc:
                outcomes = [exc for _ in msgs]
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
                    audits.append(_acceptance(fresh[-1]))
                elif isinstance(out, StoreFull):
                    results[i] = self._refusal(
                        envelopes[i], Exhausted("store_full", str(out)), header
                    )
                elif out.reason == "quota_exceeded":
                    results[i] = self._refusal(
                        envelopes[i], _quota_refusal(partner, out, len(msg.envelope)), header
                    )
                else:
                    refusal: BrokerError = (
                        AlreadyExists(
                            "replay",
                            f"message id {msg.message_id} was already published (replay refused)",
                        )
                        if out.reason == "duplicate_id"
                        else Precondition(
                            "sequence_not_increasing",
                            f"sequence {msg.sequence} is not above the last accepted sequence "
                            f"from {partner}",
                        )
                    )
                    results[i] = self._refusal(envelopes[i], refusal, header)
        audits += self._refusal_audits(partner, results, now)
        if fresh:
            # Stored durably: subscribers may have them now. Their delivery audit entries
            # are queued behind this publish's own (the audit writer is FIFO and nothing
            # awaits between here and record_many's submit), so the chain still records
            # the acceptance first, and both usually share one commit.
            if self.cfg.live_delivery:
                size = sum(len(m.envelope) for m in fresh)
                for subs in self.live.values():
                    for s in subs:
                        s.hand_over(fresh, size)
            self.wake_all()
        stored = [m.offset for m in fresh]
        self._accepting.update(stored)
        try:
            await self.audit.record_many(audits, now_ms=now)
        except AuditError:
            # Fail closed: what is stored stays stored (and holds the audited mark below
            # it, so its acceptance is recorded once the log recovers), but no further
            # publish is accepted until the audit log can record decisions again.
            self.audit_failed = True
            log.critical("audit log cannot be written; refusing publishes until it can")
        else:
            self._advance_audited(stored)
        finally:
            self._accepting.difference_update(stored)
        return [r for r in results if r is not None]

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
        """The publish.refused entries to record one by one for the refused results; the
        audit log counts the rest into its summaries (see AuditLog.admit_refusal)."""
        out: list[AuditItem] = []
        for i, r in enumerate(results):
            assert r is not None
            if r.outcome != exchange_pb2.REFUSED:
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

    def _advance_audited(self, offsets: Sequence[int]) -> None:
        """These offsets' acceptance entries are durable: move the mark over the prefix."""
        above = self._audited_above
        above.update(offsets)
        mark = self._audited_through
        while mark + 1 in above:
            mark += 1
            above.remove(mark)
        self._audited_through = mark

    async def flush_audited(self) -> None:
        """Persist the audited mark now (at shutdown, when no next append will)."""
        try:
            await self.store.mark_audited(self._audited_through)
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
            self._audited_through = max(self._audited_through, await self.store.audited_through())
            while True:
                batch = [
                    m
                    for m in await self.store.unaudited()
                    if m.offset > self._audited_through
                    and m.offset not in self._audited_above
                    and m.offset not in self._accepting
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
                        [_acceptance(m, stored_ms=m.stored_ms, recovered=True) for m in missing],
                        now_ms=self.clock(),
                    )
                    log.warning(
                        "recorded missing acceptance entries",
                        extra={"count": len(missing), "first_offset": missing[0].offset},
                    )
                    recovered += len(missing)
                before = self._audited_through
                self._advance_audited([m.offset for m in batch])
                await self.store.mark_audited(self._audited_through)
                if self._audited_through == before:
                    return recovered  # held below by a publish still writing its entries

    def _disk_too_full(self, incoming: int) -> Exhausted | None:
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
                await self._probe_audit(self.clock())
            else:
                await self.flush_registry_audit()
        except (AuditError, Exhausted):
            self.audit_failed = True
            log.critical("audit log cannot be written; refusing publishes until it can")

    async def _probe_audit(self, now: int) -> None:
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
            for m in batch:
                routed, reason, why = self._route(sub, rec, m, now)
                if routed is None:
                    skipped.append(m.offset)
                    if reason != "own_message":
                        denied[reason].append((m, why))
                    continue
                sub.inflight.add(m.offset)
                sent.append(m)
                # add() + copy into place: appending a built Delivery to the repeated
                # field costs ~10x more (upb copies the whole message again).
                d = out.deliveries.add(
                    offset=m.offset, topic=routed.topic, precedence=routed.precedence
                )
                d.envelope.MergeFromString(m.envelope)
                d.label.CopyFrom(routed.label)
            self.counters[sub.partner].delivered += len(sent)
            audits = (
                [
                    _batch_audit(
                        "deliver",
                        sub.partner,
                        "allow",
                        sent,
                        {"topics": sorted({m.topic for m in sent})},
                    )
                ]
                if sent
                else []
            )
            for reason, items in denied.items():
                audits.append(
                    _batch_audit(
                        "deliver.denied",
                        sub.partner,
                        reason,
                        [m for m, _ in items],
                        {"why": items[0][1]},
                    )
                )
            # Audited before it leaves: every delivery decision is durable first.
            try:
                await self.audit.record_many(audits, now_ms=now)
            except AuditError as exc:
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
        if not sub.wants(header.topic):
            return None, "not_subscribed", f"topic {header.topic} is outside this subscription"
        d = self._decided(decide, rec.policy, label, header.topic, now)
        if d.reason is not Reason.ALLOW:
            return None, d.reason.value, d.explanation
        if not any(w.recipient == sub.partner for w in header.wrapped_keys):
            return None, "no_key_wrapped", "the sender wrapped no key for this partner"
        return header, "allow", ""

    def _record(self, partner: str) -> PartnerRecord:
        rec = self.registry.get(partner)
        if rec is None:
            raise NotAuthenticated("unknown_partner", f"partner {partner} is not registered")
        return rec

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

    # -- directory, keys, recipients ------------------------------------------------------
    def directory(self, partner: str) -> list[directory_pb2.DirectoryEntry]:
        """What partner needs to verify and encrypt, and nothing about others' standing.

        Every admitted partner's signing certificate (active or suspended alike, so the
        list does not change when one is suspended), with no status and no groups; a key
        bundle only for the caller itself and for partners it may send to (may_reach:
        a policy it may originate under that they are cleared for, and a topic it may
        publish that they may subscribe to). Not-yet-admitted partners are not listed.
        Refuses a caller that is not registered, not admitted or suspended.
        """
        caller = self._admitted(partner)
        out = []
        for rec in self.registry.all():
            if rec.code != partner and rec.policy.status is PartnerStatus.PENDING:
                continue
            entry = directory_pb2.DirectoryEntry(partner=rec.code, signing_cert=rec.signing_cert)
            if rec.bundle is not None and (
                rec.code == partner or may_reach(caller.policy, rec.policy)
            ):
                entry.key_bundle.CopyFrom(rec.bundle)
            out.append(entry)
        return out

    def directory_entry(self, partner: str) -> directory_pb2.DirectoryEntry:
        """The operators' full view of one partner: certificate, bundle, status and groups."""
        rec = self.partner_record(partner)
        entry = directory_pb2.DirectoryEntry(
            partner=rec.code,
            signing_cert=rec.signing_cert,
            status=directory_pb2.PartnerStatus.ValueType(int(rec.policy.status)),
            groups=sorted(rec.policy.groups),
        )
        if rec.bundle is not None:
            entry.key_bundle.CopyFrom(rec.bundle)
        return entry

    def _admitted(self, partner: str) -> PartnerRecord:
        """partner's record if it is admitted and not suspended; else the refusal.

        The auth interceptor refuses partners that are not admitted before any Exchange
        call; this holds the same line in the core.
        """
        rec = self._record(partner)
        if rec.policy.status is PartnerStatus.PENDING:
            raise Forbidden("not_admitted", f"partner {partner} is not yet admitted by operators")
        if rec.policy.status is PartnerStatus.SUSPENDED:
            raise Forbidden("suspended", f"partner {partner} is suspended")
        return rec

    async def register_keys(self, partner: str, signed: directory_pb2.SignedKeyBundle) -> str:
        """Verify a key bundle under the partner's certified key and make it current."""
        rec = self._record(partner)
        now = self.clock()
        try:
            cert = x509.load_der_x509_certificate(rec.signing_cert)
            key = self.signer(partner, format(cert.serial_number, "x"))
            bundle = verify_key_bundle(signed, key, partner, now)
        except SigningCertNotValid as exc:
            raise InvalidInput("bad_key_bundle", f"key bundle refused: {exc}") from exc
        except KeyError as exc:
            # Not a KeyError's bare repr ('USA'): say which certificate failed and why.
            why = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
            raise InvalidInput(
                "bad_key_bundle",
                f"key bundle refused: the signing certificate operators admitted for "
                f"{partner} does not verify under this broker's CA{why}; operators must "
                f"admit {partner} again with its current signing certificate",
            ) from exc
        except (IdentityError, ValueError) as exc:
            hint = ""
            if "signature does not verify" in str(exc):
                hint = (
                    f" (it is not signed by the signing key operators admitted for {partner}:"
                    " if the partner's keys were issued again, operators must admit its"
                    " current signing certificate)"
                )
            raise InvalidInput("bad_key_bundle", f"key bundle refused: {exc}{hint}") from exc
        if rec.bundle is not None and rec.bundle.SerializeToString() == signed.SerializeToString():
            # A node reconnecting with the bundle the broker already has: nothing changes,
            # so nothing is written (no registry write, no audit entry; on a full disk too).
            return bundle.key_id
        self._admit_key_change(partner, now)
        await self.registry.set_bundle(
            partner,
            bundle.key_id,
            signed,
            now,
            audit=AuditItem(
                "keys.registered", partner, partner, "", "allow", {"key_id": bundle.key_id}
            ),
        )
        await self.registry_changed()
        return bundle.key_id

    def _admit_key_change(self, partner: str, now: int) -> None:
        """Count a key-bundle change against the partner's max_key_changes_per_min (a
        sliding minute); raise Exhausted rate_limited past it. Each change costs a
        registry write and an audit entry, so a partner signing new bundles in a loop
        must not be able to fill the disk with them."""
        limit = self.cfg.max_key_changes_per_min
        if limit <= 0:
            return
        recent = self._key_changes.setdefault(partner, deque())
        while recent and recent[0] <= now - 60_000:
            recent.popleft()
        if len(recent) >= limit:
            raise Exhausted(
                "rate_limited",
                f"{partner} changed its key bundle {len(recent)} times in the last minute, "
                f"the most allowed ({limit}); retry later",
            )
        recent.append(now)

    def eligible(self, label: Label, topic: str, *, exclude: str = "") -> list[str]:
        """Partners that policy allows to receive label on topic now and that have keys."""
        now = self.clock()
        return [
            rec.code
            for rec in self.registry.all()
            if rec.code != exclude
            and eligibility(rec.policy, label, topic, now, has_keys=rec.bundle is not None).allowed
        ]

    def recipients(self, partner: str, label_pb: label_pb2.Label, topic: str) -> list[str]:
        """Partners eligible now for a label and topic that partner itself may originate.

        The broker answers only what the caller needs to seal a message it may publish:
        for any other label or topic it refuses (not_permitted_to_originate) without
        saying who would qualify, so no partner can map the others' clearances,
        categories or topics by asking. Suspended and not-admitted callers are refused.
        """
        rec = self._admitted(partner)
        try:
            label = self._label(label_pb)
            validate_topic(topic)
        except (LabelError, TopicError) as exc:
            raise InvalidInput("bad_label", str(exc)) from exc
        if label.originator and label.originator != partner:
            raise Forbidden(
                "not_permitted_to_originate",
                f"{partner} may not originate a label whose originator is "
                f"{label.originator!r}; recipients are answered only for labels the caller "
                "may publish",
            )
        decision = self._decided(decide_origination, rec.policy, label, topic, self.clock())
        if not decision.allowed:
            raise Forbidden(
                "not_permitted_to_originate",
                f"{decision.explanation} ({decision.reason.value}); recipients are answered "
                "only for labels and topics the caller may publish",
            )
        return self.eligible(label, topic, exclude=partner)

    def partner_record(self, partner: str) -> PartnerRecord:
        rec = self.registry.get(partner)
        if rec is None:
            raise NotFound("unknown_partner", f"no partner {partner!r} is registered")
        return rec

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


def _wal_bytes(data_dir: Path) -> int:
    """The size of the SQLite WAL files in data_dir (not yet copied into their databases)."""
    total = 0
    for wal in Path(data_dir).glob("*.db-wal"):
        with contextlib.suppress(OSError):  # gone between listing and stat: nothing owed
            total += wal.stat().st_size
    return total


def _acceptance(m: StoredMessage, **extra: object) -> AuditItem:
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


def may_reach(sender: PartnerPolicy, recipient: PartnerPolicy) -> bool:
    """Whether some message sender may originate could be delivered to recipient.

    True when sender holds an origination ceiling under a labelling policy that
    recipient holds a clearance for (a label at UNCLASSIFIED under it, naming recipient
    in REL TO, with no RESTRICTIVE category, passes both), and one of sender's publish
    patterns overlaps one of recipient's subscribe patterns. Status is ignored, so the
    answer does not change when recipient is suspended or reinstated.
    """
    if sender.origination_ceilings.keys().isdisjoint(recipient.clearances.keys()):
        return False
    return any(
        _overlap(p.split("."), s.split("."))
        for p in sender.publish_topics
        for s in recipient.subscribe_topics
    )


def _overlap(a: list[str], b: list[str]) -> bool:
    """Whether some topic matches both token lists ('*' one token, '>' one or more)."""
    if not a or not b:
        return not a and not b
    if a[0] == ">" or b[0] == ">":
        return True  # the other still has at least one token to match ">" with more
    if a[0] != "*" and b[0] != "*" and a[0] != b[0]:
        return False
    return _overlap(a[1:], b[1:])


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
