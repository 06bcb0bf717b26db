"""The rows of the comparison: each is a server to start plus a publisher and a receiver.

Every row gets the same sealed envelopes (``bench.workload``) and its receivers run
the same ``env.open``; only the transport between them differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from bench.workload import Sealed

SYSTEMS = (
    "coalition",
    "nats-core",
    "jetstream-sync",
    "grpc-relay",
    "jetstream-r3",
    "coalition-cluster",
    "coalition-cluster-1",  # one broker over the same cluster: not run unless named
)
COALITION_ROWS = ("coalition", "coalition-cluster", "coalition-cluster-1")

NATS_ROWS = ("nats-core", "jetstream-sync", "jetstream-r3")

OnOpened = Callable[[str], None]


@dataclass(frozen=True)
class RowSpec:
    """What a client process needs to reach a row's server."""

    system: str
    target: str  # host:port
    pki: str


class Publisher(Protocol):
    """One partner's publishing connection."""

    async def connect(self) -> None: ...

    async def send(self, batch: Sequence[Sealed]) -> int:
        """Send a batch; returns once the server accepted it, with the number accepted."""
        ...

    async def close(self) -> None: ...


class Receiver(Protocol):
    """One partner's receiving connection: opens every envelope and reports its id."""

    async def start(self, on_opened: OnOpened) -> None:
        """Connect and subscribe; returns once deliveries can flow."""
        ...

    async def stop(self) -> None: ...


def make_publisher(spec: RowSpec, sender: str) -> Publisher:
    if spec.system in COALITION_ROWS:
        from bench.rows.coalition import CoalitionPublisher

        return CoalitionPublisher(spec, sender)
    if spec.system in NATS_ROWS:
        from bench.rows.nats import NatsPublisher

        return NatsPublisher(spec, sender)
    if spec.system == "grpc-relay":
        from bench.rows.relay import RelayPublisher

        return RelayPublisher(spec, sender)
    raise ValueError(f"unknown system {spec.system!r}")


def make_receiver(spec: RowSpec, code: str) -> Receiver:
    if spec.system in COALITION_ROWS:
        from bench.rows.coalition import CoalitionReceiver

        return CoalitionReceiver(spec, code)
    if spec.system in NATS_ROWS:
        from bench.rows.nats import NatsReceiver

        return NatsReceiver(spec, code)
    if spec.system == "grpc-relay":
        from bench.rows.relay import RelayReceiver

        return RelayReceiver(spec, code)
    raise ValueError(f"unknown system {spec.system!r}")
