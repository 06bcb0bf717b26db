"""The registry's contract, the same on both backends: SQLite (one broker's state.db)
and JetStream (a stream on a real three-node nats-server cluster, R3, sync always).

Partners, versioned policies, proposals and the two-person rule's state, key bundles;
every change commits exactly one audit record to the outbox; reads see a change when
it returns; a reopened registry sees everything that was committed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from broker.audit.items import AuditItem
from broker.jetstream.connect import ClusterSettings, connect
from broker.jetstream.registry import JetStreamRegistry
from broker.registry import PartnerRegistry, Registry, StaleVersion
from broker.registry_types import RegistryChange
from coalition.labels import Classification
from coalition.policy import PartnerStatus, policy_from_proto
from coalition.v1 import directory_pb2, policy_pb2
from tests.helpers import policy

pytestmark = pytest.mark.asyncio

Opener = Callable[[], Awaitable[PartnerRegistry]]
APPROVED = policy_pb2.PROPOSAL_APPROVED


@pytest.fixture(params=["sqlite", "jetstream"])
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens the registry of one deployment (again and again: a reopen sees what the
    earlier ones committed); closes them all at the end."""
    opened: list[PartnerRegistry] = []
    closers: list[Callable[[], Awaitable[None]]] = []
    if request.param == "sqlite":

        async def open_registry() -> PartnerRegistry:
            reg = Registry(tmp_path / "state.db")
            opened.append(reg)
            return reg

    else:
        settings: ClusterSettings = request.getfixturevalue("cluster_settings")

        async def open_registry() -> PartnerRegistry:
            nc = await connect(settings)
            closers.append(nc.close)
            reg = await JetStreamRegistry.open(nc, settings)
            opened.append(reg)
            return reg

    yield open_registry
    for reg in opened:
        reg.close()
    for close in closers:
        await close()


def item(kind: str, partner: str, **detail: object) -> AuditItem:
    return AuditItem(kind, "op1", partner, "", "allow", dict(detail))


async def register(reg: PartnerRegistry, code: str) -> policy_pb2.PolicyVersion:
    return await reg.register(
        code,
        b"cert-" + code.encode(),
        policy(code, status=PartnerStatus.PENDING),
        actor="op1",
        reason="joins",
        now_ms=1000,
        audit=item("partner.registered", code),
    )


async def test_partners_and_policy_versions(opener: Opener) -> None:
    reg = await opener()
    seen: list[RegistryChange] = []
    reg.on_change(seen.append)
    pv = await register(reg, "KOR")
    assert pv.version == 1 and list(pv.diff) == ["registered"]
    rec = reg.get("KOR")
    assert rec is not None and (rec.code, rec.signing_cert, rec.version) == ("KOR", b"cert-KOR", 1)
    assert rec.policy.status is PartnerStatus.PENDING and rec.bundle is None
    assert reg.get("USA") is None

    active = policy("KOR")
    v2 = await reg.apply(
        active,
        changed_by="op1",
        approved_by="op2",
        reason="admitted",
        diff=["status"],
        now_ms=2000,
        expected_version=1,
        audit=lambda v: item("policy.change", "KOR", version=v),
    )
    assert v2.version == 2 and v2.approved_by == "op2"
    assert rec.version == 2 and rec.policy == active  # the record a caller holds is current
    lower = policy("KOR", level=Classification.RESTRICTED)
    with pytest.raises(StaleVersion) as stale:
        await reg.apply(
            lower, changed_by="op1", approved_by="", reason="", diff=["x"], now_ms=3000,
            expected_version=1,
        )  # fmt: skip
    assert stale.value.current == 2
    v3 = await reg.apply(
        lower, changed_by="op1", approved_by="", reason="lower", diff=["x"], now_ms=3000
    )
    assert v3.version == 3
    await register(reg, "USA")
    assert [r.code for r in reg.all()] == ["KOR", "USA"]
    history = await reg.history("KOR")
    assert [(v.version, v.changed_ms, v.reason) for v in history] == [
        (1, 1000, "joins"),
        (2, 2000, "admitted"),
        (3, 3000, "lower"),
    ]
    assert policy_from_proto(history[-1].policy) == lower
    assert await reg.history("NOPE") == []
    assert [(c.kind, c.partner, c.local) for c in seen] == [
        ("policy", "KOR", True),
        ("policy", "KOR", True),
        ("policy", "KOR", True),
        ("policy", "USA", True),
    ]
    assert seen[-1].record is reg.get("USA")


async def test_proposals_are_decided_once(opener: Opener) -> None:
    reg = await opener()
    await register(reg, "KOR")
    raised = policy("KOR")
    prop = await reg.propose(
        raised,
        base_version=1,
        proposed_by="op1",
        reason="raise",
        diff=["clearance"],
        now_ms=5000,
        audit=lambda pid: item("policy.proposed", "KOR", proposal=pid),
    )
    other = await reg.propose(
        raised, base_version=1, proposed_by="op2", reason="", diff=["c"], now_ms=6000
    )
    assert prop.state == policy_pb2.PROPOSAL_PENDING
    found = await reg.proposal(prop.proposal_id)
    assert found is not None
    got, base = found
    assert base == 1 and got == prop
    got.state = policy_pb2.PROPOSAL_REJECTED  # a caller's copy: the registry is unchanged
    assert [p.proposal_id for p in await reg.proposals(include_decided=False)] == [
        prop.proposal_id,
        other.proposal_id,
    ]
    approved = policy_pb2.PROPOSAL_APPROVED
    decided = item("policy.approved", "KOR", proposal=prop.proposal_id)
    pid = prop.proposal_id
    assert await reg.decide_proposal(pid, state=approved, decided_by="op2", audit=decided)
    assert not await reg.decide_proposal(pid, state=approved, decided_by="op3", audit=decided)
    assert not await reg.decide_proposal("nope", state=approved, decided_by="op2")
    assert [p.proposal_id for p in await reg.proposals(include_decided=False)] == [
        other.proposal_id
    ]
    everything = await reg.proposals(include_decided=True)
    assert [(p.proposal_id, p.state, p.decided_by) for p in everything] == [
        (pid, approved, "op2"),
        (other.proposal_id, policy_pb2.PROPOSAL_PENDING, ""),
    ]
    assert await reg.proposal("nope") is None
    # One decision, one audit record: the refused second decision wrote nothing.
    kinds = [json.loads(r.record)["kind"] for r in await reg.read_outbox(0, 100)]
    assert kinds == ["partner.registered", "policy.proposed", "policy.approved"]


async def test_key_bundles(opener: Opener) -> None:
    reg = await opener()
    await register(reg, "KOR")
    for n in (1, 2):
        bundle = directory_pb2.SignedKeyBundle(bundle=b"bundle-%d" % n, signature=b"sig")
        await reg.set_bundle(
            "KOR", f"k{n}", bundle, 1000 + n, audit=item("keys.registered", "KOR", key_id=n)
        )
        rec = reg.get("KOR")
        assert rec is not None and rec.key_id == f"k{n}" and rec.bundle == bundle
    with pytest.raises(KeyError):
        await reg.set_bundle("NOPE", "k", directory_pb2.SignedKeyBundle(), 1)


async def test_each_change_has_one_outbox_record_until_forgotten(opener: Opener) -> None:
    reg = await opener()
    await register(reg, "KOR")
    await reg.apply(
        policy("KOR"),
        changed_by="op1",
        approved_by="op2",
        reason="",
        diff=["d"],
        now_ms=2000,
        audit=lambda v: item("policy.change", "KOR", version=v),
    )
    # A change without an audit entry (none given) has no outbox record.
    await reg.set_bundle("KOR", "k1", directory_pb2.SignedKeyBundle(bundle=b"b"), 2500)
    await reg.set_bundle(
        "KOR",
        "k2",
        directory_pb2.SignedKeyBundle(bundle=b"c"),
        3000,
        item("keys.registered", "KOR"),
    )
    rows = await reg.read_outbox(0, 100)
    assert [json.loads(r.record)["kind"] for r in rows] == [
        "partner.registered",
        "policy.change",
        "keys.registered",
    ]
    ids = [r.id for r in rows]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert [r.time_ms for r in rows] == [1000, 2000, 3000]
    for r in rows:
        assert json.loads(r.record)["detail"]["ref"] == f"registry:{r.id}"
    assert json.loads(rows[1].record)["detail"]["version"] == 2
    assert [r.id for r in await reg.read_outbox(ids[0], 1)] == [ids[1]]
    await reg.forget_outbox(ids[1])
    assert [r.id for r in await reg.read_outbox(0, 100)] == [ids[2]]
    again = await opener()  # forgotten for good: a reopened registry reads only the rest
    assert [r.id for r in await again.read_outbox(0, 100)] == [ids[2]]


async def test_a_reopened_registry_sees_everything(opener: Opener) -> None:
    reg = await opener()
    await register(reg, "KOR")
    await register(reg, "USA")
    await reg.apply(
        policy("KOR"), changed_by="op1", approved_by="op2", reason="r", diff=["d"], now_ms=2
    )
    bundle = directory_pb2.SignedKeyBundle(bundle=b"b", signature=b"s")
    await reg.set_bundle("USA", "kid", bundle, 3)
    prop = await reg.propose(
        policy("USA"), base_version=1, proposed_by="op1", reason="", diff=["x"], now_ms=4
    )
    again = await opener()
    assert [(r.code, r.version, r.signing_cert) for r in again.all()] == [
        ("KOR", 2, b"cert-KOR"),
        ("USA", 1, b"cert-USA"),
    ]
    usa = again.get("USA")
    assert usa is not None and usa.bundle == bundle and usa.key_id == "kid"
    assert await again.history("KOR") == await reg.history("KOR")
    assert await again.proposal(prop.proposal_id) == (prop, 1)
    assert await again.read_outbox(0, 100) == await reg.read_outbox(0, 100)
    assert len(await again.read_outbox(0, 100)) == 2


async def test_an_approval_decides_and_applies_in_one_commit(opener: Opener) -> None:
    reg = await opener()
    await register(reg, "KOR")

    async def propose(base: int) -> str:
        prop = await reg.propose(
            policy("KOR"), base_version=base, proposed_by="op1", reason="why", diff=["d"], now_ms=2
        )
        return prop.proposal_id

    def entries(version: int) -> list[AuditItem]:
        return [item("policy.approved", "KOR"), item("policy.change", "KOR", version=version)]

    first, second = await propose(1), await propose(1)
    outbox = len(await reg.read_outbox(0, 100))
    seen: list[RegistryChange] = []
    reg.on_change(seen.append)
    pv = await reg.approve(first, decided_by="op2", now_ms=3, audit=entries)
    assert pv is not None and (pv.version, pv.changed_by, pv.approved_by) == (2, "op1", "op2")
    assert (pv.reason, list(pv.diff), pv.changed_ms) == ("why", ["d"], 3)
    rec = reg.get("KOR")
    assert rec is not None and rec.version == 2 and rec.policy == policy("KOR")
    found = await reg.proposal(first)
    assert found is not None and found[0].state == APPROVED and found[0].decided_by == "op2"
    rows = (await reg.read_outbox(0, 100))[outbox:]
    assert [json.loads(r.record)["kind"] for r in rows] == ["policy.approved", "policy.change"]
    assert [(c.kind, c.partner) for c in seen] == [("proposal", "KOR"), ("policy", "KOR")]
    # Decided already: nothing is written.
    assert await reg.approve(first, decided_by="op3", now_ms=4, audit=entries) is None
    assert await reg.approve("nope", decided_by="op3", now_ms=4, audit=entries) is None
    # Made against version 1, the policy is at 2: refused, and it stays pending.
    with pytest.raises(StaleVersion) as stale:
        await reg.approve(second, decided_by="op2", now_ms=5, audit=entries)
    assert stale.value.current == 2
    found = await reg.proposal(second)
    assert found is not None and found[0].state == policy_pb2.PROPOSAL_PENDING
    assert [v.version for v in await reg.history("KOR")] == [1, 2]
    assert len(await reg.read_outbox(0, 100)) == outbox + 2
