"""Join a broker to the other brokers of its JetStream deployment.

Three links, all installed before the broker serves:

- wake-ups and the partner-stream lease (broker.jetstream.peers): the delivery loop
  claims a partner's lease before it reads anything for a stream, a stream that ends
  gives it back, and each publish that stored messages wakes the other brokers;
- registry changes made through any broker (the registry's ``on_change``, fed by its
  watch of the registry stream) reach this broker's live streams at once, exactly as a
  change made here does (``ExchangeLink.policy_changed``: a suspension closes the
  partner's stream, a lowered clearance stops its next delivery);
- durability the operator allowed to be weaker (``--allow-data-loss``) is audited.
"""

from __future__ import annotations

import logging

from broker.admin_types import Counts, ExchangeLink
from broker.audit import AuditError
from broker.backends import Backend
from broker.config import BrokerConfig
from broker.exchange import Clock, ExchangeCore
from broker.jetstream.peers import Peers
from broker.jetstream.store import JetStreamMessageStore
from broker.registry_types import RegistryChange

log = logging.getLogger("coalition.broker")


async def join_cluster(
    backend: Backend, cfg: BrokerConfig, exchange: ExchangeCore, link: ExchangeLink, clock: Clock
) -> tuple[Peers, ExchangeLink]:
    """Open the peers link and hook it, and the registry's watch, into the exchange; the
    link the admin core is to use (live streams counted across the brokers)."""
    assert backend.nc is not None and backend.settings is not None
    store = backend.store
    assert isinstance(store, JetStreamMessageStore)
    peers = await Peers.open(
        backend.nc, backend.settings, cfg.name, exchange.wake_all, store.head, store.wait_for_head
    )
    exchange.delivery.claim = peers.claim
    exchange.on_closed = peers.release
    exchange.pipeline.on_stored = peers.stored

    def changed(change: RegistryChange) -> None:
        # A policy change through another broker reaches this broker's live streams now;
        # one made here was applied by the admin core already.
        if change.kind == "policy" and not change.local:
            link.policy_changed(change.partner)

    backend.registry.on_change(changed)
    if backend.weaknesses:
        try:
            await exchange.audit.record(
                kind="store.durability_weakened",
                actor="broker",
                decision="allow",
                detail={"weaknesses": backend.weaknesses, "broker": peers.broker_id},
                now_ms=clock(),
            )
        except AuditError as exc:
            log.critical("store.durability_weakened not audited: %s", exc)
    return peers, ClusterLink(link, peers)


class ClusterLink:
    """The admin core's view of the exchange when brokers share a deployment: a partner's
    live stream counts wherever it is served (its lease), so every broker answers the
    same; deliveries in flight and the counters are this broker's own."""

    def __init__(self, local: ExchangeLink, peers: Peers) -> None:
        self._local = local
        self._peers = peers

    def policy_changed(self, partner: str) -> None:
        self._local.policy_changed(partner)

    def live_streams(self, partner: str | None = None) -> int:
        return self._peers.serving(partner)

    def counters(self, partner: str) -> Counts:
        return self._local.counters(partner)

    def in_flight(self, partner: str) -> int:
        return self._local.in_flight(partner)
