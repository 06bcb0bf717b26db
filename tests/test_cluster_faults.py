"""Faults on a coalition served by two brokers over a three-node NATS JetStream cluster,
all real processes: nats-server SIGKILLed or SIGSTOPped, brokers SIGKILLed, at random
points of publish bursts; two operators approving conflicting proposals on two brokers
at once. After each: every acknowledged message is in every eligible inbox exactly
once, in no ineligible one, no node raised a gap alarm, and the audit chain verifies.

The CI share runs each fault a few times; ``make test-cluster`` (mark ``cluster_long``)
runs each at least ten times. Waits are bounded; nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from broker.jetstream.connect import ClusterSettings, connect
from clients.cluster import NatsCluster, NatsNode
from clients.sdk import ClientError
from coalition.labels import Classification
from coalition.policy import policy_to_proto
from tests.cluster_rig import Publisher, Rig, check_delivered
from tests.helpers import policy

pytestmark = pytest.mark.slow

# Longer than nats-server's longest Raft election timeout (9 s).
STOP_S = 12.0


@pytest.fixture
async def rig(pki: Path, tmp_path: Path) -> AsyncIterator[Rig]:
    nats = NatsCluster(tmp_path / "nats")
    await asyncio.to_thread(nats.start)
    r = Rig(pki, tmp_path, nats)
    try:
        await r.start_brokers(2)
        await r.admit_all()
        await r.start_nodes()
        yield r
    finally:
        await r.close()


async def publish_with(pub: Publisher, count: int, fault_after: int, fault: object) -> None:
    """Publish count messages; once fault_after more were acknowledged, run fault()."""
    start = len(pub.acked)
    task = asyncio.create_task(pub.run(count))
    while len(pub.acked) - start < fault_after and not task.done():  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    assert callable(fault)
    await fault()
    await asyncio.wait_for(task, 150)


async def stream_leader(rig: Rig, what: str = "MESSAGES") -> NatsNode:
    """The node leading one of the deployment's streams (re-read until one answers)."""
    settings = ClusterSettings(servers=tuple(rig.nats.urls), prefix=rig.prefix)
    nc = await connect(settings)
    try:
        for _ in range(100):
            try:
                info = await nc.jetstream().stream_info(settings.name(what))
                if info.cluster is not None and info.cluster.leader:
                    return rig.nats.node(info.cluster.leader)
            except Exception:  # no leader during an election: ask again
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    raise AssertionError(f"no leader for {what}")


async def nats_kill_rounds(rig: Rig, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    pub = Publisher(rig)
    for _ in range(rounds):
        node = rng.choice(rig.nats.nodes)

        async def kill(node: NatsNode = node) -> None:
            await asyncio.to_thread(node.kill)

        await publish_with(pub, 30, rng.randrange(1, 26), kill)
        await asyncio.to_thread(rig.nats.restart, node)
    await pub.run(10)  # and the cluster whole again takes writes
    assert pub.refused == []
    await check_delivered(rig, pub.acked)


async def broker_kill_rounds(rig: Rig, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    pub = Publisher(rig)
    for _ in range(rounds):
        broker = rng.choice(rig.brokers)

        async def kill(broker: object = broker) -> None:
            broker.signal(signal.SIGKILL)  # type: ignore[attr-defined]
            await broker.wait_exit()  # type: ignore[attr-defined]

        await publish_with(pub, 30, rng.randrange(1, 26), kill)
        await broker.start()
    await pub.run(10)
    assert pub.refused == []
    assert pub.resends > 0, "no kill cut a publish off"
    await check_delivered(rig, pub.acked)


async def test_sigkill_of_a_nats_server_mid_burst(rig: Rig) -> None:
    await nats_kill_rounds(rig, rounds=2, seed=1)


async def test_sigkill_of_a_broker_mid_burst(rig: Rig) -> None:
    await broker_kill_rounds(rig, rounds=2, seed=2)


@pytest.mark.cluster_long
async def test_sigkill_of_nats_servers_ten_times(rig: Rig) -> None:
    await nats_kill_rounds(rig, rounds=10, seed=11)


@pytest.mark.cluster_long
async def test_sigkill_of_brokers_ten_times(rig: Rig) -> None:
    await broker_kill_rounds(rig, rounds=10, seed=12)


@pytest.mark.cluster_long
async def test_sigstop_of_the_stream_leader_past_the_election_timeout(rig: Rig) -> None:
    pub = Publisher(rig)
    await pub.run(10)
    leader = await stream_leader(rig)

    async def pause() -> None:
        leader.signal(signal.SIGSTOP)

    await publish_with(pub, 40, 5, pause)
    await asyncio.sleep(STOP_S)
    leader.signal(signal.SIGCONT)
    await pub.run(20)  # the old leader is back as a follower; writes go on
    new = await stream_leader(rig)
    assert new.alive()
    assert pub.refused == []
    await check_delivered(rig, pub.acked)


async def test_conflicting_approvals_on_two_brokers_one_wins(rig: Rig) -> None:
    """op1 proposes two raises of USA's policy from the same version; op2 approves one
    through each broker at the same moment: exactly one applies, the other is refused,
    and both brokers then give the same answer."""
    pub = Publisher(rig)
    burst = asyncio.create_task(pub.run(20))
    for round_ in range(3):
        async with rig.operator("op1", 0) as op1:
            before = (await op1.policy("USA")).version
            a = policy("USA", level=Classification.TOP_SECRET, groups=("NATO", f"G{round_}A"))
            b = policy("USA", groups=("NATO", f"G{round_}B"))
            pa = (await op1.set_policy(policy_to_proto(a), "raise a", before)).proposal
            pb = (await op1.set_policy(policy_to_proto(b), "raise b", before)).proposal
        async with rig.operator("op2", 0) as on_a, rig.operator("op2", 1) as on_b:
            outcomes = await asyncio.gather(
                on_a.approve(pa.proposal_id, "yes"),
                on_b.approve(pb.proposal_id, "yes"),
                return_exceptions=True,
            )
        applied = [o for o in outcomes if not isinstance(o, BaseException)]
        refused = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(applied) == 1 and len(refused) == 1, outcomes
        err = refused[0]
        assert isinstance(err, ClientError), err
        assert err.status == grpc.StatusCode.FAILED_PRECONDITION, err
        for i in range(2):
            async with rig.operator("op1", i) as op:
                now = await op.policy("USA")
                assert now.version == before + 1
                assert len(await op.history("USA")) == before + 1
    await asyncio.wait_for(burst, 150)
    await check_delivered(rig, pub.acked)
