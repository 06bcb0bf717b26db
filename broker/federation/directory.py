"""The directory across nations: what this broker tells a peer of its own partners, what
it learned of the peers' partners, and how those join its own Directory and Recipients.

A peer's entries are kept only when they verify here (the certificate issued by that
nation's CA to a code that speaks for it, the key bundle signed under it); the nodes
verify them again against their own trust file, never trusting this broker's word on
which CA speaks for whom. A foreign partner is offered to a local sender only while the
peer's gateway is active, and named a recipient only for a label and topic this
broker's release policy for that nation allows; the peer's own ``decide()`` still
decides delivery there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from cryptography import x509

from broker.exchange.decisions import DecisionFn
from broker.exchange.directory import may_reach
from broker.federation.state import FederationState
from broker.registry_types import PartnerRecord, PartnerRegistry
from coalition.federation import FederationError, verify_foreign_signing_cert
from coalition.identity import IdentityError, certified_hybrid_key, verify_key_bundle
from coalition.labels import Label
from coalition.policy import Decision, PartnerPolicy, PartnerStatus, decide
from coalition.v1 import directory_pb2

log = logging.getLogger("coalition.broker.federation")


class ForeignDirectory:
    """Peers' partners learned over the links, by nation (``broker.exchange.directory``
    calls ``is_gateway``, ``entries`` and ``recipients``)."""

    def __init__(
        self,
        state: FederationState,
        registry: PartnerRegistry,
        clock: Callable[[], int],
        decided: Callable[[DecisionFn, PartnerPolicy, Label, str, int], Decision],
    ) -> None:
        self.state = state
        self.registry = registry
        self.clock = clock
        self._decided = decided
        self.learned: dict[str, list[directory_pb2.DirectoryEntry]] = {}

    def is_gateway(self, code: str) -> bool:
        """Whether the registry entry named code is a peer nation's gateway."""
        return code in self.state.trust.peers

    def _active(self, nation: str) -> PartnerRecord | None:
        rec = self.registry.get(nation)
        return rec if self.state.admitted(nation, rec) else None

    # -- what we tell a peer ----------------------------------------------------------------
    def answer(self, nation: str) -> list[directory_pb2.DirectoryEntry]:
        """Our admitted, active partners that nation's senders could seal for (what it
        may bring in could reach them: with their key bundle) or whose messages nation's
        recipients could open (they may send something we release to it: their
        certificates, without a bundle)."""
        gateway = self._active(nation)
        if gateway is None:
            return []
        out = []
        for rec in self.registry.all():
            if self.is_gateway(rec.code) or rec.policy.status is not PartnerStatus.ACTIVE:
                continue
            receives = rec.bundle is not None and may_reach(gateway.policy, rec.policy)
            if not receives and not may_reach(rec.policy, gateway.policy):
                continue
            entry = directory_pb2.DirectoryEntry(
                partner=rec.code,
                signing_cert=rec.signing_cert,
                previous_signing_certs=rec.previous_certs,
            )
            if receives and rec.bundle is not None:
                entry.key_bundle.CopyFrom(rec.bundle)
            out.append(entry)
        return out

    # -- what a peer told us ----------------------------------------------------------------
    def learn(self, nation: str, entries: Sequence[directory_pb2.DirectoryEntry]) -> int:
        """Keep nation's entries that verify here; return how many were refused."""
        peer = self.state.trust.peers[nation]
        now = self.clock()
        kept, refused = [], 0
        for e in entries:
            try:
                key = verify_foreign_signing_cert(e.signing_cert, peer, e.partner, now)
                if self.registry.get(e.partner) is not None and e.partner != nation:
                    raise FederationError("local_partner", f"{e.partner} is a local partner")
                hybrid = certified_hybrid_key(x509.load_der_x509_certificate(e.signing_cert))
                if e.HasField("key_bundle"):
                    verify_key_bundle(e.key_bundle, hybrid or key, e.partner, now)
            except (FederationError, IdentityError, ValueError) as exc:
                refused += 1
                log.warning("directory entry %r from %s refused: %s", e.partner, nation, exc)
                continue
            entry = directory_pb2.DirectoryEntry(
                partner=e.partner,
                signing_cert=e.signing_cert,
                previous_signing_certs=e.previous_signing_certs,
            )
            if e.HasField("key_bundle"):
                entry.key_bundle.CopyFrom(e.key_bundle)
            kept.append(entry)
        self.learned[nation] = kept
        return refused

    def entries(self, caller: PartnerPolicy) -> list[directory_pb2.DirectoryEntry]:
        """Foreign entries for a local caller's Directory: every learned partner of an
        active peer, its key bundle only when the caller could send something this broker
        releases to that nation (as ``may_reach`` does for local partners)."""
        out = []
        for nation, entries in self.learned.items():
            gateway = self._active(nation)
            if gateway is None:
                continue
            reach = may_reach(caller, gateway.policy)
            for e in entries:
                entry = directory_pb2.DirectoryEntry()
                entry.CopyFrom(e)
                if not reach:
                    entry.ClearField("key_bundle")
                out.append(entry)
        return out

    def recipients(self, label: Label, topic: str) -> list[str]:
        """Foreign partners to seal a label on topic for: those of each active peer whose
        release policy here allows it."""
        now = self.clock()
        out: list[str] = []
        for nation, entries in self.learned.items():
            gateway = self._active(nation)
            if gateway is None:
                continue
            if self._decided(decide, gateway.policy, label, topic, now).allowed:
                out.extend(e.partner for e in entries if e.HasField("key_bundle"))
        return out
