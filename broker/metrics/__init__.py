"""Prometheus metrics of the broker (docs/metrics.md): counted where things happen
(``instruments``), read from the broker's state at scrape time (``collector``), named in
``names`` with bounded label values (``labels``), served over plain HTTP on their own
address by a small asyncio server (``http``), wired in and started by ``exporter``."""

from broker.metrics.exporter import MetricsExporter

__all__ = ["MetricsExporter"]
