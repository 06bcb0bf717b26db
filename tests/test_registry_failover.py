"""Registry changes made while the registry stream's leader is killed (SIGKILL of a real
nats-server of a three-node cluster): every change the caller was told of is recorded
exactly once, with exactly one audit record, and both brokers' views agree; a change
whose outcome could not be known in time was recorded once or not at all."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import nats
import pytest

from broker.audit.items import AuditItem
from broker.errors import Unavailable
from broker.jetstream.connect import ClusterSettings, connect
from broker.jetstream.registry import JetStreamRegistry
from clients.cluster import NatsCluster
from coalition.labels import Classification
from coalition.policy import PartnerStatus
from tests.helpers import eventually, policy

pytestmark = pytest.mark.asyncio

CHANGES = 40


async def test_changes_through_a_leader_failover_are_recorded_once(tmp_path: Path) -> None:
    with NatsCluster(tmp_path) as cluster:
        settings = ClusterSettings(servers=tuple(cluster.urls), prefix="FAILOVER")
        conns = [await connect(settings) for _ in range(2)]
        try:
            a, b = [await JetStreamRegistry.open(nc, settings) for nc in conns]
            await a.register(
                "KOR",
                b"cert",
                policy("KOR", status=PartnerStatus.PENDING),
                actor="op1",
                reason="",
                now_ms=0,
                audit=AuditItem("partner.registered", "op1", "KOR", "", "allow", {}),
            )
            info = await conns[0].jetstream().stream_info(settings.name("REGISTRY"))
            assert info.cluster is not None
            leader = next(n for n in cluster.nodes if n.name == info.cluster.leader)
            told: list[int] = []  # versions the caller was told were applied
            unknown = 0

            async def changes() -> None:
                nonlocal unknown
                levels = (Classification.SECRET, Classification.CONFIDENTIAL)
                for n in range(CHANGES):
                    try:
                        pv = await a.apply(
                            policy("KOR", level=levels[n % 2]),
                            changed_by="op1",
                            approved_by="op2",
                            reason=str(n),
                            diff=["d"],
                            now_ms=n,
                            audit=_entry if n % 2 == 0 else None,  # a batch, or one message
                        )
                        told.append(pv.version)
                    except Unavailable:
                        unknown += 1

            writing = asyncio.create_task(changes())
            await eventually(lambda: len(told) >= 5, timeout=30)
            leader.kill()
            await writing
            assert len(told) + unknown == CHANGES
            assert len(told) >= CHANGES - 2  # a change fails only if no leader is elected in time
            assert told == sorted(set(told))  # each told version is its own
            history = [v.version for v in await a.history("KOR")]
            assert history == list(range(1, len(history) + 1))  # no version twice, none skipped
            assert set(told) <= set(history)
            assert len(history) - 1 <= CHANGES  # nothing recorded twice
            # One audit record per recorded audited change, none for a change not recorded.
            rows = await a.read_outbox(0, 1000)
            versions = [json.loads(r.record)["detail"].get("version") for r in rows]
            audited = [v.version for v in (await a.history("KOR"))[1:] if int(v.reason) % 2 == 0]
            assert versions == [None, *audited]
            # The other broker's view agrees.
            await eventually(lambda: len(b._view.versions.get("KOR", [])) == len(history), 30)
            assert await b.history("KOR") == await a.history("KOR")
            for reg in (a, b):
                reg.close()
        finally:
            for nc in conns:
                await nc.close()


async def test_the_watch_survives_the_death_of_its_server(tmp_path: Path) -> None:
    """The nats-server holding a broker's watch of the registry dies: the watch moves to a
    live server and the broker hears of the next change made through another broker."""
    with NatsCluster(tmp_path) as cluster:
        settings = ClusterSettings(servers=tuple(cluster.urls), prefix="WATCH")
        conns = [await connect(settings) for _ in range(2)]
        try:
            a, b = [await JetStreamRegistry.open(nc, settings) for nc in conns]
            await a.register("KOR", b"cert", policy("KOR"), actor="op1", reason="", now_ms=0)
            await eventually(lambda: b.get("KOR") is not None)
            heard: list[str] = []
            b.on_change(lambda change: heard.append(change.partner))
            watch = b._s._sub
            info = (
                await conns[0].jetstream().consumer_info(settings.name("REGISTRY"), watch._consumer)
            )
            assert info.cluster is not None
            host = next(n for n in cluster.nodes if n.name == info.cluster.leader)
            host.kill()
            suspended = policy("KOR", status=PartnerStatus.SUSPENDED)
            await a.apply(
                suspended, changed_by="op1", approved_by="", reason="", diff=["s"], now_ms=1
            )
            await eventually(lambda: heard == ["KOR"], timeout=45)
            rec = b.get("KOR")
            assert rec is not None and rec.policy.status is PartnerStatus.SUSPENDED
            for reg in (a, b):
                reg.close()
        finally:
            for nc in conns:
                await nc.close()


async def test_a_broker_whose_server_freezes_carries_on_through_another(
    tmp_path: Path,
) -> None:
    """SIGSTOP of the nats-server a broker is connected to (a follower: the stream keeps
    its leader): the broker's unanswered pings show it within seconds, it reconnects to a
    live server, and the change whose request the frozen server swallowed is checked,
    sent again and recorded once."""
    with NatsCluster(tmp_path) as cluster:
        first = ClusterSettings(servers=tuple(cluster.urls), prefix="FROZEN")
        nc0 = await connect(first)
        try:
            a0 = await JetStreamRegistry.open(nc0, first)
            await a0.register("KOR", b"cert", policy("KOR"), actor="op1", reason="", now_ms=0)
            info = await nc0.jetstream().stream_info(first.name("REGISTRY"))
            assert info.cluster is not None
            frozen = next(n for n in cluster.nodes if n.name != info.cluster.leader)
            # This broker knows only the server about to freeze (it learns the others),
            # and pings it every 2 s, as the broker's connection does, so it soon sees
            # that the server answers nothing.
            settings = ClusterSettings(servers=(frozen.url,), prefix="FROZEN")
            nc = await nats.connect(
                servers=[frozen.url], ping_interval=2, max_outstanding_pings=2,
                max_reconnect_attempts=-1, reconnect_time_wait=0.25,
            )  # fmt: skip
            a = await JetStreamRegistry.open(nc, settings)
            frozen.signal(signal.SIGSTOP)
            try:
                lowered = policy("KOR", level=Classification.RESTRICTED)
                pv = await a.apply(
                    lowered, changed_by="op1", approved_by="", reason="", diff=["d"], now_ms=1
                )
            finally:
                frozen.signal(signal.SIGCONT)
            assert pv.version == 2
            assert [v.version for v in await a.history("KOR")] == [1, 2]
            a.close()
            await nc.close()
            a0.close()
        finally:
            await nc0.close()


def _entry(version: int) -> AuditItem:
    return AuditItem("policy.change", "op1", "KOR", "", "allow", {"version": version})
