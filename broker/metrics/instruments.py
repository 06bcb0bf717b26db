"""The metrics counted as things happen: publish outcomes, delivery decisions, call
refusals, commit and verify durations.

Each is one call from the place it happens (the exchange core, the interceptor, the
store writers); the broker wires these methods into those hooks only when metrics are
on (broker.metrics.exporter), so with metrics off the hooks do nothing. prometheus_client
instruments are thread-safe: commit durations are observed on the writer threads,
verify durations on the verify thread or the event loop.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from broker.exchange.outcomes import PublishOutcome, Refused
from broker.metrics import labels
from broker.metrics import names as n


class Instruments:
    """Counters and histograms on one CollectorRegistry (never the global one)."""

    def __init__(self, registry: CollectorRegistry, partner_label: Callable[[str], str]) -> None:
        self._partner = partner_label
        self.published = Counter(
            n.ENVELOPES_PUBLISHED,
            "Envelopes the publish pipeline answered, by sender, result (accepted or "
            "refused) and refusal reason (none when accepted).",
            ("partner", "result", "reason"),
            registry=registry,
        )
        self.decisions = Counter(
            n.POLICY_DECISIONS,
            "Delivery decisions, one per stored message and subscriber read, by reason "
            "(allow or the denial).",
            ("reason",),
            registry=registry,
        )
        self.auth_refusals = Counter(
            n.AUTH_REFUSALS,
            "Calls the interceptor refused before any servicer ran, by reason.",
            ("reason",),
            registry=registry,
        )
        self.commit_seconds = Histogram(
            n.STORE_COMMIT_SECONDS,
            "One group-committed SQLite transaction, BEGIN to fsync'd COMMIT, by store.",
            ("store",),
            buckets=n.COMMIT_BUCKETS,
            registry=registry,
        )
        self.verify_seconds = Histogram(
            n.VERIFY_SECONDS,
            "Size, header and signature checks of one publish request's envelopes.",
            buckets=n.VERIFY_BUCKETS,
            registry=registry,
        )
        for reason in labels.DECISION_REASONS:  # every series present from the start
            self.decisions.labels(reason)
        for reason in labels.AUTH_REASONS:
            self.auth_refusals.labels(reason)

    def publish_outcomes(self, partner: str, outcomes: Sequence[PublishOutcome]) -> None:
        """Count one publish request's outcomes (PublishPipeline.on_outcomes)."""
        who = self._partner(partner)
        refused = Tally(
            labels.reason(o.error.code, labels.PUBLISH_REASONS)
            for o in outcomes
            if isinstance(o, Refused)
        )
        accepted = len(outcomes) - refused.total()
        if accepted:
            self.published.labels(who, "accepted", labels.NONE).inc(accepted)
        for reason, count in refused.items():
            self.published.labels(who, "refused", reason).inc(count)

    def routed(self, allowed: int, denied: Mapping[str, Sequence[Any]]) -> None:
        """Count one delivery batch's decisions (DeliveryLoop.on_routed)."""
        if allowed:
            self.decisions.labels("allow").inc(allowed)
        for reason, items in denied.items():
            self.decisions.labels(labels.reason(reason, labels.DECISION_REASONS)).inc(len(items))

    def auth_refused(self, code: str) -> None:
        """Count a refused call (AuthInterceptor.on_refused); no identity label: the
        caller may be nobody the broker knows."""
        self.auth_refusals.labels(labels.reason(code, labels.AUTH_REASONS)).inc()

    def verified(self, seconds: float) -> None:
        """One request's checks took seconds (PublishPipeline.on_verified)."""
        self.verify_seconds.observe(seconds)

    def committed(self, store: str) -> Callable[[float], None]:
        """The hook a store's writer calls with each commit's duration."""
        child = self.commit_seconds.labels(store)
        return child.observe
