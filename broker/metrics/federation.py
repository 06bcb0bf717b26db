"""Federation metrics, read at scrape time from each peer's link counters
(broker.federation.state): one ``peer`` label value per nation in the trust file."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.federation.state import FederationState

PREFIX = "coalition_federation_"
COUNTERS = (
    ("forwarded", "envelopes sent to the peer and receipted stored there"),
    ("duplicates", "envelopes sent to the peer and receipted duplicate"),
    ("refused_by_peer", "envelopes sent to the peer and receipted refused"),
    ("receipts", "custody receipts verified and recorded in this broker's audit chain"),
    ("received", "envelopes from the peer's gateway stored here"),
    ("refused", "envelopes from the peer's gateway refused here"),
)


class FederationCollector(Collector):
    """The per-peer counters, the link's state and its lag."""

    def __init__(self, state: FederationState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        peers = sorted(self.state.counters.items())
        for name, doc in COUNTERS:
            fam = CounterMetricFamily(f"{PREFIX}{name}", doc, labels=["peer"])
            for nation, c in peers:
                fam.add_metric([nation], getattr(c, name))
            yield fam
        up = GaugeMetricFamily(
            f"{PREFIX}link_up", "1 while the outbound link is up", labels=["peer"]
        )
        lag = GaugeMetricFamily(
            f"{PREFIX}lag_messages",
            "messages waiting for the link, at its last batch",
            labels=["peer"],
        )
        for nation, c in peers:
            up.add_metric([nation], 1 if c.connected else 0)
            lag.add_metric([nation], c.lag)
        yield up
        yield lag
