"""The Admin core: partner admission, versioned policy changes with a two-person rule,
audit verification and the operators' views. It takes and returns domain values
(``broker.admin_types``); ``broker.grpc.admin`` translates them to and from protobuf.

Its collaborators are its own: the registry, the message store, the audit log, the
registry's audit outbox (``RegistryAudit``) and ``ExchangeLink``, the exchange's live side.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.admin_types import (
    AuditVerdict,
    BrokerStats,
    ExchangeLink,
    PartnerStats,
    PartnerSummary,
    PartnerView,
    PolicyChange,
    ReceiverDecision,
    RegistryAudit,
)
from broker.audit import AuditBackend, AuditError, AuditItem
from broker.errors import AlreadyExists, Forbidden, InvalidInput, NotFound, Precondition
from broker.federation.admission import check_admission
from broker.federation.view import FederationView
from broker.registry import PartnerRecord, PartnerRegistry, StaleVersion, pending_policy
from broker.store import MessageStore
from coalition.federation import TrustFile
from coalition.labels import Label
from coalition.policy import (
    PartnerPolicy,
    PartnerStatus,
    eligibility,
    policy_diff,
    policy_from_proto,
    privilege_raises,
)
from coalition.topics import TopicError, validate_topic
from coalition.v1 import audit_pb2, policy_pb2

log = logging.getLogger("coalition.broker.admin")


class AdminCore:
    """Operator actions. Every action, allowed or refused, is audited.

    Refusals are ``broker.errors`` domain errors; the caller audits them with
    ``refused()`` (the servicer does, for every action).
    """

    def __init__(
        self,
        registry: PartnerRegistry,
        store: MessageStore,
        audit: AuditBackend,
        registry_audit: RegistryAudit,
        exchange: ExchangeLink,
        ca_cert: x509.Certificate,
        clock: Callable[[], int],
        audit_public_key: Ed25519PublicKey,
        audit_certificate: bytes = b"",
    ) -> None:
        self.registry = registry
        self.store = store
        self.audit = audit
        self.registry_audit = registry_audit
        self.exchange = exchange
        self.ca_cert = ca_cert
        self.clock = clock
        self.audit_public_key = audit_public_key
        # DER of the CA-issued certificate for audit_public_key ("" when not configured):
        # ExportAudit sends it so an export verifies offline with only the CA certificate.
        self.audit_certificate = audit_certificate
        self.trust: TrustFile | None = None  # federation: peers are admitted by CA
        self.federation: FederationView | None = None  # federation: ListPeers

    def record(self, partner: str) -> PartnerRecord:
        """partner's record, or NotFound ``unknown_partner``."""
        rec = self.registry.get(partner)
        if rec is None:
            raise NotFound("unknown_partner", f"no partner {partner!r} is registered")
        return rec

    async def refused(
        self, operator: str, action: str, code: str, message: str, partner: str = ""
    ) -> None:
        """Audit a refused admin action (the servicer then returns the error)."""
        await self.audit.record(
            kind="admin.refused",
            actor=operator,
            partner=partner,
            decision=code,
            detail={"action": action, "reason": message},
            now_ms=self.clock(),
        )

    # -- admission and policy -------------------------------------------------------------
    async def admit(
        self,
        operator: str,
        partner: str,
        signing_cert: bytes,
        policy: PartnerPolicy,
        reason: str,
    ) -> PolicyChange:
        """Register a partner as PENDING and propose its policy for a second operator.

        Refused: AlreadyExists ``already_registered``, InvalidInput ``bad_signing_cert``
        (not issued by the CA to partner, or not valid now) or ``partner_mismatch``
        (policy names another partner), and whatever a policy change is refused with.
        """
        now = self.clock()
        if self.registry.get(partner) is not None:
            raise AlreadyExists("already_registered", f"partner {partner} is already registered")
        check_admission(self.ca_cert, self.trust, self.registry, partner, signing_cert, now)
        if policy.partner != partner:
            raise InvalidInput("partner_mismatch", "the policy names another partner")
        if policy.status is PartnerStatus.PENDING:
            policy = dataclasses.replace(policy, status=PartnerStatus.ACTIVE)
        await self.registry.register(
            partner,
            signing_cert,
            pending_policy(partner),
            actor=operator,
            reason=reason or "admission requested",
            now_ms=now,
            audit=AuditItem(
                "partner.registered", operator, partner, "", "allow", {"reason": reason}
            ),
        )
        await self.registry_audit.registry_changed()
        return await self._change(operator, policy, reason or "admit partner", expected=0)

    async def set_policy(
        self, operator: str, policy: PartnerPolicy, reason: str, expected: int
    ) -> PolicyChange:
        """Apply a lowering change at once, or propose a privilege-raising one.

        Refused: NotFound ``unknown_partner``, Precondition ``stale_version`` (expected
        is not 0 and not the current version), InvalidInput ``no_change``.
        """
        return await self._change(operator, policy, reason, expected=expected)

    async def set_status(
        self, operator: str, partner: str, status: PartnerStatus, reason: str
    ) -> PolicyChange:
        """Suspend (applied at once) or reinstate (proposed) partner, as set_policy."""
        rec = self.record(partner)
        return await self._change(
            operator, dataclasses.replace(rec.policy, status=status), reason, expected=0
        )

    async def _change(
        self, operator: str, policy: PartnerPolicy, reason: str, *, expected: int
    ) -> PolicyChange:
        rec = self.record(policy.partner)
        if expected and expected != rec.version:
            raise Precondition(
                "stale_version",
                f"policy of {policy.partner} is at version {rec.version}, not {expected}",
            )
        diff = policy_diff(rec.policy, policy)
        if not diff:
            raise InvalidInput("no_change", f"the policy of {policy.partner} already says that")
        raises = privilege_raises(rec.policy, policy)
        now = self.clock()
        if raises:
            prop = await self.registry.propose(
                policy,
                base_version=rec.version,
                proposed_by=operator,
                reason=reason,
                diff=diff,
                now_ms=now,
                audit=lambda pid: AuditItem(
                    "policy.proposed",
                    operator,
                    policy.partner,
                    "",
                    "allow",
                    {"proposal": pid, "diff": diff, "raises": raises, "reason": reason},
                ),
            )
            await self.registry_audit.registry_changed()
            return PolicyChange(proposal=prop)
        # Against the version diffed: another operator's change is never overwritten unseen.
        pv = await self._apply(policy, operator, reason, diff, expected=rec.version)
        return PolicyChange(applied=pv)

    async def _apply(
        self, policy: PartnerPolicy, by: str, reason: str, diff: list[str], expected: int
    ) -> policy_pb2.PolicyVersion:
        """Apply a change at once (one operator: it raises no privilege)."""
        was = self.record(policy.partner).policy.status
        try:
            pv = await self.registry.apply(
                policy,
                changed_by=by,
                approved_by="",
                reason=reason,
                diff=diff,
                now_ms=self.clock(),
                expected_version=expected,
                audit=lambda v: _change_entry(policy.partner, by, "", v, diff, reason),
            )
        except StaleVersion as exc:
            what = f"the policy of {policy.partner} changed meanwhile ({exc}); read it again"
            raise Precondition("stale_version", what) from exc
        await self._applied(policy, was, pv)
        return pv

    async def _applied(
        self, policy: PartnerPolicy, was: PartnerStatus, pv: policy_pb2.PolicyVersion
    ) -> None:
        if policy.status is PartnerStatus.ACTIVE and was is not PartnerStatus.ACTIVE:
            # Deliveries start from now: the cursor of a newly active partner is the head.
            await self.store.ensure_cursor(policy.partner, await self.store.head())
        await self.registry_audit.registry_changed()
        extra = {"partner": policy.partner, "version": pv.version, "by": pv.changed_by}
        log.info("policy changed", extra={**extra, "approved_by": pv.approved_by})
        self.exchange.policy_changed(policy.partner)

    async def decide_proposal(
        self, operator: str, pid: str, *, approve: bool, reason: str
    ) -> PolicyChange:
        """Approve (a different operator) or reject a pending proposal.

        Refused: NotFound ``unknown_proposal``, Precondition ``proposal_decided`` or
        ``stale_proposal`` (the policy changed since; the proposal stays pending),
        Forbidden ``self_approval``.
        """
        found = await self.registry.proposal(pid)
        if found is None:
            raise NotFound("unknown_proposal", f"no proposal {pid!r}")
        prop, base = found
        if prop.state != policy_pb2.PROPOSAL_PENDING:
            raise Precondition("proposal_decided", f"proposal {pid} was already decided")
        if approve and prop.proposed_by == operator:
            raise Forbidden(
                "self_approval",
                f"operator {operator} proposed {pid} and cannot also approve it; "
                "a second operator must",
            )
        decided = AuditItem(
            "policy.approved" if approve else "policy.rejected",
            operator,
            prop.policy.partner,
            "",
            "allow",
            {"proposal": pid, "proposed_by": prop.proposed_by, "reason": reason},
        )
        already = Precondition("proposal_decided", f"proposal {pid} was already decided")
        if not approve:
            rejected = policy_pb2.PROPOSAL_REJECTED
            if not await self.registry.decide_proposal(
                pid, state=rejected, decided_by=operator, now_ms=self.clock(), audit=decided
            ):
                raise already
            await self.registry_audit.registry_changed()
            prop.state, prop.decided_by = rejected, operator
            return PolicyChange(proposal=prop)
        policy, diff = policy_from_proto(prop.policy), list(prop.diff)
        was = self.record(policy.partner).policy.status
        try:
            # Decided and applied in one commit: never approved and left unapplied.
            pv = await self.registry.approve(
                pid,
                decided_by=operator,
                now_ms=self.clock(),
                audit=lambda v: [
                    decided,
                    _change_entry(policy.partner, prop.proposed_by, operator, v, diff, prop.reason),
                ],
            )
        except StaleVersion as exc:
            # Nothing was written: it stays pending so an operator can reject it or propose again.
            raise Precondition(
                "stale_proposal",
                f"the policy of {policy.partner} changed since this was proposed "
                f"(version {base}, now {exc.current}); propose again",
            ) from exc
        if pv is None:
            raise already
        await self._applied(policy, was, pv)
        return PolicyChange(applied=pv)

    async def verify(self, operator: str) -> AuditVerdict:
        """Verify the audit chain and its signed checkpoints, and the store against it.

        Each accepted message's digest was committed to the hash chain when it was
        accepted, so a row altered on disk is found even if its digest column was
        altered with it.
        """
        res = await self.audit.verify(self.audit_public_key)
        tampered = set(await self.store.verify_integrity())
        for entry in await self.audit.query(kind="publish.accepted"):
            detail = json.loads(entry.detail_json or "{}")
            offset, digest = detail.get("offset"), detail.get("digest")
            if not isinstance(offset, int) or not isinstance(digest, str):
                continue
            stored = await self.store.get(offset)
            if stored is not None and hashlib.sha256(stored.envelope).hexdigest() != digest:
                tampered.add(offset)
        problems = [res.problem] if res.problem else []
        if tampered:
            shown = ", ".join(str(o) for o in sorted(tampered)[:10])
            problems.append(
                f"{len(tampered)} stored message(s) do not match the digest the audit log "
                f"recorded at acceptance (offsets {shown})"
            )
        ok = res.ok and not tampered
        try:
            await self.audit.record(
                kind="admin.action",
                actor=operator,
                decision="allow" if ok else "verify_failed",
                detail={"action": "audit.verify", "ok": ok, "tampered": len(tampered)},
                now_ms=self.clock(),
            )
        except AuditError as exc:  # a full disk: the verdict is still worth having
            log.critical("audit.verify by %s not audited: %s", operator, exc)
        return AuditVerdict(
            ok=ok,
            entries=res.entries,
            checkpoints=res.checkpoints,
            first_broken_seq=res.first_broken_seq,
            problem="; ".join(problems),
            tampered_offsets=sorted(tampered),
        )

    # -- views --------------------------------------------------------------------------
    def summary(self, partner: str) -> PartnerSummary:
        """One partner's standing (NotFound ``unknown_partner``)."""
        rec = self.record(partner)
        return PartnerSummary(
            partner=rec.code,
            status=rec.policy.status,
            policy_version=rec.version,
            connected=self.exchange.live_streams(rec.code) > 0,
            key_id=rec.key_id,
        )

    def partners(self) -> list[PartnerSummary]:
        """Every registered partner's standing, by code."""
        return [self.summary(r.code) for r in self.registry.all()]

    async def show(self, partner: str) -> PartnerView:
        """One partner in full (NotFound ``unknown_partner``)."""
        summary = self.summary(partner)
        history = await self.registry.history(partner)
        return PartnerView(summary, history[-1], self.record(partner))

    async def policy(self, partner: str) -> policy_pb2.PolicyVersion:
        """partner's current policy version (NotFound ``unknown_partner``)."""
        return (await self.history(partner))[-1]

    async def history(self, partner: str) -> list[policy_pb2.PolicyVersion]:
        """Every policy version of partner, oldest first (NotFound ``unknown_partner``)."""
        self.record(partner)
        return await self.registry.history(partner)

    async def proposals(self, *, include_decided: bool) -> list[policy_pb2.Proposal]:
        """Pending proposals (and the decided ones with include_decided)."""
        return await self.registry.proposals(include_decided=include_decided)

    async def query_audit(
        self, *, partner: str, kind: str, since_ms: int, until_ms: int, limit: int, tail: bool
    ) -> list[audit_pb2.AuditEntry]:
        """Audit entries (AuditLog.query)."""
        return await self.audit.query(
            partner=partner,
            kind=kind,
            since_ms=since_ms,
            until_ms=until_ms,
            limit=limit,
            tail=tail,
        )

    def export_audit(self) -> AsyncIterator[audit_pb2.AuditEntry | audit_pb2.AuditCheckpoint]:
        """Every audit entry in order, with its checkpoints (AuditLog.export)."""
        return self.audit.export()

    async def audit_certificates(self) -> list[bytes]:
        """DER of the audit certificates an export needs: this broker's, then the signers'."""
        own = [self.audit_certificate] if self.audit_certificate else []
        return list(dict.fromkeys(own + await self.audit.signer_certificates()))

    async def stats(self) -> BrokerStats:
        """Store, audit and live-stream totals, and each partner's counts and backlog."""
        st = await self.store.stats()
        live_streams = self.exchange.live_streams()
        audit_entries = await self.audit.count()
        partners = []
        for rec in self.registry.all():
            # A partner not yet admitted has no cursor, so nothing is owed to it.
            has_cursor = await self.store.cursor(rec.code) is not None
            backlog = await self.store.backlog_count(rec.code) if has_cursor else 0
            partners.append(
                PartnerStats(
                    partner=rec.code,
                    counts=self.exchange.counters(rec.code),
                    live_streams=self.exchange.live_streams(rec.code),
                    backlog=backlog,
                    in_flight=self.exchange.in_flight(rec.code),
                )
            )
        return BrokerStats(
            live_streams=live_streams,
            store_messages=st.messages,
            store_bytes=st.bytes,
            audit_entries=audit_entries,
            partners=partners,
        )

    def who_receives(self, label: Label, topic: str) -> list[ReceiverDecision]:
        """A dry run of the delivery decision for every partner, with reasons
        (InvalidInput ``bad_label`` for a topic that is not one)."""
        try:
            validate_topic(topic)
        except TopicError as exc:
            raise InvalidInput("bad_label", str(exc)) from exc
        now = self.clock()
        # A peer nation's gateway has no key bundle: its row is the release decision.
        keyed = {r.code for r in self.registry.all() if r.bundle is not None}
        keyed |= set(self.trust.peers if self.trust is not None else ())
        return [
            ReceiverDecision(
                r.code, eligibility(r.policy, label, topic, now, has_keys=r.code in keyed)
            )
            for r in self.registry.all()
        ]


def _change_entry(
    partner: str, by: str, approved_by: str, version: int, diff: list[str], reason: str
) -> AuditItem:
    """The audit entry of an applied policy version."""
    detail = {"version": version, "diff": diff, "approved_by": approved_by, "reason": reason}
    return AuditItem("policy.change", by, partner, "", "allow", detail)
