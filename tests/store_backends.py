"""Open a message store of either backend, for the store contract tests.

``StoreOpener.open(...)`` takes the store options of SqliteMessageStore.open; the
SQLite store lives in a file of the test's tmp_path, the JetStream store in a fresh
deployment on the session's NATS cluster (``cluster_settings``), each open on its own
connection, so opening again is what a restarted broker sees.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from broker.jetstream.connect import ClusterSettings, connect
from broker.jetstream.store import JetStreamMessageStore
from broker.store import SqliteMessageStore

BACKENDS = ("sqlite", "jetstream")

Store = SqliteMessageStore | JetStreamMessageStore


class StoreOpener:
    """Opens the stores of one test (one SQLite file, or one JetStream deployment)."""

    def __init__(self, backend: str, path: Path, settings: ClusterSettings | None) -> None:
        self.backend = backend
        self.path = path
        self.settings = settings
        self.connections: list[Client] = []

    async def open(self, **options: Any) -> Any:
        """The store (SqliteMessageStore or JetStreamMessageStore) with these options."""
        if self.settings is None:
            return await SqliteMessageStore.open(self.path, **options)
        nc = await connect(self.settings, name="store-test")
        self.connections.append(nc)
        return await JetStreamMessageStore.open(nc, self.settings, **options)

    async def close(self) -> None:
        for nc in self.connections:
            if not nc.is_closed:
                await nc.close()


@pytest.fixture(params=BACKENDS)
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreOpener]:
    """A StoreOpener for each backend (the cluster is started only for jetstream)."""
    settings = None
    if request.param == "jetstream":
        settings = request.getfixturevalue("cluster_settings")
    o = StoreOpener(request.param, tmp_path / "store.db", settings)
    yield o
    await o.close()
