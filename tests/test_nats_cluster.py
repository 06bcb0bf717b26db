"""The cluster harness itself: three real nats-server processes form a JetStream
cluster whose R3 streams fsync every write and keep accepting writes with one node dead."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.js.api import StorageType, StreamConfig

from broker.jetstream.connect import ClusterSettings, connect
from clients.cluster import NatsCluster

pytestmark = pytest.mark.asyncio


async def test_the_cluster_syncs_every_write_and_survives_a_dead_node(tmp_path: Path) -> None:
    with NatsCluster(tmp_path) as cluster:
        for node in cluster.nodes:
            assert node.monitor("varz")["jetstream"]["config"]["sync_always"] is True
        settings = ClusterSettings(servers=tuple(cluster.urls))
        nc = await connect(settings)
        try:
            js = nc.jetstream()
            name = settings.name("PROBE")
            await js.add_stream(
                StreamConfig(
                    name=name,
                    subjects=[settings.subject("probe")],
                    num_replicas=3,
                    storage=StorageType.FILE,
                )
            )
            ack = await js.publish(settings.subject("probe"), b"one")
            assert ack.seq == 1
            # One follower dies: the leader and the other follower still make a quorum.
            info = await js.stream_info(name)
            assert info.cluster is not None
            follower = next(n for n in cluster.nodes if n.name != info.cluster.leader)
            follower.kill()
            ack = await js.publish(settings.subject("probe"), b"two", timeout=10)
            assert ack.seq == 2
            info = await js.stream_info(name)
            assert info.config.num_replicas == 3
            assert info.state.messages == 2
        finally:
            await nc.close()
