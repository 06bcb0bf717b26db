"""ExchangeCore: the exchange's one entry point, wiring its parts together.

Publish pipeline (broker.exchange.publish), delivery loop (broker.exchange.delivery),
live streams (broker.exchange.live), partner directory (broker.exchange.directory), the
acceptance-record bookkeeping (broker.audit_keeping), and the memoized labels and
decisions they share (broker.exchange.decisions). The core takes and returns domain
values and raises BrokerError subclasses; it holds no gRPC code and builds no response
message (the servicers do).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.audit import AuditBackend, AuditError, AuditItem
from broker.audit_keeping import AuditKeeping
from broker.config import BrokerConfig
from broker.errors import BrokerError, Unavailable
from broker.exchange.decisions import Decisions
from broker.exchange.delivery import Counters, DeliveryLoop
from broker.exchange.directory import PartnerDirectory
from broker.exchange.live import LiveStreams, Subscription
from broker.exchange.outcomes import PublishOutcome, StreamItem
from broker.exchange.publish import PublishPipeline
from broker.exchange.signatures import EnvelopeSignatures
from broker.registry import PartnerRecord, PartnerRegistry
from broker.store import MessageStore
from coalition.clock import wall_clock_ms
from coalition.labels import Label
from coalition.v1 import directory_pb2, envelope_pb2, label_pb2

log = logging.getLogger("coalition.broker")

Clock = Callable[[], int]


class ExchangeCore:
    """Authorize, store and route envelopes; serve the directory.

    status_of names a refusal's status in its ``publish.refused`` audit entry (the
    server passes the gRPC status table's name for the error); without it the entry
    records the error's own code.

    ``store``, ``live`` (live subscriptions by partner), ``counters`` (per partner) and
    ``clock`` are read by the admin core and the servicers.
    """

    def __init__(
        self,
        cfg: BrokerConfig,
        store: MessageStore,
        audit: AuditBackend,
        registry: PartnerRegistry,
        ca_cert: x509.Certificate,
        clock: Clock = wall_clock_ms,
        *,
        status_of: Callable[[BrokerError], str] | None = None,
    ) -> None:
        self.cfg = cfg
        self._store = store
        self.audit = audit
        self.registry = registry
        self.ca_cert = ca_cert
        self.clock = clock
        self.closing = False
        self.counters: dict[str, Counters] = defaultdict(Counters)
        self.decisions = Decisions()
        self.books = AuditKeeping(cfg, store, audit, registry, clock)
        self.keys = PartnerDirectory(
            cfg,
            registry,
            ca_cert,
            clock,
            label=self.decisions.label,
            decided=self.decisions.decided,
            on_change=self.books.registry_changed,
        )
        self.streams = LiveStreams(cfg, self.keys.record)
        self.live = self.streams.by_partner
        self.delivery = DeliveryLoop(
            cfg,
            store,
            self.books,
            clock,
            self.streams,
            self.decisions,
            self.counters,
            record=self.keys.record,
            closing=self._is_closing,
        )
        self.pipeline = PublishPipeline(
            cfg,
            store,
            audit,
            registry,
            clock,
            books=self.books,
            live=self.streams,
            decisions=self.decisions,
            counters=self.counters,
            signatures=EnvelopeSignatures(self.keys.certified),
            remember=self.delivery.remember,
            route=self.delivery.route_parsed,
            closing=self._is_closing,
            status_of=status_of or _own_code,
        )
        # Called when a stream ends (broker.jetstream.peers gives its lease back).
        self.on_closed: Callable[[Subscription], None] = _nothing

    @property
    def store(self) -> MessageStore:
        """The message store the publish pipeline and the delivery loop use."""
        return self._store

    @store.setter
    def store(self, store: MessageStore) -> None:
        # One store for both parts: replacing it here (a test wrapping the store, say)
        # replaces it for publish and delivery alike.
        self._store = self.pipeline.store = self.delivery.store = store

    def _is_closing(self) -> bool:
        return self.closing

    # -- publish (broker.exchange.publish) ------------------------------------------------------
    async def publish(
        self, partner: str, envelopes: Sequence[envelope_pb2.Envelope]
    ) -> list[PublishOutcome]:
        """Each envelope's outcome, in order, durable when returned (PublishPipeline.publish)."""
        return await self.pipeline.publish(partner, envelopes)

    def signer(self, sender: str, key_id: str) -> Ed25519PublicKey:
        """The certified signing key of sender, valid now (PartnerDirectory.signer)."""
        return self.keys.signer(sender, key_id)

    # -- subscribe (broker.exchange.live, broker.exchange.delivery) -----------------------------
    def open_subscription(self, partner: str, topics: Sequence[str], window: int) -> Subscription:
        """Register a live stream (LiveStreams.open); Unavailable while shutting down."""
        if self.closing:
            raise Unavailable("shutting_down", "the broker is shutting down; retry shortly")
        return self.streams.open(partner, topics, window)

    def close_subscription(self, sub: Subscription) -> None:
        self.streams.close(sub)
        self.on_closed(sub)

    def deliveries(self, sub: Subscription) -> AsyncIterator[StreamItem]:
        """What sub is to be sent, audited first (DeliveryLoop.deliveries)."""
        return self.delivery.deliveries(sub)

    def note_acks(self, sub: Subscription, offsets: Sequence[int]) -> None:
        """Record acknowledgements, settled in batches (DeliveryLoop.note_acks)."""
        self.delivery.note_acks(sub, offsets)

    async def acknowledge(self, sub: Subscription, offsets: Sequence[int] = ()) -> None:
        """Settle acknowledged deliveries now (DeliveryLoop.acknowledge)."""
        await self.delivery.acknowledge(sub, offsets)

    def notices_ready(self, partners: Iterable[str]) -> None:
        """These partners have new audited expiry notices (LiveStreams.notices_ready)."""
        self.streams.notices_ready(partners)

    def wake_all(self) -> None:
        self.streams.wake_all()

    def policy_changed(self, partner: str) -> None:
        """Apply a policy change to live streams at once (suspension closes them)."""
        self.streams.policy_changed(partner, self.registry.get(partner))

    # -- refusals -------------------------------------------------------------------------------
    async def refused(self, kind: str, partner: str, err: BrokerError) -> None:
        """Audit a refused call (kind ``<call>.refused``) before the refusal goes back.

        Recorded one by one up to a threshold per partner and interval, then summarised
        (AuditLog.record_refusal). If the log cannot be written the refusal is logged as
        critical and still goes back: nothing is raised.
        """
        item = AuditItem(kind, partner, partner, "", err.code, {"reason": err.message})
        try:
            await self.audit.record_refusal(item, now_ms=self.clock())
        except AuditError as exc:
            log.critical("%s not audited: %s", kind, exc)

    # -- acceptance records (broker.audit_keeping) ----------------------------------------------
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

    # -- directory, keys, recipients (broker.exchange.directory) --------------------------------
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

    # -- lifecycle ------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop taking new work and end live streams."""
        self.closing = True
        self.wake_all()

    def close(self) -> None:
        """Release the verify thread, once the server no longer calls in."""
        self.pipeline.close()


def _own_code(err: BrokerError) -> str:
    return err.code


def _nothing(_: Subscription) -> None:
    pass
