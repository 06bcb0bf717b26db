"""The metrics read from the broker's state at scrape time.

In-memory state (per-partner counters, live streams and their windows, the registry's
policies, the verify queue) is read as it is, on the event loop, where it changes. What
costs a store query (each partner's lag, store totals, per-sender bytes, the audit log's
last checkpoint) is refreshed by ``refresh()`` at most every ``ttl`` seconds, whatever
the number of scrapers, and read from that snapshot; the queries run on the stores'
reader threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.exchange import ExchangeCore
from broker.metrics import labels
from broker.metrics import names as n
from broker.registry import PartnerRegistry
from broker.store import MessageStore, StoreError
from coalition.policy import PartnerStatus


@dataclass
class Snapshot:
    """What the last refresh read from the stores."""

    lag: dict[str, int] = field(default_factory=dict)
    sender_bytes: dict[str, int] = field(default_factory=dict)
    messages: int = 0
    bytes: int = 0
    file_bytes: int = 0
    head: int = 0
    audit_entries: int = 0
    last_checkpoint_s: float | None = None


class BrokerCollector(Collector):
    """A prometheus_client collector over one broker's state."""

    def __init__(
        self,
        exchange: ExchangeCore,
        store: MessageStore,
        registry: PartnerRegistry,
        audit_db: Path | None,  # None: the stores are not SQLite files (JetStream)
        *,
        ttl: float = 2.0,
        verify_queue: Callable[[], int] = lambda: 0,
        audit_count: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        self._ex = exchange
        self._store = store
        self._registry = registry
        self._audit_db = audit_db
        # Without audit.db (JetStream): entries counted by the audit log itself, and the
        # last checkpoint's time left out.
        self._audit_count = audit_count
        self._ttl = ttl
        self._verify_queue = verify_queue
        self._snap = Snapshot()
        self._taken = float("-inf")
        self._lock = asyncio.Lock()
        self.refreshes = 0  # store reads made (tests check the cache bounds them)

    async def refresh(self) -> None:
        """Re-read the stores if the snapshot is older than ttl (one reader at a time)."""
        async with self._lock:
            if time.monotonic() - self._taken < self._ttl:
                return
            snap = Snapshot()
            st = await self._store.stats()
            snap.messages, snap.bytes, snap.file_bytes, snap.head = (
                st.messages,
                st.bytes,
                st.file_bytes,
                st.head,
            )
            snap.sender_bytes = await self._store.usage()
            for rec in self._registry.all():
                # A partner not yet admitted has no cursor, so nothing is owed to it.
                with contextlib.suppress(StoreError):
                    if await self._store.cursor(rec.code) is not None:
                        snap.lag[rec.code] = await self._store.backlog_count(rec.code)
            if self._audit_db is not None:
                snap.audit_entries, snap.last_checkpoint_s = await asyncio.to_thread(
                    _audit_head, self._audit_db
                )
            elif self._audit_count is not None:
                snap.audit_entries = await self._audit_count()
            self._snap = snap
            self._taken = time.monotonic()
            self.refreshes += 1

    def collect(self) -> Iterator[Metric]:
        """Every scrape-time metric (runs on the event loop: see broker.metrics.http)."""
        snap = self._snap
        records = self._registry.all()
        codes = [r.code for r in records]
        known = set(codes)

        deliveries = CounterMetricFamily(
            n.DELIVERIES, "Messages sent to each subscriber since start.", labels=["partner"]
        )
        unknown = 0
        for code, counts in list(self._ex.counters.items()):
            if code in known:
                deliveries.add_metric([code], counts.delivered)
            else:
                unknown += counts.delivered
        for code in codes:
            if code not in self._ex.counters:
                deliveries.add_metric([code], 0)
        if unknown:
            deliveries.add_metric([labels.UNKNOWN], unknown)
        yield deliveries

        live = self._ex.live
        per_partner: dict[str, tuple[str, Callable[[str], float]]] = {
            n.PARTNER_LAG: (
                "Stored messages above the partner's cursor not yet settled (undelivered).",
                lambda c: snap.lag.get(c, 0),
            ),
            n.PARTNER_INFLIGHT: (
                "Deliveries sent on the partner's live stream, not yet acknowledged.",
                lambda c: sum(len(s.inflight) for s in live.get(c, ())),
            ),
            n.PARTNER_WINDOW: (
                "The in-flight window of the partner's live stream (0 when not connected).",
                lambda c: sum(s.window for s in live.get(c, ())),
            ),
            n.PARTNER_LIVE_STREAMS: (
                "The partner's live Subscribe streams (1 when connected, else 0).",
                lambda c: len(live.get(c, ())),
            ),
            n.PARTNER_STORE_BYTES: (
                "Stored envelope bytes the partner sent (against its store quota).",
                lambda c: snap.sender_bytes.get(c, 0),
            ),
        }
        for name, (doc, value) in per_partner.items():
            g = GaugeMetricFamily(name, doc, labels=["partner"])
            for code in codes:
                g.add_metric([code], value(code))
            yield g

        version = GaugeMetricFamily(
            n.PARTNER_POLICY_VERSION, "The partner's current policy version.", labels=["partner"]
        )
        status = GaugeMetricFamily(
            n.PARTNER_STATUS,
            "1 for the partner's current policy status, 0 for the others.",
            labels=["partner", "status"],
        )
        for rec in records:
            version.add_metric([rec.code], rec.version)
            for st in PartnerStatus:
                status.add_metric([rec.code, st.name.lower()], 1 if rec.policy.status is st else 0)
        yield version
        yield status

        yield _gauge(n.LIVE_STREAMS, "Live Subscribe streams.", sum(len(s) for s in live.values()))
        yield _gauge(n.STORE_MESSAGES, "Messages in the message store.", snap.messages)
        yield _gauge(n.STORE_BYTES, "Envelope bytes in the message store.", snap.bytes)
        yield _gauge(
            n.STORE_FILE_BYTES,
            "messages.db and its write-ahead log on disk (JetStream: the stream's bytes).",
            snap.file_bytes,
        )
        yield _gauge(n.STORE_HEAD, "The message store's highest offset.", snap.head)
        yield _gauge(n.AUDIT_ENTRIES, "Entries in the audit log.", snap.audit_entries)
        if snap.last_checkpoint_s is not None:
            yield _gauge(
                n.AUDIT_LAST_CHECKPOINT,
                "When the audit log's last signed checkpoint was made (Unix time).",
                snap.last_checkpoint_s,
            )
        yield _gauge(
            n.AUDIT_WRITABLE,
            "1 while the audit log records decisions; 0 while it cannot (publishes refused).",
            0 if self._ex.audit_failed else 1,
        )
        yield _gauge(
            n.VERIFY_QUEUE,
            "Publish requests handed to the verify thread, not yet back on the event loop.",
            self._verify_queue(),
        )
        roots = self._ex.pipeline.signatures.roots  # ints written by one thread at a time
        yield CounterMetricFamily(
            n.ROOT_CHECKS,
            "Hybrid signature checks of v2 batch roots (Ed25519 and ML-DSA-65), failed ones too.",
            value=roots.verifications,
        )
        yield CounterMetricFamily(
            n.ROOT_CACHE_HITS,
            "v2 envelopes whose batch root was found verified (no signature check).",
            value=roots.hits,
        )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _audit_head(path: Path) -> tuple[int, float | None]:
    """(entries, last checkpoint time in seconds) from audit.db, read-only, on a thread.

    Its own read-only connection: the audit log's writer and readers are not disturbed.
    """
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return 0, None
    try:
        # seq numbers the entries from 1 with no gap (append-only): one index lookup.
        (entries,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM entries").fetchone()
        (last_ms,) = conn.execute("SELECT MAX(time_ms) FROM checkpoints").fetchone()
    except sqlite3.Error:
        return 0, None
    finally:
        conn.close()
    return int(entries), (None if last_ms is None else last_ms / 1000)
