"""The JetStream audit log through the loss of its stream's leader: two brokers keep
recording and draining while the leader is killed (SIGKILL) or frozen (SIGSTOP) longer
than an election; every record lands in the one chain exactly once and it verifies.

A publish in flight to the dead leader loses its answer: the broker sends it again
with the same message id, and the stream either dedupes it or refuses it while the
broker looks for it among the blocks stored since. These tests run their own cluster.

And a broker's drainer SIGKILLed at random points (a real process, ten times): each
outbox row is chained once, each acknowledged record once, nothing twice.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import AuditItem
from broker.audit.drainer import Drainer
from broker.audit.items import encode
from broker.jetstream.audit import JetStreamAuditLog
from broker.jetstream.connect import ClusterSettings, connect
from broker.store import SqliteMessageStore
from clients.cluster import NatsCluster
from tests.test_broker_faults import ROOT

pytestmark = pytest.mark.asyncio

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
ROWS = 120
RECORDS = 40  # per broker


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "nats") as c:
        yield c


async def _burst(cluster: NatsCluster, tmp_path: Path, fault: str) -> None:
    settings = ClusterSettings(servers=tuple(cluster.urls), prefix="FAULT")
    connections = [await connect(settings) for _ in range(2)]
    logs = [
        await JetStreamAuditLog.open(nc, settings, KEY, checkpoint_every=5) for nc in connections
    ]
    store = await SqliteMessageStore.open(tmp_path / "messages.db", max_bytes=1 << 30)
    try:
        drainers = [Drainer(log) for log in logs]
        for d in drainers:
            d.add_source("messages", store)

        async def produce() -> None:  # decisions committed to the outbox meanwhile
            for i in range(ROWS):
                item = AuditItem("publish.accepted", "KOR", "KOR", f"m{i}")
                await store.record([encode(item)], i)
                if i % 10 == 0:
                    await asyncio.sleep(0.02)

        async def drain(d: Drainer, done: asyncio.Event) -> None:
            while not done.is_set():
                await d.drain()
                await asyncio.sleep(0.01)
            await d.drain()

        async def record(log: JetStreamAuditLog, tag: str) -> list[int]:
            out = []
            for i in range(RECORDS):
                out.append(
                    await log.record(kind="deliver", actor=tag, message_id=f"{tag}{i}", now_ms=i)
                )
                await asyncio.sleep(0.02)
            return out

        async def strike() -> None:
            await asyncio.sleep(0.3)  # mid-burst
            js = connections[0].jetstream()
            info = await js.stream_info(settings.name("AUDIT"))
            assert info.cluster is not None
            [leader] = [n for n in cluster.nodes if n.name == info.cluster.leader]
            if fault == "kill":
                leader.kill()
            else:
                leader.signal(signal.SIGSTOP)
                await asyncio.sleep(8)  # longer than an election
                leader.signal(signal.SIGCONT)

        produced = asyncio.Event()
        drains = [asyncio.create_task(drain(d, produced)) for d in drainers]
        strikes = asyncio.create_task(strike())
        seqs = await asyncio.gather(record(logs[0], "A"), record(logs[1], "B"), produce())
        produced.set()
        await asyncio.gather(*drains, strikes)
        for d in drainers:
            await d.drain()
        entries = await logs[1].query()
        ids = [e.message_id for e in entries]
        assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
        assert sorted(seqs[0] + seqs[1]) == sorted(set(seqs[0] + seqs[1]))
        assert sorted(i for i in ids if i[0] in "AB") == sorted(
            f"{t}{i}" for t in "AB" for i in range(RECORDS)
        )
        assert [i for i in ids if i.startswith("m")] == [f"m{i}" for i in range(ROWS)]
        for log in logs:
            result = await log.verify(KEY.public_key())
            assert result.ok, result
            assert result.entries == ROWS + 2 * RECORDS
    finally:
        for log in logs:
            await log.close()
        await store.close()
        for nc in connections:
            await nc.close()


async def test_killing_the_stream_leader_loses_and_doubles_nothing(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    await _burst(cluster, tmp_path, "kill")


async def test_freezing_the_stream_leader_past_an_election_forks_nothing(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    await _burst(cluster, tmp_path, "stop")


async def _add_rows(db: Path, first: int, n: int) -> None:
    """n more records in the outbox (m{first}..), written while no drainer runs."""
    store = await SqliteMessageStore.open(db, max_bytes=1 << 30)
    try:
        for i in range(first, first + n):
            await store.record([encode(AuditItem("publish.accepted", "KOR", "KOR", f"m{i}"))], i)
    finally:
        await store.close()


async def test_a_drainer_killed_at_random_points_chains_everything_once(
    cluster_settings: ClusterSettings, tmp_path: Path
) -> None:
    db = tmp_path / "messages.db"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    rows, acknowledged = 0, set()
    servers = ",".join(cluster_settings.servers)
    for run in range(10):
        await _add_rows(db, rows, 30)
        rows += 30
        child = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "tests.audit_drainer_process", servers],
            *[cluster_settings.prefix, str(db), f"r{run}."],
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        assert child.stdout is not None
        assert await child.stdout.readline() == b"ready\n", f"seed {seed}"
        await asyncio.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        out, _ = await child.communicate()
        lines = out.decode().splitlines()
        acknowledged |= {line.split()[1] for line in lines if line.startswith("recorded")}
    nc = await connect(cluster_settings)
    log = await JetStreamAuditLog.open(nc, cluster_settings, KEY, checkpoint_every=5)
    store = await SqliteMessageStore.open(db, max_bytes=1 << 30)
    try:
        drainer = Drainer(log)
        drainer.add_source("messages", store)
        await drainer.start()
        await drainer.close()
        ids = [e.message_id for e in await log.query()]
        assert [i for i in ids if i.startswith("m")] == [f"m{i}" for i in range(rows)], seed
        mine = [i for i in ids if i.startswith("r")]
        assert len(mine) == len(set(mine)) and acknowledged <= set(mine), seed
        result = await log.verify(KEY.public_key())
        assert result.ok, (seed, result)
    finally:
        await log.close()
        await store.close()
        await nc.close()
