"""Every Admin RPC over real mTLS through OperatorClient: results, refusals, and their audit."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.server import Broker, start_broker
from clients.sdk import ClientError, OperatorClient
from coalition.audit_chain import ChainVerifier, checkpoint_body
from coalition.labels import Classification, parse_label
from coalition.pki import load_partner
from coalition.policy import PartnerStatus, policy_to_proto
from coalition.v1 import admin_pb2, audit_pb2, directory_pb2, envelope_pb2, exchange_pb2, policy_pb2
from tests.helpers import admit, broker_config, eventually, now_ms, operator, partner, policy

LABEL = parse_label("NATO SECRET // REL TO KOR, USA")


class Clock:
    """The broker's clock: real time plus an offset a test can move forward."""

    def __init__(self) -> None:
        self.offset = 0

    def __call__(self) -> int:
        return now_ms() + self.offset


@dataclasses.dataclass
class Env:
    broker: Broker
    clock: Clock
    op1: OperatorClient
    op2: OperatorClient


@pytest.fixture
async def env(pki: Path, tmp_path: Path, backend: dict[str, object]) -> AsyncIterator[Env]:
    clock = Clock()
    b = await start_broker(
        broker_config(pki, tmp_path / "broker", audit_checkpoint_every=10, **backend),
        clock=clock,
    )
    for code in ("KOR", "USA"):
        await admit(pki, b.port, policy(code))
    await admit(pki, b.port, policy("UKR", level=Classification.RESTRICTED))
    await admit(pki, b.port, policy("GBR"))
    async with operator(pki, "op1", b.port) as op1, operator(pki, "op2", b.port) as op2:
        try:
            yield Env(b, clock, op1, op2)
        finally:
            await b.stop(grace=1)


async def refused(
    op: OperatorClient, call: Awaitable[Any], status: grpc.StatusCode, code: str
) -> ClientError:
    """Assert call fails with status, and that the refusal is the newest admin.refused entry."""
    with pytest.raises(ClientError) as info:
        await call
    assert info.value.status == status, info.value
    [entry] = await op.audit(kind="admin.refused", tail=True, limit=1)
    assert entry.decision == code
    assert entry.actor == op.name
    assert json.loads(entry.detail_json)["reason"] == info.value.message
    return info.value


async def test_admit_partner_refusals(pki: Path, env: Env) -> None:
    nato = load_partner(pki / "partners" / "NATO")
    kor = load_partner(pki / "partners" / "KOR")
    pol = policy_to_proto(policy("NATO"))
    # KOR's signing certificate does not certify NATO; garbage is not a certificate at all.
    for cert in (kor.signing_cert_der, b"not a certificate"):
        err = await refused(
            env.op1,
            env.op1.admit("NATO", cert, pol, "wrong cert"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad_signing_cert",
        )
        assert "signing certificate refused" in err.message
    assert "NATO" not in {p.partner for p in await env.op1.partners()}
    # A second admission of a registered partner.
    await refused(
        env.op2,
        env.op2.admit("KOR", kor.signing_cert_der, policy_to_proto(policy("KOR")), "again"),
        grpc.StatusCode.ALREADY_EXISTS,
        "already_registered",
    )
    # A proper admission is a proposal until a second operator approves it.
    resp = await env.op1.admit("NATO", nato.signing_cert_der, pol, "join")
    assert resp.WhichOneof("result") == "proposal"
    shown = await env.op2.show("NATO")
    assert shown.summary.status == directory_pb2.PENDING
    stats = await env.op1.stats()  # a pending partner (no cursor yet) does not break Stats
    assert {s.partner: s.backlog for s in stats.partners}["NATO"] == 0
    await env.op2.approve(resp.proposal.proposal_id, "ok")
    assert (await env.op2.show("NATO")).summary.status == directory_pb2.ACTIVE


async def test_list_show_and_get_policy(pki: Path, env: Env) -> None:
    async with partner(pki, "KOR", env.broker.port) as kor:
        key_id = await kor.register_keys()
        listed = {p.partner: p for p in await env.op1.partners()}
        assert set(listed) == {"KOR", "USA", "UKR", "GBR"}
        assert all(p.status == directory_pb2.ACTIVE for p in listed.values())
        assert listed["KOR"].policy_version == 2  # registered, then the approved admission
        assert listed["KOR"].key_id == key_id and listed["USA"].key_id == ""
        shown = await env.op1.show("KOR")
        assert shown.summary.partner == "KOR" and shown.policy.version == 2
        assert shown.directory.partner == "KOR"
        assert shown.directory.signing_cert == kor.creds.signing_cert_der
        assert shown.directory.key_bundle == kor.creds.bundle
    got = await env.op2.policy("UKR")
    assert got.version == 2
    assert got.policy == policy_to_proto(policy("UKR", level=Classification.RESTRICTED))
    for call, action in (
        (env.op1.show("XYZ"), "show"),
        (env.op1.policy("XYZ"), "policy.get"),
        (env.op1.history("XYZ"), "policy.history"),
    ):
        await refused(env.op1, call, grpc.StatusCode.NOT_FOUND, "unknown_partner")
        [entry] = await env.op1.audit(kind="admin.refused", tail=True, limit=1)
        assert json.loads(entry.detail_json)["action"] == action
        assert entry.partner == "XYZ"


async def test_set_policy_lowering_raising_and_stale_version(env: Env) -> None:
    op1, op2 = env.op1, env.op2
    lowered = policy_to_proto(policy("USA", level=Classification.CONFIDENTIAL))
    resp = await op1.set_policy(lowered, "lower USA", expected_version=2)
    assert resp.WhichOneof("result") == "applied"  # lowering: one operator, at once
    assert resp.applied.version == 3 and resp.applied.approved_by == ""
    assert (await op2.policy("USA")).policy == lowered
    # Stale expected_version: the change was made against version 2.
    raised = policy_to_proto(policy("USA"))
    await refused(
        op1,
        op1.set_policy(raised, "raise USA", expected_version=2),
        grpc.StatusCode.FAILED_PRECONDITION,
        "stale_version",
    )
    # Raising becomes a proposal; the policy is unchanged until a second operator approves.
    resp = await op1.set_policy(raised, "raise USA back", expected_version=3)
    assert resp.WhichOneof("result") == "proposal"
    prop = resp.proposal
    assert prop.state == policy_pb2.PROPOSAL_PENDING and prop.proposed_by == "op1"
    assert "clearance NATO: CONFIDENTIAL -> SECRET" in prop.diff
    assert (await op2.policy("USA")).version == 3
    done = await op2.approve(prop.proposal_id, "checked")
    assert done.WhichOneof("result") == "applied"
    assert done.applied.version == 4
    assert (done.applied.changed_by, done.applied.approved_by) == ("op1", "op2")
    assert (await op1.policy("USA")).policy == raised
    # Already decided.
    await refused(
        op2,
        op2.approve(prop.proposal_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "proposal_decided",
    )
    await refused(op2, op2.approve("nonexistent"), grpc.StatusCode.NOT_FOUND, "unknown_proposal")
    # The history records who, when, why and the diff of every version.
    history = await op2.history("USA")
    assert [v.version for v in history] == [1, 2, 3, 4]
    v3, v4 = history[2], history[3]
    assert (v3.changed_by, v3.approved_by, v3.reason) == ("op1", "", "lower USA")
    assert "clearance NATO: SECRET -> CONFIDENTIAL" in v3.diff
    assert (v4.changed_by, v4.approved_by, v4.reason) == ("op1", "op2", "raise USA back")
    assert "clearance NATO: CONFIDENTIAL -> SECRET" in v4.diff
    assert 0 < v3.changed_ms <= v4.changed_ms <= env.clock()
    assert history[1].approved_by == "op2"  # the admission itself was approved
    # The audit log tells the same story.
    changes = await op1.audit(partner="USA", kind="policy.change")
    details = [json.loads(e.detail_json) for e in changes]
    assert [d["version"] for d in details] == [2, 3, 4]
    assert details[-1]["approved_by"] == "op2" and changes[-1].actor == "op1"


async def test_stale_proposal_reject_and_list(env: Env) -> None:
    op1, op2 = env.op1, env.op2
    more = dataclasses.replace(policy("GBR"), groups=frozenset({"NATO", "FVEY"}))
    p1 = (await op1.set_policy(policy_to_proto(more), "add FVEY")).proposal
    other = dataclasses.replace(policy("GBR"), subscribe_topics=("intel.*",))
    p2 = (await op1.set_policy(policy_to_proto(other), "wider subscribe")).proposal
    assert p1.proposal_id and p2.proposal_id
    # An intervening change: op2 lowers GBR's clearance, so p1 was made against a stale version.
    lowered = policy_to_proto(policy("GBR", level=Classification.CONFIDENTIAL))
    assert (await op2.set_policy(lowered, "lower GBR")).WhichOneof("result") == "applied"
    err = await refused(
        op2, op2.approve(p1.proposal_id), grpc.StatusCode.FAILED_PRECONDITION, "stale_proposal"
    )
    assert "propose again" in err.message
    assert (await op1.policy("GBR")).policy == lowered  # nothing applied
    # The stale approval left no policy.approved entry (the one there is GBR's admission).
    assert len(await op1.audit(kind="policy.approved", partner="GBR")) == 1
    # A stale proposal can still be rejected (by anyone, the proposer included).
    rej = await op1.reject(p1.proposal_id, "superseded")
    assert rej.WhichOneof("result") == "proposal"
    assert rej.proposal.state == policy_pb2.PROPOSAL_REJECTED
    assert rej.proposal.decided_by == "op1"
    await refused(
        op2, op2.reject(p1.proposal_id), grpc.StatusCode.FAILED_PRECONDITION, "proposal_decided"
    )
    await op2.reject(p2.proposal_id, "not needed")
    pending = await op1.proposals()
    assert pending == []
    everything = {p.proposal_id: p for p in await op1.proposals(all=True)}
    assert everything[p1.proposal_id].state == policy_pb2.PROPOSAL_REJECTED
    assert everything[p2.proposal_id].decided_by == "op2"
    # A new one is listed as pending alongside the decided ones.
    p3 = (await op2.set_policy(policy_to_proto(more), "add FVEY again")).proposal
    assert [p.proposal_id for p in await op1.proposals()] == [p3.proposal_id]
    decided = await op1.proposals(all=True)
    assert len(decided) == 4 + 3  # the four admissions, then p1, p2, p3
    assert {p1.proposal_id, p2.proposal_id, p3.proposal_id} <= {p.proposal_id for p in decided}
    rejected = await op1.audit(kind="policy.rejected")
    assert {json.loads(e.detail_json)["proposal"] for e in rejected} == {
        p1.proposal_id,
        p2.proposal_id,
    }


async def test_suspend_applies_at_once_and_reinstate_needs_two(env: Env) -> None:
    op1, op2 = env.op1, env.op2
    resp = await op1.suspend("UKR", "investigating")
    assert resp.WhichOneof("result") == "applied"
    assert resp.applied.policy.status == directory_pb2.SUSPENDED
    await refused(op2, op2.suspend("UKR", "again"), grpc.StatusCode.INVALID_ARGUMENT, "no_change")
    await refused(op2, op2.suspend("XYZ", "who"), grpc.StatusCode.NOT_FOUND, "unknown_partner")
    resp = await op1.reinstate("UKR", "cleared")
    assert resp.WhichOneof("result") == "proposal"
    assert (await op2.show("UKR")).summary.status == directory_pb2.SUSPENDED
    await refused(
        op1,
        op1.approve(resp.proposal.proposal_id),
        grpc.StatusCode.PERMISSION_DENIED,
        "self_approval",
    )
    done = await op2.approve(resp.proposal.proposal_id, "agreed")
    assert done.applied.approved_by == "op2"
    assert (await op1.show("UKR")).summary.status == directory_pb2.ACTIVE
    history = await op1.history("UKR")
    assert history[-1].reason == "cleared" and history[-2].reason == "investigating"


async def test_query_audit_filters(pki: Path, env: Env) -> None:
    op1 = env.op1
    env.clock.offset += 10_000
    t1 = env.clock()
    async with (
        partner(pki, "KOR", env.broker.port) as kor,
        partner(pki, "USA", env.broker.port) as usa,
    ):
        await usa.register_keys()
        for i in range(3):
            s = await kor.seal(f"m{i}".encode(), topic="intel.ground", label=LABEL)
            [r] = await kor.publish([s.envelope])
            assert r.outcome == exchange_pb2.ACCEPTED
        [bad] = await kor.publish([envelope_pb2.Envelope(header=b"\xff")])
        assert bad.outcome == exchange_pb2.REFUSED
    env.clock.offset += 10_000
    t2 = env.clock()
    await op1.suspend("GBR", "later")
    everything = await op1.audit()
    assert [e.seq for e in everything] == list(range(1, len(everything) + 1))
    # partner
    kor_entries = await op1.audit(partner="KOR")
    assert kor_entries and all(e.partner == "KOR" for e in kor_entries)
    assert {"publish.accepted", "publish.refused", "policy.change"} <= {e.kind for e in kor_entries}
    # kind is a prefix
    pubs = await op1.audit(kind="publish")
    assert sorted(e.kind for e in pubs) == ["publish.accepted"] * 3 + ["publish.refused"]
    assert await op1.audit(kind="publish.acc", partner="USA") == []
    # since (inclusive) and until (exclusive)
    window = await op1.audit(since_ms=t1, until_ms=t2)
    assert window and all(t1 <= e.time_ms < t2 for e in window)
    assert {e.kind for e in window} >= {"publish.accepted", "keys.registered"}
    later = await op1.audit(since_ms=t2)
    assert [e.kind for e in later if e.partner == "GBR"] == ["policy.change"]
    assert all(e.time_ms < t1 for e in await op1.audit(until_ms=t1))
    # limit and tail (tail keeps seq order)
    first = await op1.audit(limit=3)
    assert [e.seq for e in first] == [1, 2, 3]
    last = await op1.audit(limit=3, tail=True)
    current = await op1.audit()  # the queries above are not audited; this is stable
    assert [e.seq for e in last] == [e.seq for e in current[-3:]]
    [newest_pub] = await op1.audit(kind="publish.accepted", tail=True, limit=1)
    assert newest_pub.seq == pubs[2].seq


async def test_verify_and_export_audit_offline(pki: Path, env: Env) -> None:
    op1 = env.op1
    for _ in range(3):  # some more entries, so there are several checkpoints
        await op1.suspend("GBR", "s")
        p = (await op1.reinstate("GBR", "r")).proposal
        await env.op2.approve(p.proposal_id)
    verdict = await op1.verify_audit()
    assert verdict.ok, verdict.problem
    assert verdict.entries > 20 and verdict.checkpoints >= 2
    records = await op1.export_audit()
    entries = [r.entry for r in records if r.WhichOneof("kind") == "entry"]
    checkpoints = [r.checkpoint for r in records if r.WhichOneof("kind") == "checkpoint"]
    assert len(checkpoints) >= 2
    assert entries[-1].kind == "admin.action"  # VerifyAudit itself is on record
    # Offline: the broker's audit certificate from the PKI, checked against the CA.
    ca = x509.load_pem_x509_certificate((pki / "ca" / "ca.crt").read_bytes())
    audit_cert = x509.load_pem_x509_certificate((pki / "broker" / "audit.crt").read_bytes())
    audit_cert.verify_directly_issued_by(ca)
    audit_key = audit_cert.public_key()
    assert isinstance(audit_key, Ed25519PublicKey)
    for cp in checkpoints:
        audit_key.verify(cp.signature, checkpoint_body(cp.seq, cp.hash, cp.time_ms))
    verifier = ChainVerifier(audit_key)
    flat: list[audit_pb2.AuditEntry | audit_pb2.AuditCheckpoint] = [
        getattr(r, r.WhichOneof("kind") or "entry")
        for r in records
        if r.WhichOneof("kind") in ("entry", "checkpoint")
    ]
    verifier.feed(flat)
    result = verifier.result()
    assert result.ok, result.problem
    assert result.entries == len(entries) and result.checkpoints == len(checkpoints)
    # A rewritten entry in the export is caught and pointed at.
    tampered = list(flat)
    victim = next(i for i, x in enumerate(tampered) if isinstance(x, audit_pb2.AuditEntry))
    forged = audit_pb2.AuditEntry()
    forged.CopyFrom(tampered[victim])  # type: ignore[arg-type]
    forged.decision = "forged"
    tampered[victim] = forged
    bad = ChainVerifier(audit_key)
    bad.feed(tampered)
    assert not bad.result().ok and bad.result().first_broken_seq == forged.seq


async def test_stats_counts_streams_and_backlog(pki: Path, env: Env) -> None:
    async with (
        partner(pki, "KOR", env.broker.port) as kor,
        partner(pki, "USA", env.broker.port) as usa,
    ):
        await usa.register_keys()
        envs = [
            (await kor.seal(f"m{i}".encode(), topic="intel.ground", label=LABEL)).envelope
            for i in range(3)
        ]
        results = await kor.publish([*envs, envelope_pb2.Envelope(header=b"\xff")])
        assert [r.outcome for r in results] == [exchange_pb2.ACCEPTED] * 3 + [exchange_pb2.REFUSED]
        sub = usa.subscribe(["intel.>"])
        got: list[int] = []

        async def read() -> None:
            async for d in sub:
                got.append(d.offset)
                if len(got) == 1:
                    await sub.ack([d.offset])

        task = asyncio.create_task(read())
        try:
            await eventually(lambda: len(got) == 3 and sub.caught_up.is_set(), 10)

            async def settled() -> admin_pb2.StatsResponse:
                return await env.op1.stats()

            stats = await wait_for_stats(settled, lambda s: by(s)["USA"].backlog == 2)
            per = by(stats)
            assert (per["KOR"].published, per["KOR"].refused, per["KOR"].delivered) == (3, 1, 0)
            assert (per["USA"].published, per["USA"].delivered) == (0, 3)
            assert per["USA"].live_streams == 1 and stats.live_streams == 1
            assert stats.store_messages == 3 and stats.store_bytes > 0
            assert stats.audit_entries == (await env.broker.audit.count())
            # One of three deliveries acknowledged: two in the window; the refusal by reason.
            assert per["USA"].in_flight == 2 and per["KOR"].in_flight == 0
            assert dict(per["KOR"].refusals) == {results[3].reason_code: 1}
            msgs = await env.op1.messages()
            assert [m.offset for m in msgs] == sorted((r.offset for r in results[:3]), reverse=True)
            for m in msgs:
                assert (m.sender, m.topic, list(m.delivered_to)) == ("KOR", "intel.ground", ["USA"])
                assert int(m.label.classification) == LABEL.classification and m.size > 0
            assert [m.offset for m in await env.op1.messages(limit=1, sender="KOR")] == [
                msgs[0].offset
            ]
            assert await env.op1.messages(sender="USA") == []
            assert await env.op1.messages(topic="intel.air") == []
            older = await env.op1.messages(before_offset=msgs[0].offset)
            assert [m.offset for m in older] == [m.offset for m in msgs[1:]]
        finally:
            sub.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    stats = await wait_for_stats(env.op1.stats, lambda s: s.live_streams == 0)
    assert by(stats)["USA"].backlog == 2  # unacknowledged deliveries stay owed


def by(stats: admin_pb2.StatsResponse) -> dict[str, admin_pb2.PartnerStats]:
    return {p.partner: p for p in stats.partners}


async def wait_for_stats(
    get: Callable[[], Awaitable[admin_pb2.StatsResponse]],
    ok: Callable[[admin_pb2.StatsResponse], bool],
    timeout: float = 10.0,
) -> admin_pb2.StatsResponse:
    """Poll Stats until ok(stats) (a bound, not a timing assertion)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        stats = await get()
        if ok(stats):
            return stats
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"stats never matched: {stats}")
        await asyncio.sleep(0.05)


async def test_who_receives_with_reasons(pki: Path, env: Env) -> None:
    for code in ("KOR", "UKR", "GBR"):
        async with partner(pki, code, env.broker.port) as c:
            await c.register_keys()
    resp = await env.op1.who_receives(LABEL, "intel.ground")
    got = {d.partner: (d.allowed, d.reason) for d in resp.decisions}
    assert got == {
        "KOR": (True, "allow"),
        "USA": (False, "no_key_bundle"),  # policy allows it, but it registered no key
        "UKR": (False, "above_clearance"),
        "GBR": (False, "not_releasable"),
    }
    assert all(d.explanation for d in resp.decisions if not d.allowed)
    topic = {d.partner: d.reason for d in (await env.op1.who_receives(LABEL, "ops.x")).decisions}
    assert topic["KOR"] == "topic_not_permitted"
    await env.op1.suspend("KOR", "pause")
    again = {d.partner: d.reason for d in (await env.op1.who_receives(LABEL, "intel.a")).decisions}
    assert again["KOR"] == "suspended"
    await refused(
        env.op1,
        env.op1.who_receives(LABEL, "Not A Topic"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad_label",
    )


async def test_every_refusal_is_audited(env: Env) -> None:
    """Across the refusals above, each one left an admin.refused entry naming the action."""
    calls: list[tuple[Awaitable[Any], str]] = [
        (env.op1.show("NOPE"), "show"),
        (env.op1.set_policy(policy_to_proto(policy("NOPE")), "x"), "policy.set"),
        (env.op1.reinstate("NOPE", "x"), "reinstate"),
        (env.op1.reject("nope"), "proposal.reject"),
        (
            env.op1.set_policy(
                policy_to_proto(dataclasses.replace(policy("KOR"), status=PartnerStatus.ACTIVE)),
                "same",
            ),
            "policy.set",
        ),
    ]
    for call, _ in calls:
        with pytest.raises(ClientError):
            await call
    entries = await env.op1.audit(kind="admin.refused")
    assert [json.loads(e.detail_json)["action"] for e in entries] == [a for _, a in calls]
    assert all(e.actor == "op1" and e.decision for e in entries)
