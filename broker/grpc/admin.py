"""The Admin service: operator requests in, calls on ``broker.admin.AdminCore``, protobuf
out. Every refusal is audited (``admin.refused``) with the operator and the action, then
answered with its status from ``broker.grpc.status``.

The wire's inputs are parsed here with the kernel (a policy, a label; InvalidInput
``bad_policy`` / ``bad_label`` when they do not parse), and the core's domain values are
turned into the responses by the ``*_out`` functions at the end of this module.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any, TypeVar

import grpc

from broker.admin import AdminCore
from broker.admin_types import (
    AuditVerdict,
    BrokerStats,
    PartnerSummary,
    PartnerView,
    PolicyChange,
    ReceiverDecision,
)
from broker.admin_views import MessageMeta, list_messages
from broker.audit import AuditError
from broker.auth import current_identity
from broker.errors import BrokerError, InvalidInput
from broker.grpc.status import abort
from broker.rekey import propose_rekey
from coalition.labels import Label, LabelError, label_from_proto
from coalition.policy import PartnerPolicy, PartnerStatus, PolicyError, policy_from_proto
from coalition.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    audit_pb2,
    directory_pb2,
    label_pb2,
    policy_pb2,
)

log = logging.getLogger("coalition.broker")
Ctx = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """Every refusal is audited with the operator and the action."""

    def __init__(self, core: AdminCore, revoked: Callable[[], Collection[int]] = frozenset) -> None:
        self.core = core
        self.revoked = revoked  # the certificate serials operators revoked, now

    async def _guard(self, ctx: Ctx, action: str, partner: str, coro: Awaitable[T]) -> T:
        try:
            return await coro
        except BrokerError as err:
            try:
                await self.core.refused(
                    current_identity().name, action, err.code, err.message, partner
                )
            except AuditError as exc:  # disk full: the operator still gets the refusal
                log.critical("admin.refused not audited: %s", exc)
            await abort(ctx, err)

    def _op(self) -> str:
        return current_identity().name

    async def AdmitPartner(
        self, request: admin_pb2.AdmitPartnerRequest, context: Ctx
    ) -> admin_pb2.PolicyChangeResponse:
        async def run() -> PolicyChange:
            policy = policy_in(request.policy)
            return await self.core.admit(
                self._op(), request.partner, request.signing_cert, policy, request.reason
            )

        return change_out(await self._guard(context, "admit", request.partner, run()))

    async def RekeyPartner(
        self, request: admin_pb2.RekeyPartnerRequest, context: Ctx
    ) -> admin_pb2.PolicyChangeResponse:
        run = propose_rekey(
            self.core,
            self._op(),
            request.partner,
            request.signing_cert,
            request.reason,
            revoked=self.revoked(),
        )
        return change_out(await self._guard(context, "rekey", request.partner, run))

    async def ListPartners(
        self, request: admin_pb2.ListPartnersRequest, context: Ctx
    ) -> admin_pb2.ListPartnersResponse:
        return admin_pb2.ListPartnersResponse(
            partners=[summary_out(s) for s in self.core.partners()]
        )

    async def ShowPartner(
        self, request: admin_pb2.ShowPartnerRequest, context: Ctx
    ) -> admin_pb2.ShowPartnerResponse:
        view = await self._guard(context, "show", request.partner, self.core.show(request.partner))
        return show_out(view)

    async def GetPolicy(
        self, request: admin_pb2.GetPolicyRequest, context: Ctx
    ) -> policy_pb2.PolicyVersion:
        return await self._guard(
            context, "policy.get", request.partner, self.core.policy(request.partner)
        )

    async def SetPolicy(
        self, request: admin_pb2.SetPolicyRequest, context: Ctx
    ) -> admin_pb2.PolicyChangeResponse:
        async def run() -> PolicyChange:
            policy = policy_in(request.policy)
            return await self.core.set_policy(
                self._op(), policy, request.reason, request.expected_version
            )

        return change_out(await self._guard(context, "policy.set", request.policy.partner, run()))

    async def ApproveProposal(
        self, request: admin_pb2.DecideProposalRequest, context: Ctx
    ) -> admin_pb2.PolicyChangeResponse:
        decided = self.core.decide_proposal(
            self._op(), request.proposal_id, approve=True, reason=request.reason
        )
        return change_out(await self._guard(context, "proposal.approve", "", decided))

    async def RejectProposal(
        self, request: admin_pb2.DecideProposalRequest, context: Ctx
    ) -> admin_pb2.PolicyChangeResponse:
        decided = self.core.decide_proposal(
            self._op(), request.proposal_id, approve=False, reason=request.reason
        )
        return change_out(await self._guard(context, "proposal.reject", "", decided))

    async def ListProposals(
        self, request: admin_pb2.ListProposalsRequest, context: Ctx
    ) -> admin_pb2.ListProposalsResponse:
        return admin_pb2.ListProposalsResponse(
            proposals=await self.core.proposals(include_decided=request.all)
        )

    async def PolicyHistory(
        self, request: admin_pb2.PolicyHistoryRequest, context: Ctx
    ) -> admin_pb2.PolicyHistoryResponse:
        versions = await self._guard(
            context, "policy.history", request.partner, self.core.history(request.partner)
        )
        return admin_pb2.PolicyHistoryResponse(versions=versions)

    async def Suspend(
        self, request: admin_pb2.StatusChangeRequest, context: Ctx
    ) -> admin_pb2.PolicyChangeResponse:
        changed = self.core.set_status(
            self._op(), request.partner, PartnerStatus.SUSPENDED, request.reason
        )
        return change_out(await self._guard(context, "suspend", request.partner, changed))

    async def Reinstate(
        self, request: admin_pb2.StatusChangeRequest, context: Ctx
    ) -> admin_pb2.PolicyChangeResponse:
        changed = self.core.set_status(
            self._op(), request.partner, PartnerStatus.ACTIVE, request.reason
        )
        return change_out(await self._guard(context, "reinstate", request.partner, changed))

    async def QueryAudit(
        self, request: admin_pb2.QueryAuditRequest, context: Ctx
    ) -> AsyncIterator[audit_pb2.AuditEntry]:
        rows = await self.core.query_audit(
            partner=request.partner,
            kind=request.kind,
            since_ms=request.since_ms,
            until_ms=request.until_ms,
            limit=request.limit,
            tail=request.tail,
        )
        for row in rows:
            yield row

    async def VerifyAudit(
        self, request: admin_pb2.VerifyAuditRequest, context: Ctx
    ) -> admin_pb2.VerifyAuditResponse:
        return verdict_out(await self.core.verify(self._op()))

    async def ExportAudit(
        self, request: admin_pb2.ExportAuditRequest, context: Ctx
    ) -> AsyncIterator[admin_pb2.AuditRecord]:
        async for rec in self.core.export_audit():
            if isinstance(rec, audit_pb2.AuditEntry):
                yield admin_pb2.AuditRecord(entry=rec)
            else:
                yield admin_pb2.AuditRecord(checkpoint=rec)
        for der in await self.core.audit_certificates():
            yield admin_pb2.AuditRecord(audit_certificate=der)

    async def Stats(self, request: admin_pb2.StatsRequest, context: Ctx) -> admin_pb2.StatsResponse:
        return stats_out(await self.core.stats())

    async def WhoReceives(
        self, request: admin_pb2.WhoReceivesRequest, context: Ctx
    ) -> admin_pb2.WhoReceivesResponse:
        async def run() -> list[ReceiverDecision]:
            return self.core.who_receives(label_in(request.label), request.topic)

        return receivers_out(await self._guard(context, "who-receives", "", run()))

    async def ListPeers(
        self, request: admin_pb2.ListPeersRequest, context: Ctx
    ) -> admin_pb2.ListPeersResponse:
        view = self.core.federation
        if view is None:
            return admin_pb2.ListPeersResponse()
        return admin_pb2.ListPeersResponse(
            nation=view.nation,
            peers=[
                admin_pb2.FederationPeer(
                    nation=p.nation,
                    endpoint=p.endpoint,
                    ca_sha256=p.ca_sha256,
                    status=directory_pb2.PartnerStatus.ValueType(p.status),
                    policy_version=p.policy_version,
                    connected=p.counters.connected,
                    forwarded=p.counters.forwarded,
                    duplicates=p.counters.duplicates,
                    refused_by_peer=p.counters.refused_by_peer,
                    receipts=p.counters.receipts,
                    received=p.counters.received,
                    refused=p.counters.refused,
                    lag=p.lag,
                    partners_learned=p.partners_learned,
                    last_error=p.counters.last_error,
                )
                for p in await view.peers()
            ],
        )

    async def ListMessages(
        self, request: admin_pb2.ListMessagesRequest, context: Ctx
    ) -> admin_pb2.ListMessagesResponse:
        found = await list_messages(
            self.core.store,
            self.core.audit,
            before_offset=request.before_offset,
            limit=request.limit,
            sender=request.sender,
            topic=request.topic,
        )
        return admin_pb2.ListMessagesResponse(messages=[message_out(m) for m in found])


# -- wire in ------------------------------------------------------------------------------
def policy_in(pb: policy_pb2.PartnerPolicy) -> PartnerPolicy:
    """The policy a request carries, or InvalidInput ``bad_policy``."""
    try:
        return policy_from_proto(pb)
    except PolicyError as exc:
        raise InvalidInput("bad_policy", str(exc)) from exc


def label_in(pb: label_pb2.Label) -> Label:
    """The label a request carries, or InvalidInput ``bad_label``."""
    try:
        return label_from_proto(pb)
    except LabelError as exc:
        raise InvalidInput("bad_label", str(exc)) from exc


# -- wire out -----------------------------------------------------------------------------
def change_out(change: PolicyChange) -> admin_pb2.PolicyChangeResponse:
    if change.applied is not None:
        return admin_pb2.PolicyChangeResponse(applied=change.applied)
    return admin_pb2.PolicyChangeResponse(proposal=change.proposal)


def _status_out(status: PartnerStatus) -> directory_pb2.PartnerStatus.ValueType:
    return directory_pb2.PartnerStatus.ValueType(int(status))


def summary_out(s: PartnerSummary) -> admin_pb2.PartnerSummary:
    return admin_pb2.PartnerSummary(
        partner=s.partner,
        status=_status_out(s.status),
        policy_version=s.policy_version,
        connected=s.connected,
        key_id=s.key_id,
    )


def show_out(view: PartnerView) -> admin_pb2.ShowPartnerResponse:
    """The summary, the current policy version and the operators' directory entry
    (signing certificate and earlier ones, key bundle, status and groups)."""
    rec = view.record
    entry = directory_pb2.DirectoryEntry(
        partner=rec.code,
        signing_cert=rec.signing_cert,
        status=_status_out(rec.policy.status),
        groups=sorted(rec.policy.groups),
        previous_signing_certs=rec.previous_certs,
    )
    if rec.bundle is not None:
        entry.key_bundle.CopyFrom(rec.bundle)
    return admin_pb2.ShowPartnerResponse(
        summary=summary_out(view.summary), policy=view.policy, directory=entry
    )


def verdict_out(v: AuditVerdict) -> admin_pb2.VerifyAuditResponse:
    return admin_pb2.VerifyAuditResponse(
        ok=v.ok,
        entries=v.entries,
        checkpoints=v.checkpoints,
        first_broken_seq=v.first_broken_seq,
        problem=v.problem,
        tampered_offsets=v.tampered_offsets,
    )


def stats_out(st: BrokerStats) -> admin_pb2.StatsResponse:
    return admin_pb2.StatsResponse(
        live_streams=st.live_streams,
        store_messages=st.store_messages,
        store_bytes=st.store_bytes,
        audit_entries=st.audit_entries,
        partners=[
            admin_pb2.PartnerStats(
                partner=p.partner,
                published=p.counts.published,
                delivered=p.counts.delivered,
                refused=p.counts.refused,
                live_streams=p.live_streams,
                backlog=p.backlog,
                in_flight=p.in_flight,
                refusals=dict(p.counts.refused_by_reason),
            )
            for p in st.partners
        ],
    )


def receivers_out(decisions: list[ReceiverDecision]) -> admin_pb2.WhoReceivesResponse:
    return admin_pb2.WhoReceivesResponse(
        decisions=[
            admin_pb2.WhoReceivesDecision(
                partner=d.partner,
                allowed=d.eligibility.allowed,
                reason=d.eligibility.reason,
                explanation=d.eligibility.explanation,
            )
            for d in decisions
        ]
    )


def message_out(m: MessageMeta) -> admin_pb2.MessageMeta:
    out = admin_pb2.MessageMeta(
        offset=m.offset,
        message_id=m.message_id,
        sender=m.sender,
        topic=m.topic,
        precedence=m.precedence,
        size=m.size,
        stored_ms=m.stored_ms,
        expiry_ms=m.expiry_ms,
        delivered_to=m.delivered_to,
    )
    out.label.ParseFromString(m.label)
    return out
