"""Fault: a node daemon is SIGKILLed while messages arrive, then restarted. Its inbox
ends with every message exactly once: what it stored but had not acknowledged is
delivered again and deduplicated; what it had not stored is delivered again."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.server import Broker
from clients.node.inbox import Inbox
from coalition.labels import parse_label
from coalition.v1 import exchange_pb2, intel_pb2
from tests.helpers import admit, partner, policy, running_broker
from tests.node_helpers import start_daemon, stop, write_config

LABEL = parse_label("NATO SECRET // REL TO USA")


@pytest.fixture
async def broker(pki: Path, tmp_path: Path) -> AsyncIterator[Broker]:
    b = await running_broker(pki, tmp_path / "broker")
    for code in ("KOR", "USA"):
        await admit(pki, b.port, policy(code))
    try:
        yield b
    finally:
        await b.stop(grace=1)


def _inbox_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    box = Inbox(path)
    try:
        return [e.message_id for e in box.entries()]
    finally:
        box.close()


async def _until(predicate: object, timeout: float = 30.0) -> None:
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_node_sigkill_and_restart_keeps_inbox_exact(
    pki: Path, tmp_path: Path, broker: Broker
) -> None:
    cfg = write_config(tmp_path / "usa" / "node.toml", pki, "USA", broker.port)
    inbox = cfg.parent / "usa-inbox.db"
    daemon = await start_daemon(cfg, tmp_path / "usa-1.log")
    published: list[str] = []
    async with partner(pki, "KOR", broker.port) as kor:
        await kor.register_keys()
        await _until(lambda: bool(broker.exchange.live.get("USA")))

        async def burst(n: int) -> None:
            for _ in range(n):
                body = intel_pb2.IntelSummary(title=f"report {len(published)}", summary="...")
                s = await kor.seal(body.SerializeToString(), topic="intel.ground", label=LABEL)
                [res] = await kor.publish([s.envelope])
                assert res.outcome == exchange_pb2.ACCEPTED
                published.append(s.message_id)

        await burst(30)
        await _until(lambda: len(_inbox_ids(inbox)) >= 5)
        daemon.send_signal(signal.SIGKILL)  # mid-stream: some stored, some not yet
        await daemon.wait()
        stored_at_kill = len(_inbox_ids(inbox))
        await burst(10)  # while the node is down
        daemon = await start_daemon(cfg, tmp_path / "usa-2.log")
        await burst(10)  # after it is back
        await _until(lambda: len(set(_inbox_ids(inbox))) == len(published))
    assert await stop(daemon) == 0
    ids = _inbox_ids(inbox)
    assert sorted(ids) == sorted(published)  # every message, none twice
    assert stored_at_kill < len(published)
    box = Inbox(inbox)
    try:
        assert box.counts()[1] == 0  # nothing quarantined
    finally:
        box.close()
