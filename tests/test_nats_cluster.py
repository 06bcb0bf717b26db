"""The cluster harness itself: three real nats-server processes form a JetStream
cluster whose R3 streams fsync every write and keep accepting writes with one node dead."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats.errors
import pytest
from nats.js.api import PubAck, StorageType, StreamConfig
from nats.js.client import JetStreamContext

from broker.jetstream.connect import ClusterSettings, connect
from clients.cluster import NatsCluster

pytestmark = pytest.mark.asyncio


async def _publish(js: JetStreamContext, subject: str, data: bytes) -> PubAck:
    """Publish until acknowledged, asking again under one message id (deduplicated)."""
    for _ in range(100):
        try:
            return await js.publish(subject, data, timeout=2, headers={"Nats-Msg-Id": data.hex()})
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            await asyncio.sleep(0.2)
    raise AssertionError(f"{subject}: not acknowledged")


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
            # A new R3 stream takes a moment to elect its leader: until then a publish
            # meets no responders.
            ack = await _publish(js, settings.subject("probe"), b"one")
            assert ack.seq == 1
            # One follower dies: the leader and the other follower still make a quorum.
            info = await js.stream_info(name)
            assert info.cluster is not None
            follower = next(n for n in cluster.nodes if n.name != info.cluster.leader)
            follower.kill()
            # A request sent over the dead node's connection is lost with it.
            ack = await _publish(js, settings.subject("probe"), b"two")
            assert ack.seq == 2
            info = await js.stream_info(name)
            assert info.config.num_replicas == 3
            assert info.state.messages == 2
        finally:
            await nc.close()
