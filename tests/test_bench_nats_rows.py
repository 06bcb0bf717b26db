"""The benchmark's JetStream publisher behaves as a careful JetStream client would.

While a stream's leader is being elected, the cluster answers a publish with "no
responders" (nothing was stored); a client that wants its message kept publishes it
again. The benchmark's jetstream-r3 row did not, so a leader election during a run
(a loaded host misses a heartbeat) lost messages and failed the smoke run. Real
nats-server processes, real elections forced through the JetStream API.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from bench.rows import RowSpec
from bench.rows.nats import STREAM, NatsPublisher, start_cluster
from bench.workload import PARTNERS, Sealed

STEPDOWN = f"$JS.API.STREAM.LEADER.STEPDOWN.{STREAM}"


@pytest.mark.timeout(120)
async def test_jetstream_publisher_keeps_every_message_through_leader_elections(
    tmp_path: Path,
) -> None:
    group = await start_cluster(tmp_path)
    pub = NatsPublisher(RowSpec("jetstream-r3", group.target, pki=""), PARTNERS[0])
    admin = None
    try:
        await pub.connect()
        admin = await nats.connect([f"nats://{t}" for t in group.targets])
        sent = accepted = met = 0
        for r in range(30):  # until three batches met an election
            batch = [Sealed(PARTNERS[0], f"m{r}-{i}", bytes(64)) for i in range(300)]
            stepdown = asyncio.create_task(admin.request(STEPDOWN, b"", timeout=10))
            before = pub.retried
            # Without the retry a publish the election swallowed is never answered.
            accepted += await asyncio.wait_for(pub.send(batch), 30)
            sent += len(batch)
            await stepdown
            met += pub.retried > before
            if met == 3:
                break
        info = await admin.jetstream().stream_info(STREAM)
        assert (accepted, info.state.messages) == (sent, sent)  # every one, once
        assert met, "no publish met an election: the test proved nothing"
    finally:
        await pub.close()
        if admin is not None:
            await admin.close()
        group.stopper()
