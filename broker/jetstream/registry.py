"""The partner registry on a NATS JetStream cluster, shared by every broker of a
deployment: the same interface and answers as ``broker.registry.Registry`` (SQLite).

How it is stored and kept consistent across brokers (one stream, a subject per fact,
each change an atomic compare-and-set batch with its audit record, a watched in-memory
view) is ``broker.jetstream.registry_stream``'s; this module makes each change against
the view and says what a lost race means, exactly as the SQLite registry answers
inside its transaction.
"""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client

from broker.audit.items import AuditItem
from broker.errors import AlreadyExists
from broker.jetstream.connect import ClusterSettings
from broker.jetstream.registry_stream import Behind, Plan, RegistryStream
from broker.jetstream.registry_view import H_BASE, H_KEY_ID, H_PARTNER, H_TIME, Outgoing
from broker.registry_types import ChangeCallback, PartnerRecord, StaleVersion, new_proposal
from broker.store.base import OutboxRow
from coalition.policy import PartnerPolicy, policy_from_proto, policy_to_proto
from coalition.v1 import directory_pb2, policy_pb2


class JetStreamRegistry:
    """Partners, policy versions, proposals and key bundles in a JetStream stream, shared
    by every broker of the deployment. Open with ``await JetStreamRegistry.open(nc,
    settings)``."""

    def __init__(self, stream: RegistryStream) -> None:
        self._s = stream
        self._view = stream.view

    @classmethod
    async def open(
        cls,
        nc: Client,
        settings: ClusterSettings,
        *,
        write_timeout_s: float = 60.0,
        sync_timeout_s: float = 30.0,
    ) -> JetStreamRegistry:
        """Create the registry stream if it is missing, read it whole and watch it.
        Raises ``Unavailable`` ``registry_unavailable`` if the cluster cannot be read
        within sync_timeout_s. A write that the cluster cannot confirm within
        write_timeout_s (no quorum) raises the same."""
        stream = RegistryStream(nc, settings, write_timeout_s=write_timeout_s)
        await stream.start(sync_timeout_s)
        return cls(stream)

    # -- reads (memory) -------------------------------------------------------------------
    def get(self, code: str) -> PartnerRecord | None:
        """The record of a partner as the view holds it, or None if never registered."""
        return self._view.records.get(code)

    def all(self) -> list[PartnerRecord]:
        return sorted(self._view.records.values(), key=lambda r: r.code)

    def on_change(self, callback: ChangeCallback) -> None:
        """Call callback after each change, made through any broker (see RegistryChange)."""
        self._s.callbacks.append(callback)

    async def history(self, code: str) -> list[policy_pb2.PolicyVersion]:
        return self._view.history(code)

    async def proposal(self, pid: str) -> tuple[policy_pb2.Proposal, int] | None:
        """A proposal and the policy version it was made against, or None (after reading
        the stream again: it may have been made through another broker a moment ago)."""
        if pid not in self._view.proposals:
            await self._s.refresh([self._view.subject("proposal", pid)])
        return self._view.proposal(pid)

    async def proposals(self, *, include_decided: bool) -> list[policy_pb2.Proposal]:
        return self._view.proposal_list(include_decided=include_decided)

    # -- writes ---------------------------------------------------------------------------
    async def register(
        self,
        code: str,
        signing_cert: bytes,
        policy: PartnerPolicy,
        *,
        actor: str,
        reason: str,
        now_ms: int,
        audit: AuditItem | None = None,
    ) -> policy_pb2.PolicyVersion:
        """Register a new partner with its first policy version; AlreadyExists
        ``already_registered`` if any broker registered it first."""
        pv = _version(policy, 1, actor, "", reason, ["registered"], now_ms)
        partner_subject = self._view.subject("partner", code)
        policy_subject = self._view.subject("policy", code)

        def make(fresh: bool) -> Plan:
            if code in self._view.records or self._view.last(partner_subject):
                raise AlreadyExists("already_registered", f"partner {code} is already registered")
            head = {H_PARTNER: code, **_time(now_ms)}
            return Plan(
                [
                    *self._s.outbox(audit, now_ms),
                    Outgoing(partner_subject, signing_cert, head, expect=0),
                    Outgoing(policy_subject, pv.SerializeToString(), dict(head), expect=0),
                ],
                pv,
            )

        await self._s.commit(make, list)
        return pv

    async def apply(
        self,
        policy: PartnerPolicy,
        *,
        changed_by: str,
        approved_by: str,
        reason: str,
        diff: list[str],
        now_ms: int,
        expected_version: int = 0,
        audit: Callable[[int], AuditItem] | None = None,
    ) -> policy_pb2.PolicyVersion:
        """Record a new policy version; raises StaleVersion if expected_version is not
        current (when another broker's change won, too). expected_version 0 applies on
        top of whatever version is current."""
        code = policy.partner
        subject = self._view.subject("policy", code)

        def make(fresh: bool) -> Plan:
            rec = self._view.records.get(code)
            if rec is None or expected_version > rec.version:
                if not fresh:
                    raise Behind  # registered or changed through another broker just now
                if rec is None:
                    raise KeyError(code)  # as the SQLite registry, for an unknown partner
            if expected_version and expected_version != rec.version:
                raise StaleVersion(rec.version)
            version = rec.version + 1
            pv = _version(policy, version, changed_by, approved_by, reason, diff, now_ms)
            out = Outgoing(
                subject, pv.SerializeToString(), {H_PARTNER: code}, expect=self._view.last(subject)
            )
            return Plan([*self._s.outbox(audit(version) if audit else None, now_ms), out], pv)

        plan = await self._s.commit(make, lambda: [subject])
        assert plan is not None
        result: policy_pb2.PolicyVersion = plan.result
        return result

    async def propose(
        self,
        policy: PartnerPolicy,
        *,
        base_version: int,
        proposed_by: str,
        reason: str,
        diff: list[str],
        now_ms: int,
        audit: Callable[[str], AuditItem] | None = None,
        signing_cert: bytes = b"",
    ) -> policy_pb2.Proposal:
        """Record a pending proposal for a privilege-raising change (audit: the entry,
        made from the new proposal's id; signing_cert: a rekey's new certificate, carried
        in the proposal)."""
        prop = new_proposal(
            policy,
            proposed_by=proposed_by,
            reason=reason,
            diff=diff,
            now_ms=now_ms,
            signing_cert=signing_cert,
        )
        pid = prop.proposal_id
        headers = {H_PARTNER: policy.partner, H_BASE: str(base_version), **_time(now_ms)}
        out = Outgoing(self._view.subject("proposal", pid), prop.SerializeToString(), headers, 0)
        entry = self._s.outbox(audit(pid) if audit else None, now_ms)
        await self._s.commit(lambda _: Plan([*entry, out], prop), list)
        return prop

    async def decide_proposal(
        self,
        pid: str,
        *,
        state: int,
        decided_by: str,
        now_ms: int = 0,
        audit: AuditItem | None = None,
    ) -> bool:
        """Move a pending proposal to approved/rejected; False if it was no longer pending
        (decided through any broker; then nothing is written, audit entry included)."""
        subject = self._view.subject("proposal", pid)

        def make(fresh: bool) -> Plan | None:
            found = self._view.proposals.get(pid)
            if found is None and not fresh:
                raise Behind  # made through another broker just now, perhaps
            if found is None or found[0].state != policy_pb2.PROPOSAL_PENDING:
                return None
            prop, base, _ = found
            decided = policy_pb2.Proposal()
            decided.CopyFrom(prop)
            decided.state = policy_pb2.ProposalState.ValueType(state)
            decided.decided_by = decided_by
            headers = {H_PARTNER: prop.policy.partner, H_BASE: str(base), **_time(now_ms)}
            out = Outgoing(subject, decided.SerializeToString(), headers, self._view.last(subject))
            return Plan([*self._s.outbox(audit, now_ms), out], True)

        return await self._s.commit(make, lambda: [subject]) is not None

    async def approve(
        self,
        pid: str,
        *,
        decided_by: str,
        now_ms: int,
        audit: Callable[[int], list[AuditItem]] | None = None,
    ) -> policy_pb2.PolicyVersion | None:
        """Approve a pending proposal and apply its policy as the next version, in one
        batch with the entries audit makes from the new version number (compare-and-set
        on the proposal and on the policy). None if the proposal is unknown or no longer
        pending; StaleVersion if the policy is no longer at the version it was made
        against. Either way nothing is written."""
        subject = self._view.subject("proposal", pid)

        def make(fresh: bool) -> Plan | None:
            found = self._view.proposals.get(pid)
            if found is None and not fresh:
                raise Behind
            if found is None or found[0].state != policy_pb2.PROPOSAL_PENDING:
                return None
            prop, base, _ = found
            code = prop.policy.partner
            rec = self._view.records[code]
            if rec.version != base:
                if base > rec.version and not fresh:
                    raise Behind
                raise StaleVersion(rec.version)
            v = base + 1
            policy = policy_from_proto(prop.policy)
            pv = _version(
                policy, v, prop.proposed_by, decided_by, prop.reason, [*prop.diff], now_ms
            )
            decided = policy_pb2.Proposal()
            decided.CopyFrom(prop)
            decided.state = policy_pb2.PROPOSAL_APPROVED
            decided.decided_by = decided_by
            head = {H_PARTNER: code, H_BASE: str(base), **_time(now_ms)}
            policy_subject = self._view.subject("policy", code)
            entries = [m for e in (audit(v) if audit else []) for m in self._s.outbox(e, now_ms)]
            # A rekey: the new certificate on the partner's subject, before the policy
            # version, so the view has replaced it when the policy change is told.
            cert_subject = self._view.subject("partner", code)
            rekey = []
            if prop.signing_cert:
                last = self._view.last(cert_subject)
                rekey.append(Outgoing(cert_subject, prop.signing_cert, dict(head), last))
            return Plan(
                [
                    *entries,
                    Outgoing(subject, decided.SerializeToString(), head, self._view.last(subject)),
                    *rekey,
                    Outgoing(
                        policy_subject,
                        pv.SerializeToString(),
                        {H_PARTNER: code},
                        self._view.last(policy_subject),
                    ),
                ],
                pv,
            )

        def depends_on() -> list[str]:
            found = self._view.proposals.get(pid)
            code = found[0].policy.partner if found else ""
            if not code:
                return [subject]
            return [
                subject,
                self._view.subject("policy", code),
                self._view.subject("partner", code),
            ]

        plan = await self._s.commit(make, depends_on)
        if plan is None:
            return None
        result: policy_pb2.PolicyVersion = plan.result
        return result

    async def set_bundle(
        self,
        code: str,
        key_id: str,
        signed: directory_pb2.SignedKeyBundle,
        now_ms: int,
        audit: AuditItem | None = None,
    ) -> None:
        """Make signed the partner's current key bundle (older ones stay on record). A
        bundle does not depend on the one before it: after a lost race it is written
        again on top of the winner (the latest registration is the current one)."""
        subject = self._view.subject("keys", code)
        headers = {H_PARTNER: code, H_KEY_ID: key_id, **_time(now_ms)}
        data = signed.SerializeToString()
        entry = self._s.outbox(audit, now_ms)

        def make(fresh: bool) -> Plan:
            if code not in self._view.records:
                if not fresh:
                    raise Behind
                raise KeyError(code)  # as the SQLite registry, for an unknown partner
            return Plan([*entry, Outgoing(subject, data, headers, self._view.last(subject))])

        await self._s.commit(make, lambda: [self._view.subject("policy", code)])

    # -- the audit outbox (an OutboxSource of broker.audit.drainer) ------------------------
    async def read_outbox(self, after: int, limit: int) -> list[OutboxRow]:
        """Audit records of committed changes with outbox id above after, oldest first;
        each entry's detail carries ``ref`` (``registry:<outbox id>``)."""
        return await self._s.read_outbox(after, limit)

    async def forget_outbox(self, through: int) -> None:
        """The audit log holds every record up to through: forget them."""
        await self._s.forget_outbox(through)

    def close(self) -> None:
        """Stop watching the stream (the connection belongs to the caller)."""
        self._s.close()


def _time(now_ms: int) -> dict[str, str]:
    return {H_TIME: str(now_ms)}


def _version(
    policy: PartnerPolicy,
    version: int,
    by: str,
    approved: str,
    reason: str,
    diff: list[str],
    now_ms: int,
) -> policy_pb2.PolicyVersion:
    return policy_pb2.PolicyVersion(
        version=version,
        policy=policy_to_proto(policy),
        changed_by=by,
        approved_by=approved,
        changed_ms=now_ms,
        reason=reason,
        diff=diff,
    )
