"""The partner directory and key bundles: certified signing keys, what each partner may
see of the others, key-bundle registration, and who may receive a label on a topic.

ExchangeCore (broker.exchange.facade) holds one PartnerDirectory and delegates its
directory, key and recipient calls to it; this module holds no gRPC code.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.audit import AuditItem
from broker.config import BrokerConfig
from broker.errors import Exhausted, Forbidden, InvalidInput, NotAuthenticated, NotFound
from broker.exchange.decisions import DecisionFn
from broker.exchange.memo import Memo
from broker.registry import PartnerRecord, PartnerRegistry
from coalition.hybrid import HybridPublicKey
from coalition.identity import (
    IdentityError,
    certified_hybrid_key,
    datetime_to_ms,
    verify_key_bundle,
    verify_signing_cert,
)
from coalition.labels import Label, LabelError
from coalition.policy import Decision, PartnerPolicy, PartnerStatus, decide_origination, eligibility
from coalition.topics import TopicError, validate_topic
from coalition.v1 import directory_pb2, label_pb2

Clock = Callable[[], int]
SIGNER_MEMO_SIZE = 4096
# A key bundle is a public key, ids, times and its signatures (about 1.3 KB, 4.7 KB with
# the 3,309-byte ML-DSA-65 one): a larger one is refused before it is verified or stored
# (each one is a registry write).
MAX_KEY_BUNDLE_BYTES = 16 << 10


class ForeignKeys(Protocol):
    """Peer nations' partners (broker.federation.directory.ForeignDirectory)."""

    def is_gateway(self, code: str) -> bool: ...
    def entries(self, caller: PartnerPolicy) -> list[directory_pb2.DirectoryEntry]: ...
    def recipients(self, label: Label, topic: str) -> list[str]: ...


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
    certificate and the CA's are both valid. Checked against the clock at every use.
    ``hybrid`` is the Ed25519 + ML-DSA-65 key the same certificate certifies, if any."""

    key: Ed25519PublicKey
    not_before_ms: int
    not_after_ms: int
    hybrid: HybridPublicKey | None = None
    der: bytes = b""  # the certificate: a hit holds only while it is still the current one

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


class PartnerDirectory:
    """Partners' certified signing keys and key bundles, and who may see or receive what.

    label parses a label proto (memoized, see broker.exchange.decisions), decided memoizes a policy
    decision, and on_change records a registry change's audit entry (see
    AuditKeeping.registry_changed); all three are shared with the publish pipeline.
    """

    def __init__(
        self,
        cfg: BrokerConfig,
        registry: PartnerRegistry,
        ca_cert: x509.Certificate,
        clock: Clock,
        *,
        label: Callable[[label_pb2.Label], Label],
        decided: Callable[[DecisionFn, PartnerPolicy, Label, str, int], Decision],
        on_change: Callable[[], Awaitable[None]],
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.ca_cert = ca_cert
        self.clock = clock
        self._label = label
        self._decided = decided
        self.registry_changed = on_change
        self._signers: Memo[tuple[str, str], CertifiedKey] = Memo(SIGNER_MEMO_SIZE)
        self._key_changes: dict[str, deque[int]] = {}
        # Federation (broker.federation.directory): peers' partners joining the answers.
        self.foreign: ForeignKeys | None = None

    def signer(self, sender: str, key_id: str) -> Ed25519PublicKey:
        """The certified signing key of sender, valid now by the broker's clock (see
        certified)."""
        return self.certified(sender, key_id).key

    def hybrid_signer(self, sender: str, key_id: str) -> HybridPublicKey:
        """sender's certified Ed25519 + ML-DSA-65 key, valid now: what a v2 envelope's
        root verifies under. The same cache and errors as signer, and KeyError when the
        certificate certifies no ML-DSA-65 key (the sender signs v1 only)."""
        hybrid = self.certified(sender, key_id).hybrid
        if hybrid is None:
            raise KeyError(sender)
        return hybrid

    def certified(self, sender: str, key_id: str) -> CertifiedKey:
        """The certified signing key of sender (both halves), valid now by the broker's clock.

        Raises SigningCertNotValid (a KeyError) when its certificate or the CA's is expired
        or not yet valid, KeyError when the key is unknown or not certified. The parsed key
        is cached with its validity period, which is compared with the clock at every use,
        so a certificate that expires while the broker runs stops verifying then.
        """
        now = self.clock()
        cached = self._signers.get((sender, key_id))
        rec = self.registry.get(sender)
        if cached is not None and (rec is None or rec.signing_cert != cached.der):
            cached = None  # replaced by operators (a rekey): the old key signs nothing new
        if cached is None:
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
                hybrid = certified_hybrid_key(cert)
            except IdentityError as exc:
                raise KeyError(sender) from exc
            cached = CertifiedKey(key, *period, hybrid, rec.signing_cert)
            self._signers.put((sender, key_id), cached)
        cached.check(sender, now)
        return cached

    def record(self, partner: str) -> PartnerRecord:
        """partner's record, or NotAuthenticated unknown_partner if it is not registered."""
        rec = self.registry.get(partner)
        if rec is None:
            raise NotAuthenticated("unknown_partner", f"partner {partner} is not registered")
        return rec

    def directory(self, partner: str) -> list[directory_pb2.DirectoryEntry]:
        """What partner needs to verify and encrypt, and nothing about others' standing.

        Every admitted partner's signing certificate (active or suspended alike, so the
        list does not change when one is suspended), with no status and no groups; a key
        bundle only for the caller itself and for partners it may send to (may_reach:
        a policy it may originate under that they are cleared for, and a topic it may
        publish that they may subscribe to). Not-yet-admitted partners are not listed.
        Refuses a caller that is not registered, not admitted or suspended.
        """
        caller = self.admitted(partner)
        out = []
        foreign = self.foreign
        for rec in self.registry.all():
            if rec.code != partner and rec.policy.status is PartnerStatus.PENDING:
                continue
            if foreign is not None and foreign.is_gateway(rec.code):
                continue
            entry = directory_pb2.DirectoryEntry(
                partner=rec.code,
                signing_cert=rec.signing_cert,
                previous_signing_certs=rec.previous_certs,
            )
            if rec.bundle is not None and (
                rec.code == partner or may_reach(caller.policy, rec.policy)
            ):
                entry.key_bundle.CopyFrom(rec.bundle)
            out.append(entry)
        return out + (foreign.entries(caller.policy) if foreign is not None else [])

    def directory_entry(self, partner: str) -> directory_pb2.DirectoryEntry:
        """The operators' full view of one partner: certificate, bundle, status and groups."""
        rec = self.partner_record(partner)
        entry = directory_pb2.DirectoryEntry(
            partner=rec.code,
            signing_cert=rec.signing_cert,
            status=directory_pb2.PartnerStatus.ValueType(int(rec.policy.status)),
            groups=sorted(rec.policy.groups),
            previous_signing_certs=rec.previous_certs,
        )
        if rec.bundle is not None:
            entry.key_bundle.CopyFrom(rec.bundle)
        return entry

    def admitted(self, partner: str) -> PartnerRecord:
        """partner's record if it is admitted and not suspended; else the refusal.

        The auth interceptor refuses partners that are not admitted before any Exchange
        call; this holds the same line in the core.
        """
        rec = self.record(partner)
        if rec.policy.status is PartnerStatus.PENDING:
            raise Forbidden("not_admitted", f"partner {partner} is not yet admitted by operators")
        if rec.policy.status is PartnerStatus.SUSPENDED:
            raise Forbidden("suspended", f"partner {partner} is suspended")
        return rec

    async def register_keys(self, partner: str, signed: directory_pb2.SignedKeyBundle) -> str:
        """Verify a key bundle under the partner's certified key and make it current."""
        rec = self.record(partner)
        now = self.clock()
        if (size := signed.ByteSize()) > MAX_KEY_BUNDLE_BYTES:
            raise InvalidInput(
                "bad_key_bundle",
                f"key bundle refused: it is {size} bytes; at most {MAX_KEY_BUNDLE_BYTES} are taken",
            )
        try:
            cert = x509.load_der_x509_certificate(rec.signing_cert)
            certified = self.certified(partner, format(cert.serial_number, "x"))
            bundle = verify_key_bundle(signed, certified.hybrid or certified.key, partner, now)
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
                    " if the partner's keys were issued again, operators replace the"
                    " certificate they hold with its current one ('coalition-admin partners"
                    " rekey'), and the node must run with the keys of that certificate)"
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
        rec = self.admitted(partner)
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
        local = self.eligible(label, topic, exclude=partner)
        return local + (self.foreign.recipients(label, topic) if self.foreign else [])

    def partner_record(self, partner: str) -> PartnerRecord:
        rec = self.registry.get(partner)
        if rec is None:
            raise NotFound("unknown_partner", f"no partner {partner!r} is registered")
        return rec


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
