"""Retention with accountability: sweep the store, audit and announce what went unread.

A retention sweep (store.sweep) removes messages by age, label expiry and size. A message
it removes before an eligible recipient had it (policy allows it to that partner now, the
sender wrapped a key for it, and the partner had neither acknowledged nor skipped it)
leaves a notice for that partner, and its audit record (``deliver.expired``, one entry
per recipient and reason, partner = the recipient), both in the sweep's own transaction
(the store's outbox; the drainer appends it to the audit log). So a notice is audited
once the sweep commits, and only then does the Subscribe stream tell the recipient
(ExchangeCore.notices_ready). Partners that could not have received a
message are never told about it: eligibility is the delivery path's own decide().
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from google.protobuf.message import DecodeError

from broker.audit.items import AuditItem, encode
from broker.exchange import Clock, ExchangeCore
from broker.exchange.headers import routing_header
from broker.store import MessageStore, StoredMessage
from broker.store.base import Eligibility, Notice, Sweep
from coalition import envelope as env
from coalition.labels import LabelError, label_from_proto
from coalition.policy import PartnerPolicy, decide
from coalition.v1 import envelope_pb2

log = logging.getLogger("coalition.broker")


def eligibility(policies: Sequence[tuple[str, PartnerPolicy]], now_ms: int) -> Eligibility:
    """Who may receive a stored message now, with the sender's number for each.

    A pure function over a snapshot of the policies (it runs on the store's writer
    thread): the partners that decide() allows for the signed label and topic, and that
    the sender wrapped a key for, the sender itself aside. A message that does not parse
    (tampered with in the store) has no eligible recipient.
    """

    allowed: dict[tuple[bytes, str], frozenset[str]] = {}  # labels and topics repeat

    def who(m: StoredMessage) -> Mapping[str, int]:
        try:
            header = routing_header(envelope_pb2.Envelope.FromString(m.envelope))
            key = (header.label.SerializeToString(), header.topic)
            codes = allowed.get(key)
            if codes is None:
                label = label_from_proto(header.label)
                codes = frozenset(
                    code
                    for code, policy in policies
                    if decide(policy, label, header.topic, now_ms).allowed
                )
                allowed[key] = codes
        except (env.InvalidEnvelope, LabelError, DecodeError, ValueError):
            return {}
        return {
            w.recipient: int(w.sequence)
            for w in header.wrapped_keys
            if w.recipient in codes and w.recipient != header.sender
        }

    return who


class Retention:
    """Runs sweeps; each expiry is audited in the sweep's commit, then its notice sent."""

    def __init__(
        self,
        exchange: ExchangeCore,
        store: MessageStore,
        clock: Clock,
        *,
        max_notices: int = 10_000,
    ) -> None:
        self.exchange = exchange
        self.store = store
        self.clock = clock
        self.max_notices = max_notices

    async def start(self) -> None:
        """Before serving: arm the streams of partners holding notices."""
        self.exchange.notices_ready(await self.store.notice_subscribers())

    async def sweep(self) -> Sweep:
        """One retention sweep, its expiries audited in its commit; then their notices
        are sent. Raises StoreError."""
        now = self.clock()
        policies = [(r.code, r.policy) for r in self.exchange.registry.all()]
        result = await self.store.sweep(now, eligibility(policies, now), expiry_records)
        if result.removed:
            log.info(
                "retention",
                extra={
                    "removed": result.removed,
                    **{f"removed_{k}": v for k, v in sorted(result.by_reason.items())},
                    "notices": len(result.notices),
                },
            )
        if result.notices:
            self.exchange.books.recorded()
            trimmed = await self.store.trim_notices(self.max_notices)
            if trimmed:
                log.warning(
                    "forgot the oldest expiry notices of partners holding more than %d "
                    "(still in the audit log)",
                    self.max_notices,
                    extra={"forgotten": trimmed},
                )
            self.exchange.notices_ready({n.subscriber for n in result.notices})
        return result


def expiry_records(notices: Sequence[Notice]) -> list[str]:
    """The deliver.expired records of a sweep's notices (pure: run in the store's writer)."""
    return [
        encode(_expired_audit(subscriber, reason, group))
        for (subscriber, reason), group in _grouped(notices).items()
    ]


def _grouped(notices: Iterable[Notice]) -> dict[tuple[str, str], list[Notice]]:
    out: dict[tuple[str, str], list[Notice]] = defaultdict(list)
    for n in notices:
        out[(n.subscriber, n.reason)].append(n)
    return out


def _expired_audit(subscriber: str, reason: str, notices: Sequence[Notice]) -> AuditItem:
    """One ``deliver.expired`` entry: these messages were removed before subscriber had them."""
    detail: dict[str, object] = {
        "offsets": [n.offset for n in notices],
        "message_ids": [n.message_id for n in notices],
        "senders": [n.sender for n in notices],
        "removed_ms": notices[0].removed_ms,
    }
    mid = notices[0].message_id if len(notices) == 1 else ""
    return AuditItem("deliver.expired", "broker", subscriber, mid, reason, detail)
