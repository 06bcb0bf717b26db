"""``OperatorClient``: an operator's connection to the Admin service."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clients.sdk.channel import secure_channel
from clients.sdk.errors import call, mapped_errors
from coalition.labels import Label, label_to_proto
from coalition.pki import OperatorCredentials
from coalition.v1 import admin_pb2, admin_pb2_grpc, audit_pb2, policy_pb2

if TYPE_CHECKING:
    from coalition.v1.admin_pb2_grpc import AdminAsyncStub


class OperatorClient:
    """An operator's connection to the Admin service."""

    def __init__(self, creds: OperatorCredentials, target: str) -> None:
        self.name = creds.name
        self.channel = secure_channel(target, creds.ca_pem, creds.tls_cert_pem, creds.tls_key_pem)
        self.stub: AdminAsyncStub = admin_pb2_grpc.AdminStub(self.channel)

    async def __aenter__(self) -> OperatorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close(None)

    async def admit(
        self, partner: str, signing_cert_der: bytes, policy: policy_pb2.PartnerPolicy, reason: str
    ) -> admin_pb2.PolicyChangeResponse:
        return await call(
            self.stub.AdmitPartner(
                admin_pb2.AdmitPartnerRequest(
                    partner=partner, signing_cert=signing_cert_der, policy=policy, reason=reason
                )
            )
        )

    async def rekey(
        self, partner: str, signing_cert_der: bytes, reason: str
    ) -> admin_pb2.PolicyChangeResponse:
        """Propose a new signing certificate for an admitted partner (a second operator
        approves)."""
        return await call(
            self.stub.RekeyPartner(
                admin_pb2.RekeyPartnerRequest(
                    partner=partner, signing_cert=signing_cert_der, reason=reason
                )
            )
        )

    async def partners(self) -> list[admin_pb2.PartnerSummary]:
        return list((await call(self.stub.ListPartners(admin_pb2.ListPartnersRequest()))).partners)

    async def show(self, partner: str) -> admin_pb2.ShowPartnerResponse:
        return await call(self.stub.ShowPartner(admin_pb2.ShowPartnerRequest(partner=partner)))

    async def policy(self, partner: str) -> policy_pb2.PolicyVersion:
        return await call(self.stub.GetPolicy(admin_pb2.GetPolicyRequest(partner=partner)))

    async def set_policy(
        self, policy: policy_pb2.PartnerPolicy, reason: str, expected_version: int = 0
    ) -> admin_pb2.PolicyChangeResponse:
        return await call(
            self.stub.SetPolicy(
                admin_pb2.SetPolicyRequest(
                    policy=policy, reason=reason, expected_version=expected_version
                )
            )
        )

    async def approve(self, proposal_id: str, reason: str = "") -> admin_pb2.PolicyChangeResponse:
        return await call(
            self.stub.ApproveProposal(
                admin_pb2.DecideProposalRequest(proposal_id=proposal_id, reason=reason)
            )
        )

    async def reject(self, proposal_id: str, reason: str = "") -> admin_pb2.PolicyChangeResponse:
        return await call(
            self.stub.RejectProposal(
                admin_pb2.DecideProposalRequest(proposal_id=proposal_id, reason=reason)
            )
        )

    async def proposals(self, *, all: bool = False) -> list[policy_pb2.Proposal]:
        resp = await call(self.stub.ListProposals(admin_pb2.ListProposalsRequest(all=all)))
        return list(resp.proposals)

    async def history(self, partner: str) -> list[policy_pb2.PolicyVersion]:
        resp = await call(self.stub.PolicyHistory(admin_pb2.PolicyHistoryRequest(partner=partner)))
        return list(resp.versions)

    async def suspend(self, partner: str, reason: str) -> admin_pb2.PolicyChangeResponse:
        return await call(
            self.stub.Suspend(admin_pb2.StatusChangeRequest(partner=partner, reason=reason))
        )

    async def reinstate(self, partner: str, reason: str) -> admin_pb2.PolicyChangeResponse:
        return await call(
            self.stub.Reinstate(admin_pb2.StatusChangeRequest(partner=partner, reason=reason))
        )

    async def audit(self, **filters: Any) -> list[audit_pb2.AuditEntry]:
        out = []
        async with mapped_errors():
            async for e in self.stub.QueryAudit(admin_pb2.QueryAuditRequest(**filters)):
                out.append(e)
        return out

    async def verify_audit(self) -> admin_pb2.VerifyAuditResponse:
        return await call(self.stub.VerifyAudit(admin_pb2.VerifyAuditRequest()))

    async def export_audit(self) -> list[admin_pb2.AuditRecord]:
        out = []
        async with mapped_errors():
            async for r in self.stub.ExportAudit(admin_pb2.ExportAuditRequest()):
                out.append(r)
        return out

    async def stats(self) -> admin_pb2.StatsResponse:
        return await call(self.stub.Stats(admin_pb2.StatsRequest()))

    async def peers(self) -> admin_pb2.ListPeersResponse:
        """Federation: each peer nation, its gateway's standing and its link's counters."""
        return await call(self.stub.ListPeers(admin_pb2.ListPeersRequest()))

    async def who_receives(self, label: Label, topic: str) -> admin_pb2.WhoReceivesResponse:
        return await call(
            self.stub.WhoReceives(
                admin_pb2.WhoReceivesRequest(label=label_to_proto(label), topic=topic)
            )
        )

    async def messages(
        self, *, before_offset: int = 0, limit: int = 0, sender: str = "", topic: str = ""
    ) -> list[admin_pb2.MessageMeta]:
        """Stored messages' metadata, newest first (never their contents)."""
        resp = await call(
            self.stub.ListMessages(
                admin_pb2.ListMessagesRequest(
                    before_offset=before_offset, limit=limit, sender=sender, topic=topic
                )
            )
        )
        return list(resp.messages)
