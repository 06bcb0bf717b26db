"""The Admin core on its own collaborators, called directly (no gRPC): it takes parsed
domain inputs and returns domain values, and tells the exchange of each applied policy
change once, through its narrow ExchangeLink. A real broker's stores back it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.admin_types import (
    BrokerStats,
    Counts,
    ExchangeLink,
    PartnerSummary,
    PolicyChange,
    ReceiverDecision,
)
from broker.errors import InvalidInput, NotFound, Precondition
from broker.server import Broker, start_broker
from coalition.labels import Classification, parse_label
from coalition.pki import load_partner
from coalition.policy import PartnerStatus
from coalition.v1 import policy_pb2
from tests.helpers import broker_config, policy


class Recording:
    """The broker's own ExchangeLink, noting which partners it was told changed."""

    def __init__(self, link: ExchangeLink) -> None:
        self.link = link
        self.changed: list[str] = []

    def policy_changed(self, partner: str) -> None:
        self.changed.append(partner)
        self.link.policy_changed(partner)

    def live_streams(self, partner: str | None = None) -> int:
        return self.link.live_streams(partner)

    def counters(self, partner: str) -> Counts:
        return self.link.counters(partner)

    def in_flight(self, partner: str) -> int:
        return self.link.in_flight(partner)


@pytest.fixture
async def broker(pki: Path, tmp_path: Path) -> AsyncIterator[Broker]:
    b = await start_broker(broker_config(pki, tmp_path / "broker"))
    try:
        yield b
    finally:
        await b.stop(grace=1)


async def test_admission_and_suspension_in_domain_values(pki: Path, broker: Broker) -> None:
    core = broker.admin
    link = Recording(core.exchange)
    core.exchange = link
    cert = load_partner(pki / "partners" / "KOR").signing_cert_der

    proposed = await core.admit("op1", "KOR", cert, policy("KOR"), "joins")
    assert isinstance(proposed, PolicyChange) and proposed.applied is None
    assert proposed.proposal is not None
    assert proposed.proposal.state == policy_pb2.PROPOSAL_PENDING
    assert link.changed == []  # a proposal changes nothing a live stream sees
    assert core.summary("KOR") == PartnerSummary("KOR", PartnerStatus.PENDING, 1, False, "")

    pid = proposed.proposal.proposal_id
    applied = await core.decide_proposal("op2", pid, approve=True, reason="ok")
    assert applied.proposal is None and applied.applied is not None
    assert applied.applied.version == 2
    assert link.changed == ["KOR"]
    assert core.summary("KOR").status is PartnerStatus.ACTIVE

    suspended = await core.set_status("op1", "KOR", PartnerStatus.SUSPENDED, "incident")
    assert suspended.applied is not None and suspended.applied.version == 3
    assert link.changed == ["KOR", "KOR"]  # once per applied change
    assert [s.partner for s in core.partners()] == ["KOR"]
    assert (await core.show("KOR")).record.policy.status is PartnerStatus.SUSPENDED
    assert [v.version for v in await core.history("KOR")] == [1, 2, 3]

    kinds = [
        e.kind
        for e in await core.query_audit(
            partner="KOR", kind="p", since_ms=0, until_ms=0, limit=0, tail=False
        )
    ]
    assert kinds == [
        "partner.registered",
        "policy.proposed",
        "policy.approved",
        "policy.change",
        "policy.change",
    ]


async def test_views_and_refusals_are_domain_values(pki: Path, broker: Broker) -> None:
    core = broker.admin
    stats = await core.stats()
    assert isinstance(stats, BrokerStats)
    assert (stats.live_streams, stats.store_messages, stats.partners) == (0, 0, [])
    assert stats.audit_entries >= 1  # broker.started

    with pytest.raises(NotFound) as missing:
        core.summary("NOPE")
    assert missing.value.code == "unknown_partner"

    label = parse_label("NATO SECRET // REL TO KOR, USA")
    assert core.who_receives(label, "intel.a") == []
    with pytest.raises(InvalidInput) as bad:
        core.who_receives(label, "Not A Topic")
    assert bad.value.code == "bad_label"

    cert = load_partner(pki / "partners" / "KOR").signing_cert_der
    usa_policy = dataclasses.replace(policy("KOR"), partner="USA")
    with pytest.raises(InvalidInput) as mismatch:
        await core.admit("op1", "KOR", cert, usa_policy, "")
    assert mismatch.value.code == "partner_mismatch"
    proposed = await core.admit("op1", "KOR", cert, policy("KOR"), "")
    assert proposed.proposal is not None
    [decision] = core.who_receives(label, "intel.a")
    assert isinstance(decision, ReceiverDecision) and decision.partner == "KOR"
    assert not decision.eligibility.allowed  # pending: not admitted yet


async def test_two_changes_made_against_one_version_do_not_both_apply(
    pki: Path, broker: Broker
) -> None:
    """Two operators lower the same policy at once, each against the version they read:
    one applies, the other is refused stale_version instead of overwriting it unseen."""
    core = broker.admin
    cert = load_partner(pki / "partners" / "KOR").signing_cert_der
    proposed = await core.admit("op1", "KOR", cert, policy("KOR"), "joins")
    assert proposed.proposal is not None
    await core.decide_proposal("op2", proposed.proposal.proposal_id, approve=True, reason="")
    lowered = [
        policy("KOR", level=Classification.CONFIDENTIAL),
        policy("KOR", level=Classification.RESTRICTED),
    ]
    results = await asyncio.gather(
        *(
            core.set_policy(op, p, "lower", expected=0)
            for op, p in zip(("op1", "op2"), lowered, strict=True)
        ),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, Precondition)]
    assert len(refused) == 1 and refused[0].code == "stale_version"
    assert [v.version for v in await core.history("KOR")] == [1, 2, 3]


async def test_conflicting_proposals_approved_at_once_one_applies(
    pki: Path, broker: Broker
) -> None:
    """Two proposals made against one version, approved at once by two operators: one
    applies; the other is refused stale_proposal and stays pending, never approved and
    left unapplied."""
    core = broker.admin
    cert = load_partner(pki / "partners" / "KOR").signing_cert_der
    proposed = await core.admit(
        "op1", "KOR", cert, policy("KOR", level=Classification.RESTRICTED), ""
    )
    assert proposed.proposal is not None
    await core.decide_proposal("op2", proposed.proposal.proposal_id, approve=True, reason="")
    pids = []
    for level in (Classification.CONFIDENTIAL, Classification.SECRET):
        change = await core.set_policy("op1", policy("KOR", level=level), "raise", expected=0)
        assert change.proposal is not None
        pids.append(change.proposal.proposal_id)
    results = await asyncio.gather(
        *(
            core.decide_proposal(op, pid, approve=True, reason="")
            for op, pid in zip(("op2", "op3"), pids, strict=True)
        ),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, Precondition)]
    assert len(refused) == 1 and refused[0].code == "stale_proposal"
    assert [v.version for v in await core.history("KOR")] == [1, 2, 3]
    pending = await core.proposals(include_decided=False)
    assert [p.proposal_id for p in pending] == [pids[results.index(refused[0])]]
    kinds = [
        e.kind
        for e in await core.query_audit(
            partner="KOR", kind="policy.", since_ms=0, until_ms=0, limit=0, tail=False
        )
    ]
    assert kinds.count("policy.approved") == 2 and kinds.count("policy.change") == 2
