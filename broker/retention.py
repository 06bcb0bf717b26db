"""Retention with accountability: sweep the store, audit and announce what went unread.

A retention sweep (store.sweep) removes messages by age, label expiry and size. A message
it removes before an eligible recipient had it (policy allows it to that partner now, the
sender wrapped a key for it, and the partner had neither acknowledged nor skipped it)
leaves a notice for that partner, in the sweep's own transaction. This module records
each such expiry in the audit log (``deliver.expired``, one entry per recipient and
reason, partner = the recipient) and only then lets the Subscribe stream tell the
recipient (ExchangeCore.notices_ready). Partners that could not have received a
message are never told about it: eligibility is the delivery path's own decide().
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from google.protobuf.message import DecodeError

from broker.audit import AuditError, AuditItem, AuditLog
from broker.exchange import Clock, ExchangeCore
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
            header = env.parse_header(envelope_pb2.Envelope.FromString(m.envelope))
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
    """Runs sweeps and keeps every expiry audited before its notice is sent."""

    def __init__(
        self,
        exchange: ExchangeCore,
        store: MessageStore,
        audit: AuditLog,
        clock: Clock,
        *,
        max_notices: int = 10_000,
    ) -> None:
        self.exchange = exchange
        self.store = store
        self.audit = audit
        self.clock = clock
        self.max_notices = max_notices

    async def start(self) -> None:
        """Before serving: audit notices a crash left unaudited; arm the streams."""
        await self.flush(recovering=True)
        self.exchange.notices_ready(await self.store.notice_subscribers())

    async def sweep(self) -> Sweep:
        """One retention sweep; its notices are audited, then sent. Raises StoreError."""
        now = self.clock()
        policies = [(r.code, r.policy) for r in self.exchange.registry.all()]
        result = await self.store.sweep(now, eligibility(policies, now))
        if result.removed:
            log.info(
                "retention",
                extra={
                    "removed": result.removed,
                    **{f"removed_{k}": v for k, v in sorted(result.by_reason.items())},
                    "notices": len(result.notices),
                },
            )
        await self.flush()
        return result

    async def flush(self, *, recovering: bool = False) -> int:
        """Audit the notices not audited yet, mark them, and wake their partners' streams.

        recovering (at start): skip the ones whose entry is already in the log (a crash
        between the audit commit and the mark) and mark the others ``recovered``.
        Returns how many entries were written. If the audit log cannot record them, the
        notices wait (and are not sent) and publishes are refused until it can.
        """
        total = 0
        while True:
            pending = await self.store.unaudited_notices(limit=10_000)
            if not pending:
                return total
            todo = pending
            if recovering:
                todo = [n for n in pending if not await self._recorded(n)]
            items = [
                _expired_audit(subscriber, reason, group, recovered=recovering)
                for (subscriber, reason), group in _grouped(todo).items()
            ]
            try:
                await self.audit.record_many(items, now_ms=self.clock())
            except AuditError as exc:
                self.exchange.audit_failed = True
                log.critical("audit log cannot record message expiries (%s); notices wait", exc)
                return total
            await self.store.mark_notices_audited(pending)
            trimmed = await self.store.trim_notices(self.max_notices)
            if trimmed:
                log.warning(
                    "forgot the oldest expiry notices of partners holding more than %d "
                    "(still in the audit log)",
                    self.max_notices,
                    extra={"forgotten": trimmed},
                )
            self.exchange.notices_ready({n.subscriber for n in pending})
            total += len(items)

    async def _recorded(self, n: Notice) -> bool:
        for e in await self.audit.query(
            kind="deliver.expired", partner=n.subscriber, since_ms=n.removed_ms
        ):
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                if n.offset in json.loads(e.detail_json).get("offsets", []):
                    return True
        return False


def _grouped(notices: Iterable[Notice]) -> dict[tuple[str, str], list[Notice]]:
    out: dict[tuple[str, str], list[Notice]] = defaultdict(list)
    for n in notices:
        out[(n.subscriber, n.reason)].append(n)
    return out


def _expired_audit(
    subscriber: str, reason: str, notices: Sequence[Notice], *, recovered: bool = False
) -> AuditItem:
    """One ``deliver.expired`` entry: these messages were removed before subscriber had them."""
    detail: dict[str, object] = {
        "offsets": [n.offset for n in notices],
        "message_ids": [n.message_id for n in notices],
        "senders": [n.sender for n in notices],
        "removed_ms": notices[0].removed_ms,
    }
    if recovered:
        detail["recovered"] = True
    mid = notices[0].message_id if len(notices) == 1 else ""
    return AuditItem("deliver.expired", "broker", subscriber, mid, reason, detail)
