from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from broker.jetstream.connect import ClusterSettings
from clients.cluster import NatsCluster
from coalition.pki import make_dev_pki
from tests.helpers import ALL_PARTNERS, OPERATORS, drop_deployment, jetstream_overrides, now_ms
from tests.store_backends import opener  # noqa: F401  (a fixture: a store of each backend)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A development PKI shared by the whole session (keys are slow-ish to make)."""
    d = tmp_path_factory.mktemp("pki")
    make_dev_pki(d, ALL_PARTNERS, OPERATORS, now_ms(), force=True)
    return d


@pytest.fixture(scope="session")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """Three real nats-server processes clustered on loopback (JetStream, sync always),
    shared by the session; each test takes its own deployment prefix (``cluster_settings``)."""
    cluster = NatsCluster(tmp_path_factory.mktemp("nats"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_settings(nats_cluster: NatsCluster) -> ClusterSettings:
    """Settings for a fresh deployment on the shared cluster (a prefix no other test uses)."""
    return ClusterSettings(servers=tuple(nats_cluster.urls), prefix=f"T{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["sqlite", "jetstream"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, object]]:
    """Broker config overrides for each store backend: ``running_broker(..., **backend)``.

    ``jetstream`` is a fresh deployment (its own prefix) on the session's ``nats_cluster``,
    whose streams and buckets are deleted after the test. A case that holds only on
    SQLite says why with ``tests.helpers.sqlite_only``."""
    if request.param == "sqlite":
        yield {}
        return
    cluster: NatsCluster = request.getfixturevalue("nats_cluster")
    overrides = jetstream_overrides(cluster, f"T{uuid.uuid4().hex[:12]}")
    try:
        yield overrides
    finally:
        await drop_deployment(cluster, str(overrides["store_prefix"]))
