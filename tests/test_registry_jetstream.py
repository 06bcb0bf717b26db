"""Two brokers' registries over one JetStream deployment (a real three-node nats-server
cluster): a change through one is seen by the other and fires its on_change; two
operators racing on two brokers never both win; every change has exactly one audit
record in the outbox."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest

from broker.audit.items import AuditItem
from broker.errors import AlreadyExists
from broker.jetstream.connect import ClusterSettings, connect
from broker.jetstream.registry import JetStreamRegistry
from broker.registry import StaleVersion
from broker.registry_types import RegistryChange
from coalition.labels import Classification
from coalition.policy import PartnerStatus
from coalition.v1 import directory_pb2, policy_pb2
from tests.helpers import eventually, policy

pytestmark = pytest.mark.asyncio

APPROVED = policy_pb2.PROPOSAL_APPROVED


@pytest.fixture
async def pair(cluster_settings: ClusterSettings) -> AsyncIterator[list[JetStreamRegistry]]:
    """Two registries of one deployment, each on its own connection (two brokers)."""
    conns = [await connect(cluster_settings) for _ in range(2)]
    regs = [await JetStreamRegistry.open(nc, cluster_settings) for nc in conns]
    yield regs
    for reg in regs:
        reg.close()
    for nc in conns:
        await nc.close()


def item(kind: str, partner: str, **detail: object) -> AuditItem:
    return AuditItem(kind, "op", partner, "", "allow", dict(detail))


async def register(reg: JetStreamRegistry, code: str) -> None:
    await reg.register(
        code,
        b"cert",
        policy(code, status=PartnerStatus.PENDING),
        actor="op1",
        reason="",
        now_ms=1,
        audit=item("partner.registered", code),
    )


async def test_a_change_through_one_broker_reaches_the_other(
    pair: list[JetStreamRegistry],
) -> None:
    a, b = pair
    heard: list[RegistryChange] = []
    b.on_change(heard.append)
    await register(a, "KOR")
    await eventually(lambda: b.get("KOR") is not None)
    suspended = policy("KOR", status=PartnerStatus.SUSPENDED)
    await a.apply(suspended, changed_by="op1", approved_by="", reason="", diff=["s"], now_ms=2)
    await eventually(lambda: len(heard) == 2)
    change = heard[-1]
    # What the exchange needs to close the partner's live streams on broker b at once.
    assert (change.kind, change.partner, change.local) == ("policy", "KOR", False)
    assert change.record is b.get("KOR")
    assert change.record is not None and change.record.policy.status is PartnerStatus.SUSPENDED
    bundle = directory_pb2.SignedKeyBundle(bundle=b"b")
    await a.set_bundle("KOR", "k1", bundle, 3)
    prop = await a.propose(
        policy("KOR"), base_version=2, proposed_by="op1", reason="", diff=["d"], now_ms=4
    )
    await eventually(lambda: len(heard) == 4)
    assert [(c.kind, c.local) for c in heard[2:]] == [("keys", False), ("proposal", False)]
    rec = b.get("KOR")
    assert rec is not None and rec.key_id == "k1" and rec.bundle == bundle
    assert await b.proposal(prop.proposal_id) == (prop, 2)
    assert await b.history("KOR") == await a.history("KOR")
    # b's own change: b hears it as local, a as another broker's.
    heard_a: list[RegistryChange] = []
    a.on_change(heard_a.append)
    await b.decide_proposal(prop.proposal_id, state=APPROVED, decided_by="op2")
    assert [(c.kind, c.local) for c in heard[4:]] == [("proposal", True)]
    await eventually(lambda: len(heard_a) == 1)
    assert (heard_a[0].kind, heard_a[0].local) == ("proposal", False)


async def test_two_operators_approving_at_once_one_wins(pair: list[JetStreamRegistry]) -> None:
    a, b = pair
    await register(a, "KOR")
    for n in range(10):
        prop = await a.propose(
            policy("KOR"), base_version=1, proposed_by="op1", reason="", diff=["d"], now_ms=n
        )
        # No waiting for b to hear of it: b reads the stream again before it would answer
        # "no such proposal".
        won = await asyncio.gather(
            *(
                reg.decide_proposal(
                    prop.proposal_id,
                    state=APPROVED,
                    decided_by=op,
                    audit=item("policy.approved", "KOR", proposal=prop.proposal_id, by=op),
                )
                for reg, op in ((a, "op2"), (b, "op3"))
            )
        )
        assert sorted(won) == [False, True]
        winner = "op2" if won[0] else "op3"
        for reg in pair:
            await eventually(_decided(reg, prop.proposal_id, winner))
    rows = await a.read_outbox(0, 1000)
    approvals = [json.loads(r.record) for r in rows if "approved" in r.record]
    assert len(approvals) == 10  # one record per proposal: the loser's never committed
    assert len({d["detail"]["proposal"] for d in approvals}) == 10


def _decided(reg: JetStreamRegistry, pid: str, by: str) -> Callable[[], bool]:
    def decided() -> bool:
        found = reg._view.proposals.get(pid)
        return found is not None and found[0].decided_by == by

    return decided


async def test_conflicting_proposals_approved_at_once_one_applies(
    pair: list[JetStreamRegistry],
) -> None:
    a, b = pair
    await register(a, "KOR")
    for n in range(5):
        rec = a.get("KOR")
        assert rec is not None
        base = rec.version
        props = [
            await a.propose(
                policy("KOR", level=level), base_version=base, proposed_by="op1", reason="",
                diff=["d"], now_ms=n,
            )
            for level in (Classification.SECRET, Classification.TOP_SECRET)
        ]  # fmt: skip

        async def approve(reg: JetStreamRegistry, pid: str, base: int = base, n: int = n) -> str:
            try:
                pv = await reg.approve(
                    pid,
                    decided_by="op2",
                    now_ms=n,
                    audit=lambda v: [
                        item("policy.approved", "KOR", proposal=pid),
                        item("policy.change", "KOR", version=v),
                    ],
                )
            except StaleVersion:
                return "stale"
            assert pv is not None and pv.version == base + 1
            return "applied"

        outcome = await asyncio.gather(
            approve(a, props[0].proposal_id), approve(b, props[1].proposal_id)
        )
        assert sorted(outcome) == ["applied", "stale"]
        loser = props[outcome.index("stale")].proposal_id
        found = await a.proposal(loser)
        assert found is not None and found[0].state == policy_pb2.PROPOSAL_PENDING
    assert [v.version for v in await a.history("KOR")] == list(range(1, 7))
    rows = [json.loads(r.record) for r in await a.read_outbox(0, 1000)]
    assert sum(r["kind"] == "policy.approved" for r in rows) == 5
    assert [r["detail"]["version"] for r in rows if r["kind"] == "policy.change"] == [2, 3, 4, 5, 6]


async def test_conflicting_policy_versions_at_once_one_wins(
    pair: list[JetStreamRegistry],
) -> None:
    a, b = pair
    await register(a, "KOR")
    await eventually(lambda: b.get("KOR") is not None)
    for n in range(10):
        rec = a.get("KOR")
        assert rec is not None
        # b may not have heard of a's last change yet: it reads the stream again before it
        # refuses, so the refusal names the version that won.
        result = await asyncio.gather(
            _change(a, Classification.SECRET, rec.version, n),
            _change(b, Classification.CONFIDENTIAL, rec.version, n),
        )
        assert sorted(result) == ["applied", "stale"]
    # Without an expected version both apply, one after the other, never the same number.
    await asyncio.gather(
        *(
            reg.apply(
                policy("KOR"), changed_by="op", approved_by="", reason="", diff=["d"], now_ms=0
            )
            for reg in pair
        )
    )
    for reg in pair:
        await eventually(_versions(reg, 13))
        assert [v.version for v in await reg.history("KOR")] == list(range(1, 14))
        assert reg.get("KOR").version == 13  # type: ignore[union-attr]
    rows = await b.read_outbox(0, 1000)
    versions = [json.loads(r.record)["detail"].get("version") for r in rows]
    assert versions == [None, *range(2, 12)]  # one record per audited change, none for the rest


async def _change(reg: JetStreamRegistry, level: Classification, current: int, n: int) -> str:
    try:
        pv = await reg.apply(
            policy("KOR", level=level),
            changed_by="op",
            approved_by="op2",
            reason=str(n),
            diff=["d"],
            now_ms=n,
            expected_version=current,
            audit=lambda v: item("policy.change", "KOR", version=v),
        )
    except StaleVersion as exc:
        assert exc.current == current + 1
        return "stale"
    assert pv.version == current + 1
    return "applied"


def _versions(reg: JetStreamRegistry, n: int) -> Callable[[], bool]:
    return lambda: len(reg._view.versions.get("KOR", [])) == n


async def test_a_broker_behind_the_caller_reads_the_stream_again(
    pair: list[JetStreamRegistry],
) -> None:
    a, b = pair
    for n in range(5):
        # Operators read versions through one broker and act through the other at once.
        code = f"P{n}"
        await register(a, code)
        bundle = directory_pb2.SignedKeyBundle(bundle=b"b")
        await b.set_bundle(code, "k", bundle, 1)
        pv = await a.apply(
            policy(code), changed_by="op", approved_by="", reason="", diff=["d"], now_ms=2
        )
        applied = await b.apply(
            policy(code, level=Classification.RESTRICTED),
            changed_by="op",
            approved_by="",
            reason="",
            diff=["d"],
            now_ms=3,
            expected_version=pv.version,
        )
        assert applied.version == pv.version + 1
        prop = await a.propose(
            policy(code), base_version=3, proposed_by="op1", reason="", diff=["d"], now_ms=4
        )
        assert await b.decide_proposal(prop.proposal_id, state=APPROVED, decided_by="op2")
    with pytest.raises(KeyError):
        await b.set_bundle("NOPE", "k", directory_pb2.SignedKeyBundle(), 1)
    with pytest.raises(KeyError):
        await b.apply(policy("NOPE"), changed_by="", approved_by="", reason="", diff=[], now_ms=0)


async def test_the_same_partner_registered_at_once_once(pair: list[JetStreamRegistry]) -> None:
    results = await asyncio.gather(*(register(r, "KOR") for r in pair), return_exceptions=True)
    refused = [r for r in results if isinstance(r, AlreadyExists)]
    assert len(refused) == 1 and refused[0].code == "already_registered"
    assert results.count(None) == 1
    for reg in pair:
        await eventually(_versions(reg, 1))
        assert [v.version for v in await reg.history("KOR")] == [1]
    kinds = [json.loads(r.record)["kind"] for r in await pair[0].read_outbox(0, 10)]
    assert kinds == ["partner.registered"]


async def test_an_unreadable_message_is_skipped_and_the_watch_goes_on(
    pair: list[JetStreamRegistry], cluster_settings: ClusterSettings
) -> None:
    a, b = pair
    await register(a, "KOR")
    nc = await connect(cluster_settings)
    try:
        # Something no broker writes, where a proposal would be: the last message.
        subject = cluster_settings.subject("reg", "proposal", "junk")
        await nc.jetstream().publish(subject, b"\xff\xff not protobuf")
        # A registry opened now reads to the end (past it) and serves.
        c = await JetStreamRegistry.open(nc, cluster_settings, sync_timeout_s=10)
        assert c.get("KOR") is not None and await c.proposals(include_decided=True) == []
        c.close()
    finally:
        await nc.close()
    await register(a, "USA")
    await eventually(lambda: b.get("USA") is not None)
