"""SIGKILL at random points of a publish burst, again and again: every message the broker
acknowledged has exactly one ``publish.accepted`` entry in the audit chain, no entry
appears twice, and the chain and its signed checkpoints verify.

A real broker process (`coalition-broker serve`) over mTLS; a publisher bursts batches
at it and is cut off by the kill; the broker restarts on the same data and the
publisher resumes from its last acknowledged sequence number. The kill points are drawn
from a seeded generator (the seed is printed; set OUTBOX_KILL_SEED to replay one).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from clients.sdk import ClientError, PartnerClient, Sequencer
from coalition.labels import parse_label
from coalition.pki import load_partner
from coalition.v1 import exchange_pb2
from tests.broker_process import ConfiguredBroker
from tests.helpers import admit, operator, partner, policy

pytestmark = pytest.mark.slow

LABEL = parse_label("NATO SECRET // REL TO USA")
KILLS = 20


async def _burst(
    client: PartnerClient, acked: dict[str, int], last_seq: list[int], stop: asyncio.Event
) -> None:
    """Publish batches of 8 until cut off; record every acknowledged id and sequence."""
    n = 0
    while not stop.is_set():
        batch = []
        for _ in range(8):
            s = await client.seal(b"burst %d" % n, topic="intel.a", label=LABEL, recipients=["USA"])
            batch.append(s)
            n += 1
        try:
            results = await asyncio.wait_for(client.publish([s.envelope for s in batch]), 20)
        except ClientError:
            return  # the kill cut the call off: not acknowledged
        for s, r in zip(batch, results, strict=True):
            if r.outcome == exchange_pb2.ACCEPTED:
                acked[r.message_id] = r.offset
                last_seq[0] = max(last_seq[0], r.sequence)
            else:  # numbers stored but unanswered before a kill are refused, nothing else
                assert r.reason_code == "sequence_not_increasing", r
            del s


async def test_sigkill_at_random_points_leaves_exactly_one_acceptance_per_ack(
    pki: Path, tmp_path: Path
) -> None:
    seed = int(os.environ.get("OUTBOX_KILL_SEED") or time.time_ns() % 1_000_000)
    print(f"OUTBOX_KILL_SEED={seed}")
    rng = random.Random(seed)
    toml = tmp_path / "broker.toml"
    # Small checkpoint spacing, so the drainer signs many checkpoints between the kills.
    toml.write_text("[limits]\naudit_checkpoint_every = 40\n")
    b = ConfiguredBroker(pki, tmp_path / "data", extra_args=["--config", str(toml)])
    acked: dict[str, int] = {}
    last_seq = [time.time_ns() // 1000]
    creds = load_partner(pki / "partners" / "KOR")
    try:
        await b.start()
        for code in ("KOR", "USA"):
            await admit(pki, b.port, policy(code))
        async with partner(pki, "USA", b.port) as usa:
            await usa.register_keys()
        for _ in range(KILLS):
            # The publisher resumes from its last acknowledged sequence number.
            async with PartnerClient(
                creds, f"127.0.0.1:{b.port}", sequencer=Sequencer(last_seq[0])
            ) as kor:
                await kor.register_keys()
                stop = asyncio.Event()
                before = len(acked)
                task = asyncio.create_task(_burst(kor, acked, last_seq, stop))
                await asyncio.sleep(rng.uniform(0.05, 0.6))
                b.signal(signal.SIGKILL)
                assert await b.wait_exit() == -signal.SIGKILL
                stop.set()
                await asyncio.wait_for(task, 30)
                assert len(acked) >= before
            await b.start()
        async with operator(pki, "op1", b.port) as op:
            entries = await op.audit(kind="publish.accepted")
            verdict = await op.verify_audit()
            records = await op.export_audit()
        b.signal(signal.SIGTERM)
        assert await b.wait_exit() == 0
    finally:
        b.cleanup()
    assert verdict.ok, verdict.problem
    checkpoints = [r for r in records if r.WhichOneof("kind") == "checkpoint"]
    assert len(checkpoints) >= 2, "the drainer signed checkpoints between the kills"
    ids = [e.message_id for e in entries]
    assert len(ids) == len(set(ids)), "an acceptance was recorded twice"
    assert acked.keys() <= set(ids), "an acknowledged message has no acceptance entry"
    offsets = {json.loads(e.detail_json)["offset"] for e in entries}
    assert len(offsets) == len(entries)
    assert all(acked[m] in offsets for m in acked)
    assert len(acked) > KILLS, "the bursts were acknowledged between the kills"
    print(f"acknowledged {len(acked)}, accepted entries {len(ids)}")
