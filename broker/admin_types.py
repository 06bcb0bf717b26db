"""What the Admin core (``broker.admin``) returns, and the collaborators it is given.

Plain values: ``broker.grpc.admin`` turns them into the Admin service's responses. Policy
versions and proposals are the registry's own records (``policy_pb2`` messages), passed
through as they are stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from broker.registry import PartnerRecord
from coalition.policy import Eligibility, PartnerStatus
from coalition.v1 import policy_pb2


@dataclass(frozen=True)
class Counts:
    """What one partner did since the broker started: envelopes published, delivered to
    it, and refused."""

    published: int = 0
    delivered: int = 0
    refused: int = 0


class ExchangeLink(Protocol):
    """What operator actions need of the exchange, and nothing more."""

    def policy_changed(self, partner: str) -> None:
        """Apply partner's new policy to its live streams at once (a suspension ends them,
        a lowered clearance holds back the next delivery)."""

    def live_streams(self, partner: str | None = None) -> int:
        """Live Subscribe streams of partner (of every partner when None)."""

    def counters(self, partner: str) -> Counts:
        """partner's counts since the broker started."""


class RegistryAudit(Protocol):
    """The registry's audit outbox (``broker.audit_keeping.AuditKeeping``)."""

    async def registry_changed(self) -> None:
        """After a registry write: record its audit entry now, or keep it in the outbox
        (and refuse publishes) while the audit log cannot take it."""


@dataclass(frozen=True)
class PolicyChange:
    """The outcome of a policy action: exactly one of a version applied now, or a
    proposal (pending, or the one just rejected)."""

    applied: policy_pb2.PolicyVersion | None = None
    proposal: policy_pb2.Proposal | None = None


@dataclass(frozen=True)
class PartnerSummary:
    """One partner's standing: status, current policy version, whether it has a live
    Subscribe stream, and the id of its current key bundle ("" if none)."""

    partner: str
    status: PartnerStatus
    policy_version: int
    connected: bool
    key_id: str


@dataclass(frozen=True)
class PartnerView:
    """One partner in full: its standing, current policy version, and record
    (signing certificate, key bundle, groups)."""

    summary: PartnerSummary
    policy: policy_pb2.PolicyVersion
    record: PartnerRecord


@dataclass(frozen=True)
class PartnerStats:
    """One partner's counts, live streams and backlog (messages owed, not acknowledged)."""

    partner: str
    counts: Counts
    live_streams: int
    backlog: int


@dataclass(frozen=True)
class BrokerStats:
    """Totals for the broker, and each registered partner's PartnerStats by code."""

    live_streams: int
    store_messages: int
    store_bytes: int
    audit_entries: int
    partners: list[PartnerStats] = field(default_factory=list)


@dataclass(frozen=True)
class AuditVerdict:
    """The audit chain verified, and the store checked against it: ``ok`` only if both
    hold; ``problem`` says what does not; ``tampered_offsets`` are stored messages whose
    bytes no longer match the digest recorded at acceptance."""

    ok: bool
    entries: int
    checkpoints: int
    first_broken_seq: int
    problem: str
    tampered_offsets: list[int]


@dataclass(frozen=True)
class ReceiverDecision:
    """Whether partner would receive a label on a topic now, and why."""

    partner: str
    eligibility: Eligibility
