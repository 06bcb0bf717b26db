"""Ingress: envelopes a peer nation's gateway forwards, checked, stored and receipted.

Per envelope, in order: its size; the originator's signing certificate, issued by the
CA the trust file names for the gateway's nation to a sender that speaks for that
nation and is not a local partner; the signature (v1, or v2's path and hybrid root)
under that certificate; the kernel's header checks (``coalition.checks``, the created
time bounded by the retention period rather than the skew window: a link may deliver a
backlog); the gateway's origination policy. Then one store append (its acceptance
records in the same commit; a copy already stored is a duplicate), the decisions in
the audit chain (``federation.received``, ``.duplicate``, ``.refused``), and a custody
receipt per envelope signed with the broker's audit key naming its decision's seq.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509

from broker.audit import AuditItem
from broker.audit.items import acceptance_item, encode
from broker.config import BrokerConfig
from broker.errors import BrokerError, Forbidden, InvalidInput, NotAuthenticated, Unavailable
from broker.exchange.directory import CertifiedKey
from broker.exchange.facade import ExchangeCore
from broker.exchange.signatures import EnvelopeSignatures
from broker.federation.state import FederationState
from broker.store import Appended, NewMessage, StoredMessage, StoreFull, stored_message
from coalition.checks import HeaderProblem, check_header, clock_skew_problem
from coalition.federation import FederationError, sign_receipt, verify_foreign_signing_cert
from coalition.identity import (
    IdentityError,
    IdentityKind,
    certified_hybrid_key,
    datetime_to_ms,
    identity_from_cert,
    signing_key_id,
)
from coalition.labels import Label
from coalition.policy import decide_origination
from coalition.v1 import envelope_pb2, federation_pb2

log = logging.getLogger("coalition.broker.federation")

STORED = federation_pb2.RECEIPT_STORED
DUPLICATE = federation_pb2.RECEIPT_DUPLICATE
REFUSED = federation_pb2.RECEIPT_REFUSED


@dataclass
class _Item:
    """One forwarded envelope on its way: what is known of it, and its outcome."""

    digest: bytes
    sender: str = ""
    message_id: str = ""
    msg: NewMessage | None = None
    parsed: tuple[envelope_pb2.Header, Label] | None = None
    error: BrokerError | None = None
    outcome: int = REFUSED
    offset: int = 0


class Ingress:
    """The receiving side of every peer's links."""

    def __init__(
        self,
        cfg: BrokerConfig,
        exchange: ExchangeCore,
        state: FederationState,
        clock: Callable[[], int],
    ) -> None:
        self.cfg = cfg
        self.exchange = exchange
        self.state = state
        self.clock = clock
        self._certs: dict[tuple[str, str], CertifiedKey] = {}
        self._signatures = EnvelopeSignatures(self._certified)

    def _certified(self, sender: str, key_id: str) -> CertifiedKey:
        return self._certs[(sender, key_id)]  # KeyError: the envelope names another key

    async def receive(
        self, nation: str, items: Sequence[federation_pb2.ForwardedEnvelope]
    ) -> list[federation_pb2.SignedReceipt]:
        """One receipt per item, in order, each decision durable in the audit chain.

        Raises Forbidden when the gateway is no longer admitted and active, Unavailable
        when its decisions cannot be stored or audited (nothing is receipted then; the
        link sends again and stored ones come back ``duplicate``).
        """
        if not self.state.admitted(nation, self.exchange.registry.get(nation)):
            raise Forbidden("suspended", f"the gateway of nation {nation} is not active")
        if not items:
            return []
        now = self.clock()
        done = [self._check(nation, it, now) for it in items]
        fresh = await self._store(nation, done, now)
        items_audit = [_decision(nation, it) for it in done]
        try:
            seqs = await self.exchange.audit.record_many(items_audit, now_ms=now)
        except Exception as exc:  # AuditError and the backends' own
            log.critical("federation decisions not audited: %s", exc)
            raise Unavailable(
                "audit_unavailable", "the receiving broker cannot audit its decisions now"
            ) from exc
        counters = self.state.counters[nation]
        counters.received += sum(1 for it in done if it.outcome == STORED)
        counters.refused += sum(1 for it in done if it.outcome == REFUSED)
        if fresh:
            # Durable with their acceptance records: local subscribers may have them now.
            if self.cfg.live_delivery:
                self.exchange.streams.hand_over(fresh)
            self.exchange.wake_all()
            self.exchange.pipeline.on_stored(max(m.offset for m in fresh))
        return [self._receipt(nation, it, seq, now) for it, seq in zip(done, seqs, strict=True)]

    def _check(self, nation: str, item: federation_pb2.ForwardedEnvelope, now: int) -> _Item:
        out = _Item(hashlib.sha256(item.envelope).digest())
        try:
            self._verify(nation, item, now, out)
        except BrokerError as err:
            out.error = err.with_traceback(None)
            out.msg = out.parsed = None
        return out

    def _verify(
        self, nation: str, item: federation_pb2.ForwardedEnvelope, now: int, out: _Item
    ) -> None:
        raw = item.envelope
        if len(raw) > self.cfg.max_envelope_bytes:
            raise InvalidInput(
                "oversized",
                f"envelope is {len(raw)} bytes; the limit is {self.cfg.max_envelope_bytes}",
            )
        peer = self.state.trust.peers[nation]
        try:
            cert = x509.load_der_x509_certificate(item.signing_cert)
            who = identity_from_cert(cert)
        except (ValueError, IdentityError) as exc:
            raise NotAuthenticated("bad_signing_cert", f"originator certificate: {exc}") from exc
        if who.kind is not IdentityKind.PARTNER:
            raise NotAuthenticated("bad_signing_cert", f"{who.uri} is not a partner")
        sender = out.sender = who.name
        try:
            key = verify_foreign_signing_cert(item.signing_cert, peer, sender, now)
        except FederationError as exc:
            raise Forbidden(exc.code, exc.message) from exc
        # The registry entry named by the nation code is its gateway; any other entry
        # with this code is a local partner (admission refuses that; this holds it too).
        if sender != nation and self.exchange.registry.get(sender) is not None:
            raise Forbidden(
                "local_partner", f"{sender} is a partner of this broker, not of nation {nation}"
            )
        period = (
            datetime_to_ms(max(cert.not_valid_before_utc, peer.ca_cert.not_valid_before_utc)),
            datetime_to_ms(min(cert.not_valid_after_utc, peer.ca_cert.not_valid_after_utc)),
        )
        kid = signing_key_id(cert)
        self._certs = {(sender, kid): CertifiedKey(key, *period, certified_hybrid_key(cert))}
        try:
            env = envelope_pb2.Envelope.FromString(raw)
            header = self._signatures.verify(sender, env)
        except BrokerError:
            raise
        except Exception as exc:  # DecodeError
            raise InvalidInput("malformed", f"envelope is malformed: {exc}") from exc
        out.message_id = header.message_id
        try:
            label = check_header(
                header, sender, parse_label=self.exchange.decisions.label, now_ms=None
            )
        except HeaderProblem as exc:
            raise InvalidInput(exc.code, exc.message) from exc
        ahead = clock_skew_problem(header.created_ms, now, self.cfg.clock_skew_ms, "this broker's")
        if header.created_ms > now and ahead is not None:
            raise InvalidInput("clock_skew", ahead)
        if self.cfg.retention_ms and now - header.created_ms > self.cfg.retention_ms:
            raise InvalidInput("too_old", "created before this broker's retention period")
        gateway = self.exchange.registry.get(nation)
        assert gateway is not None  # receive() checked
        d = self.exchange.decisions.decided(
            decide_origination, gateway.policy, label, header.topic, now
        )
        if not d.allowed:
            raise Forbidden(d.reason.value, f"{nation}'s origination policy: {d.explanation}")
        out.parsed = (header, label)
        out.msg = NewMessage(
            message_id=header.message_id,
            sender=sender,
            sequence=header.sequence,
            topic=header.topic,
            precedence=int(header.precedence),
            classification=int(label.classification),
            label=header.label.SerializeToString(),
            created_ms=header.created_ms,
            expiry_ms=label.expiry_time_ms,
            envelope=raw,
            digest=out.digest,
            forwarded=True,
        )

    async def _store(self, nation: str, done: list[_Item], now: int) -> list[StoredMessage]:
        todo = [it for it in done if it.msg is not None]
        if not todo:
            return []
        msgs = [it.msg for it in todo if it.msg is not None]
        via = f"gateway:{nation}"

        def records(stored: Sequence[StoredMessage]) -> list[str]:
            return [encode(acceptance_item(m, via=via)) for m in stored]

        try:
            results = await self.exchange.store.append(msgs, now, records=records)
        except StoreFull as exc:
            for it in todo:
                it.error = Unavailable("store_full", str(exc))
            return []
        except Exception as exc:
            raise Unavailable("store_unavailable", f"the message store failed: {exc}") from exc
        self.exchange.books.recorded()
        fresh = []
        for it, res in zip(todo, results, strict=True):
            assert it.msg is not None and it.parsed is not None
            if isinstance(res, Appended):
                it.outcome, it.offset = STORED, res.offset
                self.exchange.delivery.remember(res.offset, it.parsed)
                fresh.append(stored_message(it.msg, res.offset, now))
            elif res.reason == "duplicate_id":
                it.outcome = DUPLICATE
            else:
                it.error = Unavailable(res.reason, f"not stored: {res.reason}")
        return fresh

    def _receipt(self, nation: str, it: _Item, seq: int, now: int) -> federation_pb2.SignedReceipt:
        receipt = federation_pb2.CustodyReceipt(
            envelope_sha256=it.digest,
            sender=it.sender,
            message_id=it.message_id,
            outcome=REFUSED if it.error is not None else it.outcome,  # type: ignore[arg-type]
            reason_code=it.error.code if it.error else "",
            reason=it.error.message if it.error else "",
            audit_seq=seq,
            receiver_nation=self.state.trust.nation,
            gateway=nation,
            time_ms=now,
        )
        return sign_receipt(receipt, self.state.audit_key, self.state.audit_cert_der)


def _decision(nation: str, it: _Item) -> AuditItem:
    """The audit entry of one forwarded envelope's outcome."""
    detail: dict[str, object] = {"gateway": nation, "sha256": it.digest.hex()}
    if it.error is not None:
        detail["reason"] = it.error.message
        return AuditItem(
            "federation.refused",
            f"gateway:{nation}",
            it.sender,
            it.message_id,
            it.error.code,
            detail,
        )
    if it.outcome == DUPLICATE:
        return AuditItem(
            "federation.duplicate",
            f"gateway:{nation}",
            it.sender,
            it.message_id,
            "duplicate",
            detail,
        )
    detail["offset"] = it.offset
    return AuditItem(
        "federation.received", f"gateway:{nation}", it.sender, it.message_id, "allow", detail
    )
