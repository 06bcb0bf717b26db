"""Egress: the link that forwards to one peer nation what this broker releases to it.

The link is an internal subscriber of this broker's exchange under the peer's registry
entry (the gateway the operators admitted): the delivery loop reads, routes and records
as for any partner, with the peer's release policy and the link's rule
(``broker.federation.state.LinkRoute``: only this nation's own senders, only when a
key is wrapped for a recipient of the peer's nation). Each batch is pushed over the
peer's ``Federation.Forward`` stream; each receipt is verified against the peer's CA
and recorded in this broker's audit chain (``federation.receipt``) before the message
is acknowledged, so the cursor never passes a message whose custody is not proven. A
link that fails (peer down, bad receipt) ends its subscription; what was not
acknowledged is sent again on the next connection and answered ``duplicate``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.audit import AuditItem
from broker.config import BrokerConfig
from broker.errors import BrokerError, Unavailable
from broker.exchange.facade import ExchangeCore
from broker.exchange.live import Subscription
from broker.exchange.outcomes import DeliveryBatch, ExpiryBatch
from broker.federation.state import FederationState, LinkRoute
from broker.store import StoredMessage, StoreError
from coalition.federation import (
    MAX_FORWARD_ITEMS,
    RETRY_REASONS,
    FederationError,
    verify_receipt,
)
from coalition.identity import signing_key_id
from coalition.v1 import directory_pb2, envelope_pb2, federation_pb2

log = logging.getLogger("coalition.broker.federation")

# One Forward request carries at most this many envelope bytes (below the peer's
# default request limit, with room for the certificates).
REQUEST_BYTES = 3 << 20
RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)
# How often a link asks its peer again which of its partners our senders may seal for.
DIRECTORY_REFRESH_S = 10.0
IDLE_POLL_S = 0.2


class LinkDown(Exception):
    """The peer could not be reached or answered wrongly; str() says why."""


class Transport(Protocol):
    """One open Forward stream to a peer (broker.grpc.federation makes it)."""

    async def send(
        self, items: Sequence[federation_pb2.ForwardedEnvelope]
    ) -> list[federation_pb2.SignedReceipt]: ...

    async def directory(self) -> list[directory_pb2.DirectoryEntry]: ...

    def on_end(self, callback: Callable[[], None]) -> None:
        """Call callback once the Forward stream has ended (the peer closed it, say)."""

    async def close(self) -> None: ...


Connect = Callable[[str], Awaitable[Transport]]


class Link:
    """The outbound link to one peer nation; ``run`` until cancelled."""

    def __init__(
        self,
        cfg: BrokerConfig,
        exchange: ExchangeCore,
        state: FederationState,
        nation: str,
        connect: Connect,
        learn: Callable[[str, Sequence[directory_pb2.DirectoryEntry]], int],
    ) -> None:
        self.cfg = cfg
        self.exchange = exchange
        self.state = state
        self.nation = nation
        self.connect = connect
        self.learn = learn
        self.counters = state.counters[nation]
        self.wake = asyncio.Event()  # a registry change: look at the peer's status again

    async def run(self) -> None:
        failures = 0
        while True:
            rec = self.exchange.registry.get(self.nation)
            if rec is None or not self.state.admitted(self.nation, rec):
                failures = 0
                self.wake.clear()
                try:
                    async with asyncio.timeout(IDLE_POLL_S * 5):
                        await self.wake.wait()
                except TimeoutError:
                    pass
                continue
            try:
                await self._serve(rec.policy.subscribe_topics)
                failures = 0
            except (LinkDown, BrokerError, FederationError) as exc:
                self.counters.last_error = str(exc)
                log.warning("federation link to %s: %s", self.nation, exc)
                failures += 1
            except Exception as exc:  # the audit log, the store: the link retries, never dies
                self.counters.last_error = str(exc)
                log.exception("federation link to %s failed", self.nation)
                failures += 1
            self.wake.clear()
            try:
                async with asyncio.timeout(RETRY_S[min(failures, len(RETRY_S) - 1)]):
                    await self.wake.wait()
            except TimeoutError:
                pass

    async def _serve(self, topics: Sequence[str]) -> None:
        transport = await self.connect(self.nation)
        refresh: asyncio.Task[None] | None = None
        try:
            # First the peer's directory: a peer that does not (yet) admit our gateway
            # refuses it here, before anything is read for the link.
            self.learn(self.nation, await transport.directory())
            refresh = asyncio.create_task(self._refresh(transport))
            sub = self.exchange.open_subscription(self.nation, topics, self.cfg.subscriber_window)
            sub.gateway = LinkRoute(self.state, self.nation)
            # The peer ending the stream (a suspension there) ends the link at once.
            transport.on_end(lambda: _peer_ended(sub, self.nation))
            self.counters.connected = True
            self.counters.last_error = ""
            try:
                async for item in self.exchange.deliveries(sub):
                    if isinstance(item, DeliveryBatch):
                        done = await self._forward(transport, item.messages, item.headers)
                        await self.exchange.acknowledge(sub, done)
                        await self._note_lag()
                    elif isinstance(item, ExpiryBatch):
                        self.exchange.note_acks(sub, [n.offset for n in item.notices])
            finally:
                self.counters.connected = False
                self.exchange.close_subscription(sub)
        finally:
            if refresh is not None:
                refresh.cancel()
            await transport.close()

    async def _refresh(self, transport: Transport) -> None:
        """Learn the peer's directory again every DIRECTORY_REFRESH_S while linked."""
        while True:
            await asyncio.sleep(DIRECTORY_REFRESH_S)
            try:
                self.learn(self.nation, await transport.directory())
            except (LinkDown, BrokerError) as exc:
                log.warning("directory of %s not refreshed: %s", self.nation, exc)

    async def _note_lag(self) -> None:
        try:
            self.counters.lag = await self.exchange.store.backlog_count(self.nation)
        except StoreError:
            pass

    def _signing_cert(self, m: StoredMessage, key_id: str) -> bytes:
        """The originator's certificate the message is signed under (current or earlier)."""
        rec = self.exchange.registry.get(m.sender)
        if rec is None:
            raise LinkDown(f"sender {m.sender} of offset {m.offset} is no longer registered")
        for der in (rec.signing_cert, *rec.previous_certs):
            if signing_key_id(x509.load_der_x509_certificate(der)) == key_id:
                return der
        raise LinkDown(f"no certificate of {m.sender} has signing key id {key_id}")

    async def _forward(
        self,
        transport: Transport,
        messages: Sequence[StoredMessage],
        headers: Sequence[envelope_pb2.Header],
    ) -> list[int]:
        """Send messages, verify and record their receipts; the offsets receipted.

        A receipt refused for a reason that says "not now" (``RETRY_REASONS``: the peer's
        store, or this sender's share of it, is full) is not recorded and its message is
        not acknowledged: the link waits (``RETRY_S``, growing) and sends it again, so a
        full peer delays what crosses and never loses it.
        """
        items = [
            federation_pb2.ForwardedEnvelope(
                envelope=m.envelope, signing_cert=self._signing_cert(m, h.signing_key_id)
            )
            for m, h in zip(messages, headers, strict=True)
        ]
        pending = list(range(len(messages)))
        attempt = 0
        while True:
            receipts = await self._send(transport, [items[i] for i in pending])
            now = self.exchange.clock()
            audits, again = [], []
            checked: dict[bytes, Ed25519PublicKey] = {}  # the answer's signer, checked once
            for i, signed in zip(pending, receipts, strict=True):
                r = self._verified(messages[i], signed, now, checked)
                if r.outcome == federation_pb2.RECEIPT_REFUSED and r.reason_code in RETRY_REASONS:
                    again.append(i)
                    continue
                audits.append(_receipt_item(self.nation, messages[i], r, signed))
                self._count(r.outcome)
            if audits:
                await self.exchange.audit.record_many(audits, now_ms=now)
                self.counters.receipts += len(audits)
            if not again:
                return [m.offset for m in messages]
            self.counters.retried += len(again)
            log.warning("nation %s cannot take %d now; resending", self.nation, len(again))
            await asyncio.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])
            if not self.state.admitted(self.nation, self.exchange.registry.get(self.nation)):
                raise LinkDown(f"nation {self.nation} is no longer admitted here")
            attempt += 1
            pending = again

    async def _send(
        self, transport: Transport, items: Sequence[federation_pb2.ForwardedEnvelope]
    ) -> list[federation_pb2.SignedReceipt]:
        """items in requests of at most MAX_FORWARD_ITEMS envelopes and REQUEST_BYTES."""
        receipts: list[federation_pb2.SignedReceipt] = []
        start = 0
        while start < len(items):
            end, size = start, 0
            while (
                end < len(items)
                and end - start < MAX_FORWARD_ITEMS
                and (end == start or size + len(items[end].envelope) <= REQUEST_BYTES)
            ):
                size += len(items[end].envelope)
                end += 1
            got = await transport.send(items[start:end])
            if len(got) != end - start:
                raise LinkDown(f"the peer answered {len(got)} receipts for {end - start} envelopes")
            receipts.extend(got)
            start = end
        return receipts

    def _verified(
        self,
        m: StoredMessage,
        signed: federation_pb2.SignedReceipt,
        now: int,
        checked: dict[bytes, Ed25519PublicKey],
    ) -> federation_pb2.CustodyReceipt:
        """The receipt for m, verified against the peer's CA; LinkDown if it is not."""
        r = verify_receipt(signed, self.state.trust.peers[self.nation].ca_cert, now, checked)
        if r.envelope_sha256 != m.digest or r.gateway != self.state.trust.nation:
            raise LinkDown(f"the receipt for offset {m.offset} is not for what was sent")
        if r.receiver_nation != self.nation:
            raise LinkDown(f"the receipt for offset {m.offset} names {r.receiver_nation}")
        return r

    def _count(self, outcome: int) -> None:
        if outcome == federation_pb2.RECEIPT_STORED:
            self.counters.forwarded += 1
        elif outcome == federation_pb2.RECEIPT_DUPLICATE:
            self.counters.duplicates += 1
        else:
            self.counters.refused_by_peer += 1


def _peer_ended(sub: Subscription, nation: str) -> None:
    if sub.closed is None:
        sub.closed = Unavailable("peer_closed", f"nation {nation}'s broker ended the link")
    sub.wake.set()


def _receipt_item(
    nation: str,
    m: StoredMessage,
    r: federation_pb2.CustodyReceipt,
    signed: federation_pb2.SignedReceipt,
) -> AuditItem:
    """federation.receipt: the receipt itself, so this record alone proves custody."""
    outcome = federation_pb2.ReceiptOutcome.Name(r.outcome).removeprefix("RECEIPT_").lower()
    b64 = base64.b64encode
    return AuditItem(
        "federation.receipt",
        "broker",
        m.sender,
        m.message_id,
        outcome,
        {
            "peer": nation,
            "offset": m.offset,
            "sha256": m.digest.hex(),
            "peer_audit_seq": r.audit_seq,
            "reason": r.reason_code,
            "receipt": b64(signed.receipt).decode(),
            "signature": b64(signed.signature).decode(),
            "signer_cert": b64(signed.signer_cert).decode(),
        },
    )
