"""The operators' view of the federation: each peer's standing and its link's counters
(``coalition-admin federation list``, the metrics). Domain values, no gRPC."""

from __future__ import annotations

from dataclasses import dataclass

from broker.federation.directory import ForeignDirectory
from broker.federation.state import FederationState, PeerCounters
from broker.registry_types import PartnerRegistry
from broker.store import MessageStore, StoreError


@dataclass(frozen=True)
class PeerView:
    """One peer nation as the operators see it."""

    nation: str
    endpoint: str
    ca_sha256: str
    status: int  # the gateway's PartnerStatus; 0 when not admitted
    policy_version: int
    counters: PeerCounters
    lag: int
    partners_learned: int


@dataclass
class FederationView:
    """Reads the state, the registry and the store for ``peers``."""

    state: FederationState
    registry: PartnerRegistry
    store: MessageStore
    foreign: ForeignDirectory

    @property
    def nation(self) -> str:
        return self.state.trust.nation

    async def peers(self) -> list[PeerView]:
        out = []
        for nation, peer in sorted(self.state.trust.peers.items()):
            rec = self.registry.get(nation)
            lag = 0
            if rec is not None:
                try:
                    lag = await self.store.backlog_count(nation)
                except StoreError:  # no cursor yet: never active
                    lag = 0
            counters = self.state.counters[nation]
            counters.lag = lag
            out.append(
                PeerView(
                    nation,
                    peer.endpoint,
                    peer.ca_fingerprint,
                    int(rec.policy.status) if rec is not None else 0,
                    rec.version if rec is not None else 0,
                    counters,
                    lag,
                    len(self.foreign.learned.get(nation, ())),
                )
            )
        return out
