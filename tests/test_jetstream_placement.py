"""Creating the deployment's R3 streams and buckets while the cluster answers "no suitable
peers for placement" (as it does right after it starts, before every server has joined):
each open asks again, bounded, with one log line, rather than failing at the first
answer. Made deterministic by asking for more replicas than the cluster has servers, so
the answer never changes and each open gives up at its bound with the cluster's reason."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.jetstream import connect as connect_mod
from broker.jetstream.audit import JetStreamAuditLog
from broker.jetstream.connect import ClusterSettings, connect
from broker.jetstream.peers import Peers
from broker.jetstream.registry import JetStreamRegistry
from broker.jetstream.store import JetStreamMessageStore

pytestmark = pytest.mark.asyncio

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


async def _head() -> int:
    return 0


async def _caught_up(_: int, __: float) -> bool:
    return True


@pytest.mark.parametrize("part", ["store", "registry", "audit", "leases"])
async def test_no_suitable_peers_is_asked_again_with_one_log_line(
    part: str,
    cluster_settings: ClusterSettings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(connect_mod, "PLACEMENT_S", 1.0)
    settings = replace(cluster_settings, replicas=5)  # the cluster has 3 servers
    nc = await connect(settings)
    opens: dict[str, Callable[[], Awaitable[object]]] = {
        "store": lambda: JetStreamMessageStore.open(nc, settings, max_bytes=1 << 20),
        "registry": lambda: JetStreamRegistry.open(nc, settings),
        "audit": lambda: JetStreamAuditLog.open(nc, settings, KEY),
        "leases": lambda: Peers.open(nc, settings, "b", lambda: None, _head, _caught_up),
    }
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(Exception) as info:
            await opens[part]()
        assert "no suitable peers" in str(info.value)
        waits = [r for r in caplog.records if "cannot create" in r.getMessage()]
        assert len(waits) == 1, [r.getMessage() for r in caplog.records]
        assert "have not all joined" in waits[0].getMessage()
    finally:
        await nc.close()
