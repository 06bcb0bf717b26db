"""The Admin service: operator requests in, calls on ``broker.admin.AdminCore``, protobuf
out. Every refusal is audited (``admin.refused``) with the operator and the action, then
answered with its status from ``broker.grpc.status``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import grpc

from broker.admin import AdminCore
from broker.audit import AuditError
from broker.auth import current_identity
from broker.errors import BrokerError
from broker.grpc.status import abort
from coalition.policy import PartnerStatus
from coalition.v1 import admin_pb2, admin_pb2_grpc, audit_pb2, policy_pb2

log = logging.getLogger("coalition.broker")
Ctx = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """Every refusal is audited with the operator and the action."""

    def __init__(self, core: AdminCore) -> None:
        self.core = core

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
            raise  # abort() raises; this keeps the type checker informed

    def _op(self) -> str:
        return current_identity().name

    async def AdmitPartner(
        self, request: admin_pb2.AdmitPartnerRequest, context: Ctx
    ) -> admin_pb2.PolicyChangeResponse:
        return await self._guard(
            context,
            "admit",
            request.partner,
            self.core.admit(
                self._op(), request.partner, request.signing_cert, request.policy, request.reason
            ),
        )

    async def ListPartners(
        self, request: admin_pb2.ListPartnersRequest, context: Ctx
    ) -> admin_pb2.ListPartnersResponse:
        return admin_pb2.ListPartnersResponse(
            partners=[self.core.summary(r.code) for r in self.core.registry.all()]
        )

    async def ShowPartner(
        self, request: admin_pb2.ShowPartnerRequest, context: Ctx
    ) -> admin_pb2.ShowPartnerResponse:
        async def run() -> admin_pb2.ShowPartnerResponse:
            summary = self.core.summary(request.partner)
            history = await self.core.registry.history(request.partner)
            entry = self.core.ex.directory_entry(request.partner)
            return admin_pb2.ShowPartnerResponse(
                summary=summary, policy=history[-1], directory=entry
            )

        return await self._guard(context, "show", request.partner, run())

    async def GetPolicy(
        self, request: admin_pb2.GetPolicyRequest, context: Ctx
    ) -> policy_pb2.PolicyVersion:
        async def run() -> policy_pb2.PolicyVersion:
            self.core.ex.partner_record(request.partner)
            return (await self.core.registry.history(request.partner))[-1]

        return await self._guard(context, "policy.get", request.partner, run())

    async def SetPolicy(
        self, request: admin_pb2.SetPolicyRequest, context: Ctx
    ) -> admin_pb2.PolicyChangeResponse:
        return await self._guard(
            context,
            "policy.set",
            request.policy.partner,
            self.core.set_policy(
                self._op(), request.policy, request.reason, request.expected_version
            ),
        )

    async def ApproveProposal(
        self, request: admin_pb2.DecideProposalRequest, context: Ctx
    ) -> admin_pb2.PolicyChangeResponse:
        return await self._guard(
            context,
            "proposal.approve",
            "",
            self.core.decide_proposal(
                self._op(), request.proposal_id, approve=True, reason=request.reason
            ),
        )

    async def RejectProposal(
        self, request: admin_pb2.DecideProposalRequest, context: Ctx
    ) -> admin_pb2.PolicyChangeResponse:
        return await self._guard(
            context,
            "proposal.reject",
            "",
            self.core.decide_proposal(
                self._op(), request.proposal_id, approve=False, reason=request.reason
            ),
        )

    async def ListProposals(
        self, request: admin_pb2.ListProposalsRequest, context: Ctx
    ) -> admin_pb2.ListProposalsResponse:
        return admin_pb2.ListProposalsResponse(
            proposals=await self.core.registry.proposals(include_decided=request.all)
        )

    async def PolicyHistory(
        self, request: admin_pb2.PolicyHistoryRequest, context: Ctx
    ) -> admin_pb2.PolicyHistoryResponse:
        async def run() -> admin_pb2.PolicyHistoryResponse:
            self.core.ex.partner_record(request.partner)
            return admin_pb2.PolicyHistoryResponse(
                versions=await self.core.registry.history(request.partner)
            )

        return await self._guard(context, "policy.history", request.partner, run())

    async def Suspend(
        self, request: admin_pb2.StatusChangeRequest, context: Ctx
    ) -> admin_pb2.PolicyChangeResponse:
        return await self._guard(
            context,
            "suspend",
            request.partner,
            self.core.set_status(
                self._op(), request.partner, PartnerStatus.SUSPENDED, request.reason
            ),
        )

    async def Reinstate(
        self, request: admin_pb2.StatusChangeRequest, context: Ctx
    ) -> admin_pb2.PolicyChangeResponse:
        return await self._guard(
            context,
            "reinstate",
            request.partner,
            self.core.set_status(self._op(), request.partner, PartnerStatus.ACTIVE, request.reason),
        )

    async def QueryAudit(
        self, request: admin_pb2.QueryAuditRequest, context: Ctx
    ) -> AsyncIterator[audit_pb2.AuditEntry]:
        rows = await self.core.audit.query(
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
        return await self.core.verify(self._op())

    async def ExportAudit(
        self, request: admin_pb2.ExportAuditRequest, context: Ctx
    ) -> AsyncIterator[admin_pb2.AuditRecord]:
        async for rec in self.core.audit.export():
            if isinstance(rec, audit_pb2.AuditEntry):
                yield admin_pb2.AuditRecord(entry=rec)
            else:
                yield admin_pb2.AuditRecord(checkpoint=rec)
        if self.core.audit_certificate:
            yield admin_pb2.AuditRecord(audit_certificate=self.core.audit_certificate)

    async def Stats(self, request: admin_pb2.StatsRequest, context: Ctx) -> admin_pb2.StatsResponse:
        return await self.core.stats()

    async def WhoReceives(
        self, request: admin_pb2.WhoReceivesRequest, context: Ctx
    ) -> admin_pb2.WhoReceivesResponse:
        async def run() -> admin_pb2.WhoReceivesResponse:
            return self.core.who_receives(request.label, request.topic)

        return await self._guard(context, "who-receives", "", run())
