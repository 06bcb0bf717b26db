"""The exchange: publish pipeline, delivery loop, live streams and partner directory,
wired together by ExchangeCore (broker.exchange.facade)."""

from broker.exchange.delivery import Counters
from broker.exchange.directory import PartnerDirectory, SigningCertNotValid
from broker.exchange.facade import Clock, ExchangeCore
from broker.exchange.live import Subscription
from broker.exchange.outcomes import (
    Accepted,
    DeliveryBatch,
    ExpiryBatch,
    PublishOutcome,
    Refused,
    StreamItem,
    StreamStatus,
)
from broker.exchange.ratelimit import TokenBucket

__all__ = [
    "Accepted",
    "Clock",
    "Counters",
    "DeliveryBatch",
    "ExchangeCore",
    "ExpiryBatch",
    "PartnerDirectory",
    "PublishOutcome",
    "Refused",
    "SigningCertNotValid",
    "StreamItem",
    "StreamStatus",
    "Subscription",
    "TokenBucket",
]
