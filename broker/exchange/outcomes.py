"""The exchange core's answers, as domain values: what publish decided for each envelope,
and what a subscription's delivery loop hands its stream. The gRPC servicer turns them
into the wire's PublishResult and SubscribeResponse; the core builds no response message.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.errors import BrokerError
from broker.store import StoredMessage
from broker.store.base import Notice
from coalition.v1 import envelope_pb2


@dataclass(frozen=True, slots=True)
class Accepted:
    """The envelope is stored durably at offset (its acceptance audit entry queued)."""

    message_id: str
    sequence: int
    offset: int


@dataclass(frozen=True, slots=True)
class Refused:
    """The envelope was refused, and why; message_id is empty when the header did not parse."""

    message_id: str
    error: BrokerError


PublishOutcome = Accepted | Refused


@dataclass(frozen=True, slots=True)
class DeliveryBatch:
    """Deliveries for one subscription, each already audited and counted in flight:
    messages[i] is routed under headers[i], the envelope's own signed header (topic,
    precedence and label come from it). Two lists, not one object per delivery: a batch
    is built for every turn of the delivery loop."""

    messages: list[StoredMessage]
    headers: list[envelope_pb2.Header]


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """The subscription has caught up with its backlog (caught_up), or fell behind and
    reads the store again (not caught_up); backlog is what is known to remain."""

    caught_up: bool
    backlog: int = 0


@dataclass(frozen=True, slots=True)
class ExpiryBatch:
    """Expiry notices for the subscriber: messages removed before it acknowledged them."""

    notices: list[Notice]


StreamItem = DeliveryBatch | StreamStatus | ExpiryBatch
