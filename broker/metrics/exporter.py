"""Metrics on or off: wire the instruments into the broker's hooks and serve them.

``start_metrics`` is called by the broker (broker.server) only when ``metrics_listen``
is set; it returns the running ``MetricsExporter``, which the broker stops first when it
stops. Everything lives on its own CollectorRegistry, never prometheus_client's global
one, so two brokers in one process (as in the tests) never mix their numbers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector

from broker.exchange import ExchangeCore
from broker.listen import parse_listen
from broker.metrics.collector import BrokerCollector
from broker.metrics.http import MetricsHttp
from broker.metrics.instruments import Instruments
from broker.metrics.labels import partner_label
from broker.registry import PartnerRegistry
from broker.store import MessageStore

log = logging.getLogger("coalition.broker")


class TimesCommits(Protocol):
    """A store that reports each commit's duration (SqliteMessageStore, AuditLog)."""

    def time_commits(self, hook: Callable[[float], None] | None) -> None: ...


class MetricsExporter:
    """One broker's metrics: the registry, its instruments and collector, the server."""

    def __init__(
        self,
        exchange: ExchangeCore,
        store: MessageStore,
        registry: PartnerRegistry,
        audit_db: Path | None,
        *,
        ttl: float = 2.0,
        audit_count: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.instruments = Instruments(self.registry, partner_label(registry.get))
        pipeline = exchange.pipeline
        self.collector = BrokerCollector(
            exchange,
            store,
            registry,
            audit_db,
            ttl=ttl,
            audit_count=audit_count,
            verify_queue=lambda: pipeline._verifying,  # read-only, on the loop
        )
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, memory, fds
        self.http = MetricsHttp(self.render)

    def attach(self, exchange: ExchangeCore, writers: Mapping[str, TimesCommits]) -> None:
        """Point the exchange core's and the store writers' hooks at the instruments."""
        ins = self.instruments
        exchange.pipeline.on_outcomes = ins.publish_outcomes
        exchange.pipeline.on_verified = ins.verified
        exchange.delivery.on_routed = ins.routed
        for name, owner in writers.items():
            owner.time_commits(ins.committed(name))

    async def render(self) -> bytes:
        """The text exposition, after refreshing what the store holds (cached)."""
        try:
            await self.collector.refresh()
        except Exception as exc:  # a store read failed: serve the last snapshot, say so
            log.warning("metrics: store figures not refreshed: %s", exc)
        # Read on the loop (broker state changes there), formatted on a thread.
        families = _Taken(list(self.registry.collect()))
        return await asyncio.to_thread(generate_latest, families)

    @property
    def port(self) -> int:
        return self.http.port

    async def start(self, listen: str) -> None:
        host, port = parse_listen(listen)
        try:
            await self.http.start(host.strip("[]"), port)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None
        log.info("metrics served", extra={"metrics_listen": listen, "port": self.port})

    async def stop(self) -> None:
        await self.http.stop()


class _Taken:
    """Metric families already collected, for the formatter (which only calls collect)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
