"""Per-partner publish rate limits: one token bucket per partner."""

from __future__ import annotations

from broker.config import BrokerConfig
from broker.registry import PartnerRegistry


class TokenBucket:
    """Per-partner publish rate limit: every envelope the broker works on takes a token,
    accepted or refused (a refusal costs a signature check and an audit entry too).

    A refused envelope is charged after the fact (charge()), which may leave the bucket
    in debt by at most one request's envelopes; while it holds less than one token,
    whole requests are refused before any work (empty()).
    """

    def __init__(self, rate: int, now_ms: int) -> None:
        self.rate = max(rate, 1)
        self.tokens = float(self.rate)
        self.at = now_ms

    def _refill(self, now_ms: int, rate: int) -> None:
        self.rate = max(rate, 1)
        elapsed = max(now_ms - self.at, 0)
        self.tokens = min(float(self.rate), self.tokens + elapsed * self.rate / 1000)
        self.at = max(self.at, now_ms)

    def take(self, now_ms: int, rate: int) -> bool:
        """Take one token if there is one."""
        self._refill(now_ms, rate)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def charge(self, n: int = 1) -> None:
        """Take n tokens for work already done (refused envelopes), into debt if need be."""
        self.tokens -= n

    def empty(self, now_ms: int, rate: int) -> bool:
        """Whether not even one token is left (refilled up to now_ms first)."""
        self._refill(now_ms, rate)
        return self.tokens < 1


class RateLimits:
    """Every partner's token bucket, at the rate its policy sets (else the broker's default).

    A rate change in the policy applies at the next refill; a bucket is created full on
    a partner's first publish.
    """

    def __init__(
        self, cfg: BrokerConfig, registry: PartnerRegistry, default: int | None = None
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        # The rate of an entry whose policy sets none (federation ingress passes its own).
        self.default = cfg.default_publish_rate_per_s if default is None else default
        self._buckets: dict[str, TokenBucket] = {}

    def rate(self, partner: str) -> int:
        """partner's publish rate in messages per second."""
        rec = self.registry.get(partner)
        return (rec.policy.publish_rate_per_s if rec else 0) or self.default

    def bucket(self, partner: str, now: int) -> tuple[TokenBucket, int]:
        """The partner's token bucket and its rate."""
        rate = self.rate(partner)
        bucket = self._buckets.get(partner)
        if bucket is None:
            bucket = self._buckets[partner] = TokenBucket(rate, now)
        return bucket, rate
