"""Closing the JetStream store and audit log while the cluster does not answer (every
server frozen with SIGSTOP): a close cut short by its caller's bound ends at once (the
caller's cancellation is never swallowed, nothing goes on retrying behind it), and every
write not confirmed is answered with an error, never left waiting or half-written."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import AuditError
from broker.jetstream.audit import JetStreamAuditLog
from broker.jetstream.connect import ClusterSettings, connect
from broker.jetstream.store import JetStreamMessageStore
from broker.store import StoreError
from clients.cluster import NatsCluster
from tests.test_store import message

pytestmark = pytest.mark.asyncio

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
BOUND_S = 1.0  # the caller's bound on close (the broker's is 30 s a step)
ENDS_S = 15.0  # a close cut short must end well within this (a write retries for 60 s)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "nats") as c:
        yield c


def _freeze(cluster: NatsCluster, sig: signal.Signals) -> None:
    for node in cluster.nodes:
        node.signal(sig)


async def _close_within_bound(close: Callable[[], Awaitable[Any]]) -> None:
    """close() under BOUND_S: it must raise TimeoutError (the bound was honoured, not
    swallowed) and end within ENDS_S."""

    async def bounded() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(BOUND_S):
                await close()

    task = asyncio.create_task(bounded())
    done, _ = await asyncio.wait([task], timeout=ENDS_S)
    assert task in done, "close went on past its caller's bound"
    task.result()


async def test_a_store_closed_while_the_cluster_is_silent_stops_and_answers_every_write(
    cluster: NatsCluster,
) -> None:
    settings = ClusterSettings(servers=tuple(cluster.urls), prefix="CLOSE")
    nc = await connect(settings)
    try:
        store = await JetStreamMessageStore.open(nc, settings, max_bytes=1 << 30)
        await store.append([message("KOR", 1)], now_ms=1)
        _freeze(cluster, signal.SIGSTOP)
        try:
            pending = asyncio.create_task(store.append([message("KOR", 2)], now_ms=2))
            await asyncio.sleep(0.5)  # the write is in flight, retrying
            await _close_within_bound(store.close)
            done, _ = await asyncio.wait([pending], timeout=ENDS_S)
            assert pending in done, "a write was left waiting after close"
            with pytest.raises(StoreError, match="closed before the cluster confirmed"):
                pending.result()
        finally:
            _freeze(cluster, signal.SIGCONT)
    finally:
        await nc.close()


async def test_an_audit_log_closed_while_the_cluster_is_silent_stops_retrying(
    cluster: NatsCluster,
) -> None:
    settings = ClusterSettings(servers=tuple(cluster.urls), prefix="CLOSE")
    nc = await connect(settings)
    try:
        log = await JetStreamAuditLog.open(nc, settings, KEY, checkpoint_every=5)
        await log.record(kind="deliver", actor="KOR", message_id="m0", now_ms=1)
        _freeze(cluster, signal.SIGSTOP)
        try:
            records = [
                asyncio.create_task(
                    log.record(kind="deliver", actor="KOR", message_id=f"m{i}", now_ms=1 + i)
                )
                for i in range(1, 4)
            ]
            await asyncio.sleep(0.5)  # the first is in flight, retrying; the rest queued
            await _close_within_bound(log.close)
            done, _ = await asyncio.wait(records, timeout=ENDS_S)
            assert done == set(records), "a record was left waiting after close"
            for task in records:
                assert isinstance(task.exception(), AuditError)
        finally:
            _freeze(cluster, signal.SIGCONT)
    finally:
        await nc.close()
