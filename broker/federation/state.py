"""What the broker's federation parts share: the trust file, this broker's receipt key,
the per-peer counters, and the routing rule of a link's subscription. No gRPC."""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.registry_types import PartnerRecord
from coalition.federation import TrustFile, speaks_for
from coalition.policy import PartnerStatus


@dataclass
class PeerCounters:
    """One peer's counts since the broker started (metrics, ``federation list``)."""

    forwarded: int = 0  # envelopes sent to the peer whose receipt said stored
    duplicates: int = 0  # sent, answered duplicate
    refused_by_peer: int = 0  # sent, answered refused
    receipts: int = 0  # receipts verified and recorded in this broker's chain
    received: int = 0  # envelopes from the peer stored here
    refused: int = 0  # envelopes from the peer refused here
    lag: int = 0  # messages pending for the peer at the last look (its backlog)
    connected: bool = False  # the outbound link is up
    last_error: str = ""


@dataclass
class FederationState:
    """The trust file, the key receipts are signed with, and each peer's counters."""

    trust: TrustFile
    audit_key: Ed25519PrivateKey = field(repr=False)
    audit_cert_der: bytes = field(repr=False)
    counters: dict[str, PeerCounters] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for nation in self.trust.peers:
            self.counters.setdefault(nation, PeerCounters())

    def admitted(self, nation: str, rec: PartnerRecord | None) -> bool:
        """Whether rec is nation's gateway, active, admitted with the CA the trust file
        names for it (a trust file naming another CA since is not enough)."""
        return (
            rec is not None
            and rec.policy.status is PartnerStatus.ACTIVE
            and rec.signing_cert == self.trust.peers[nation].ca_der
        )

    def is_local(self, sender: str) -> bool:
        """Whether sender is this nation's own (speaks for no peer nation)."""
        return self.trust.peer_for(sender) is None


@dataclass(frozen=True)
class LinkRoute:
    """The routing rule of the link to ``nation`` (broker.exchange.live.GatewayRoute):
    it takes only this nation's own senders, and reaches recipients of that nation."""

    state: FederationState
    nation: str

    def takes(self, sender: str) -> bool:
        return self.state.is_local(sender)

    def reaches(self, recipient: str) -> bool:
        return speaks_for(recipient, self.nation)
