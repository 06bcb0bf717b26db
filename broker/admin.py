"""The Admin core: partner admission, versioned policy changes with a two-person rule,
audit queries and statistics. Servicers translate protobuf to calls on this class.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.audit import AuditError, AuditItem, AuditLog
from broker.errors import AlreadyExists, Forbidden, InvalidInput, NotFound, Precondition
from broker.exchange import ExchangeCore
from broker.registry import Registry, StaleVersion, pending_policy
from coalition.identity import IdentityError, verify_signing_cert
from coalition.labels import LabelError, label_from_proto
from coalition.policy import (
    PartnerPolicy,
    PartnerStatus,
    PolicyError,
    eligibility,
    policy_diff,
    policy_from_proto,
    privilege_raises,
)
from coalition.topics import TopicError, validate_topic
from coalition.v1 import admin_pb2, directory_pb2, label_pb2, policy_pb2

log = logging.getLogger("coalition.broker.admin")


class AdminCore:
    """Operator actions. Every action, allowed or refused, is audited."""

    def __init__(
        self,
        exchange: ExchangeCore,
        registry: Registry,
        audit: AuditLog,
        audit_public_key: Ed25519PublicKey,
        audit_certificate: bytes = b"",
    ) -> None:
        self.ex = exchange
        self.registry = registry
        self.audit = audit
        self.audit_public_key = audit_public_key
        # DER of the CA-issued certificate for audit_public_key ("" when not configured):
        # ExportAudit sends it so an export verifies offline with only the CA certificate.
        self.audit_certificate = audit_certificate

    def _now(self) -> int:
        return self.ex.clock()

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
            now_ms=self._now(),
        )

    # -- admission and policy -------------------------------------------------------------
    async def admit(
        self,
        operator: str,
        partner: str,
        signing_cert: bytes,
        policy_pb: policy_pb2.PartnerPolicy,
        reason: str,
    ) -> admin_pb2.PolicyChangeResponse:
        """Register a partner as PENDING and propose its policy for a second operator."""
        now = self._now()
        if self.registry.get(partner) is not None:
            raise AlreadyExists("already_registered", f"partner {partner} is already registered")
        try:
            verify_signing_cert(signing_cert, self.ex.ca_cert, partner, now)
        except IdentityError as exc:
            raise InvalidInput("bad_signing_cert", f"signing certificate refused: {exc}") from exc
        policy = self._parse_policy(policy_pb, partner)
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
        await self.ex.registry_changed()
        return await self._change(operator, policy, reason or "admit partner", expected=0)

    async def set_policy(
        self, operator: str, policy_pb: policy_pb2.PartnerPolicy, reason: str, expected: int
    ) -> admin_pb2.PolicyChangeResponse:
        """Apply a lowering change at once, or propose a privilege-raising one."""
        policy = self._parse_policy(policy_pb, policy_pb.partner)
        return await self._change(operator, policy, reason, expected=expected)

    async def set_status(
        self, operator: str, partner: str, status: PartnerStatus, reason: str
    ) -> admin_pb2.PolicyChangeResponse:
        rec = self.ex.partner_record(partner)
        return await self._change(
            operator, dataclasses.replace(rec.policy, status=status), reason, expected=0
        )

    async def _change(
        self, operator: str, policy: PartnerPolicy, reason: str, *, expected: int
    ) -> admin_pb2.PolicyChangeResponse:
        rec = self.ex.partner_record(policy.partner)
        if expected and expected != rec.version:
            raise Precondition(
                "stale_version",
                f"policy of {policy.partner} is at version {rec.version}, not {expected}",
            )
        diff = policy_diff(rec.policy, policy)
        if not diff:
            raise InvalidInput("no_change", f"the policy of {policy.partner} already says that")
        raises = privilege_raises(rec.policy, policy)
        now = self._now()
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
            await self.ex.registry_changed()
            return admin_pb2.PolicyChangeResponse(proposal=prop)
        pv = await self._apply(policy, operator, "", reason, diff)
        return admin_pb2.PolicyChangeResponse(applied=pv)

    async def _apply(
        self,
        policy: PartnerPolicy,
        by: str,
        approved_by: str,
        reason: str,
        diff: list[str],
        expected: int = 0,
    ) -> policy_pb2.PolicyVersion:
        now = self._now()
        was = self.ex.partner_record(policy.partner).policy.status
        try:
            pv = await self.registry.apply(
                policy,
                changed_by=by,
                approved_by=approved_by,
                reason=reason,
                diff=diff,
                now_ms=now,
                expected_version=expected,
                audit=lambda version: AuditItem(
                    "policy.change",
                    by,
                    policy.partner,
                    "",
                    "allow",
                    {
                        "version": version,
                        "diff": diff,
                        "approved_by": approved_by,
                        "reason": reason,
                    },
                ),
            )
        except StaleVersion as exc:
            raise Precondition(
                "stale_proposal",
                f"the policy of {policy.partner} changed since this was proposed ({exc}); "
                "propose again",
            ) from exc
        if policy.status is PartnerStatus.ACTIVE and was is not PartnerStatus.ACTIVE:
            # Deliveries start from now: the cursor of a newly active partner is the head.
            await self.ex.store.ensure_cursor(policy.partner, await self.ex.store.head())
        await self.ex.registry_changed()
        log.info(
            "policy changed",
            extra={
                "partner": policy.partner,
                "version": pv.version,
                "by": by,
                "approved_by": approved_by,
            },
        )
        self.ex.policy_changed(policy.partner)
        return pv

    async def decide_proposal(
        self, operator: str, pid: str, *, approve: bool, reason: str
    ) -> admin_pb2.PolicyChangeResponse:
        """Approve (a different operator) or reject a pending proposal."""
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
        current = self.ex.partner_record(prop.policy.partner).version
        if approve and current != base:
            # Refuse before marking it approved: a stale proposal can never apply, and it
            # stays pending so that an operator can reject it or propose again.
            raise Precondition(
                "stale_proposal",
                f"the policy of {prop.policy.partner} changed since this was proposed "
                f"(version {base}, now {current}); propose again",
            )
        state = policy_pb2.PROPOSAL_APPROVED if approve else policy_pb2.PROPOSAL_REJECTED
        decided = AuditItem(
            "policy.approved" if approve else "policy.rejected",
            operator,
            prop.policy.partner,
            "",
            "allow",
            {"proposal": pid, "proposed_by": prop.proposed_by, "reason": reason},
        )
        if not await self.registry.decide_proposal(
            pid, state=state, decided_by=operator, now_ms=self._now(), audit=decided
        ):
            raise Precondition("proposal_decided", f"proposal {pid} was already decided")
        await self.ex.registry_changed()
        prop.state = state
        prop.decided_by = operator
        if not approve:
            return admin_pb2.PolicyChangeResponse(proposal=prop)
        policy = policy_from_proto(prop.policy)
        pv = await self._apply(
            policy, prop.proposed_by, operator, prop.reason, list(prop.diff), expected=base
        )
        return admin_pb2.PolicyChangeResponse(applied=pv)

    def _parse_policy(self, pb: policy_pb2.PartnerPolicy, partner: str) -> PartnerPolicy:
        if pb.partner != partner:
            raise InvalidInput("partner_mismatch", "the policy names another partner")
        try:
            return policy_from_proto(pb)
        except PolicyError as exc:
            raise InvalidInput("bad_policy", str(exc)) from exc

    async def verify(self, operator: str) -> admin_pb2.VerifyAuditResponse:
        """Verify the audit chain and its signed checkpoints, and the store against it.

        Each accepted message's digest was committed to the hash chain when it was
        accepted, so a row altered on disk is found even if its digest column was
        altered with it.
        """
        res = await self.audit.verify(self.audit_public_key)
        tampered = set(await self.ex.store.verify_integrity())
        for entry in await self.audit.query(kind="publish.accepted"):
            detail = json.loads(entry.detail_json or "{}")
            offset, digest = detail.get("offset"), detail.get("digest")
            if not isinstance(offset, int) or not isinstance(digest, str):
                continue
            stored = await self.ex.store.get(offset)
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
                now_ms=self._now(),
            )
        except AuditError as exc:  # a full disk: the verdict is still worth having
            log.critical("audit.verify by %s not audited: %s", operator, exc)
        return admin_pb2.VerifyAuditResponse(
            ok=ok,
            entries=res.entries,
            checkpoints=res.checkpoints,
            first_broken_seq=res.first_broken_seq,
            problem="; ".join(problems),
            tampered_offsets=sorted(tampered),
        )

    # -- views --------------------------------------------------------------------------
    def summary(self, partner: str) -> admin_pb2.PartnerSummary:
        rec = self.ex.partner_record(partner)
        return admin_pb2.PartnerSummary(
            partner=rec.code,
            status=directory_pb2.PartnerStatus.ValueType(rec.policy.status.value),
            policy_version=rec.version,
            connected=bool(self.ex.live.get(rec.code)),
            key_id=rec.key_id,
        )

    async def stats(self) -> admin_pb2.StatsResponse:
        st = await self.ex.store.stats()
        out = admin_pb2.StatsResponse(
            live_streams=sum(len(s) for s in self.ex.live.values()),
            store_messages=st.messages,
            store_bytes=st.bytes,
            audit_entries=await self.audit.count(),
        )
        for rec in self.registry.all():
            c = self.ex.counters[rec.code]
            # A partner not yet admitted has no cursor, so nothing is owed to it.
            has_cursor = await self.ex.store.cursor(rec.code) is not None
            backlog = await self.ex.store.backlog_count(rec.code) if has_cursor else 0
            out.partners.append(
                admin_pb2.PartnerStats(
                    partner=rec.code,
                    published=c.published,
                    delivered=c.delivered,
                    refused=c.refused,
                    live_streams=len(self.ex.live.get(rec.code, ())),
                    backlog=backlog,
                )
            )
        return out

    def who_receives(self, label_pb: label_pb2.Label, topic: str) -> admin_pb2.WhoReceivesResponse:
        """A dry run of the delivery decision for every partner, with reasons."""
        try:
            label = label_from_proto(label_pb)
            validate_topic(topic)
        except (LabelError, TopicError) as exc:
            raise InvalidInput("bad_label", str(exc)) from exc
        now = self._now()
        out = admin_pb2.WhoReceivesResponse()
        for rec in self.registry.all():
            e = eligibility(rec.policy, label, topic, now, has_keys=rec.bundle is not None)
            out.decisions.append(
                admin_pb2.WhoReceivesDecision(
                    partner=rec.code, allowed=e.allowed, reason=e.reason, explanation=e.explanation
                )
            )
        return out
