"""The partner directory as a partner verifies it: each entry's signing certificate against
the coalition CA, and its key bundle under that certified key (both halves of it when the
certificate certifies an ML-DSA-65 key too). Pure: no network I/O; the SDK fetches the
entries, anyone holding them and the CA certificate can check them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from coalition.federation import TrustFile
from coalition.hpke import HpkePublicKey
from coalition.hybrid import HybridPublicKey
from coalition.identity import (
    IdentityError,
    certified_hybrid_key,
    signing_key_id,
    verify_key_bundle,
    verify_signing_cert,
)
from coalition.v1 import directory_pb2

__all__ = ["Directory", "EarlierKey", "Peer"]


@dataclass(frozen=True)
class Peer:
    """A partner as this node verified it: certified signing key, signed key bundle.

    The broker's directory gives partners no status or groups of other partners (only
    operators see those), so ``status`` is 0 and ``groups`` empty for entries from it;
    ``hpke_public`` is set only for partners this node may send to (and itself).
    ``hybrid_public`` is the certified Ed25519 + ML-DSA-65 key envelope v2 roots verify
    under, None for a partner whose certificate certifies no ML-DSA-65 key (v1 only).
    ``earlier`` holds the keys of the partner's earlier signing certificates (replaced by
    operators) that still verify against the CA: messages stored under them still open.
    """

    partner: str
    status: int
    groups: frozenset[str]
    signing_key: Ed25519PublicKey
    signing_key_id: str
    key_id: str = ""
    hpke_public: HpkePublicKey | None = None
    hybrid_public: HybridPublicKey | None = None
    earlier: tuple[EarlierKey, ...] = ()

    def key(self, signing_key_id: str) -> EarlierKey | None:
        """The certified key this partner signs under as ``signing_key_id``: its current
        certificate's, or an earlier certificate's; None for any other id."""
        if signing_key_id == self.signing_key_id:
            return EarlierKey(self.signing_key_id, self.signing_key, self.hybrid_public)
        return next((k for k in self.earlier if k.signing_key_id == signing_key_id), None)


@dataclass(frozen=True)
class EarlierKey:
    """The key one signing certificate of a partner certifies, by its signing key id."""

    signing_key_id: str
    signing_key: Ed25519PublicKey
    hybrid_public: HybridPublicKey | None


@dataclass
class Directory:
    """The partner directory, each entry checked against the coalition CA."""

    peers: dict[str, Peer] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    def signer(self, sender: str, key_id: str) -> Ed25519PublicKey:
        """sender's certified Ed25519 key under ``key_id``: its current signing
        certificate's or an earlier one's (see ``Peer.earlier``). Raises KeyError."""
        peer = self.peers.get(sender)
        found = peer.key(key_id) if peer is not None else None
        if found is None:
            raise KeyError(sender)
        return found.signing_key

    def hybrid_signer(self, sender: str, signing_key_id: str) -> HybridPublicKey:
        """sender's certified hybrid key under ``signing_key_id`` (what
        ``envelope_v2.verify`` and ``open`` take as ``signer``). Raises KeyError when the
        sender is unknown, the key id is not its current or an earlier certificate's, or
        that certificate certifies no ML-DSA-65 key."""
        peer = self.peers.get(sender)
        found = peer.key(signing_key_id) if peer is not None else None
        if found is None or found.hybrid_public is None:
            raise KeyError(sender)
        return found.hybrid_public

    @classmethod
    def verify(
        cls,
        entries: Sequence[directory_pb2.DirectoryEntry],
        ca: x509.Certificate,
        now_ms: int,
        trust: TrustFile | None = None,
    ) -> Directory:
        """Keep only entries whose signing cert and key bundle verify; note the others.

        With a federation trust file, an entry whose code speaks for a peer nation is
        verified against that nation's CA as the trust file names it (never against this
        coalition's CA, and never against a CA the broker names); without one, such an
        entry does not verify."""
        out = cls()
        for e in entries:
            nation = trust.peer_for(e.partner) if trust is not None else None
            ca_here = nation.ca_cert if nation is not None else ca
            try:
                key = verify_signing_cert(e.signing_cert, ca_here, e.partner, now_ms)
                cert = x509.load_der_x509_certificate(e.signing_cert)
                kid = signing_key_id(cert)
                hybrid = certified_hybrid_key(cert)
                earlier = _earlier(e, ca_here, now_ms, kid)
                peer = Peer(
                    e.partner,
                    int(e.status),
                    frozenset(e.groups),
                    key,
                    kid,
                    hybrid_public=hybrid,
                    earlier=earlier,
                )
                if e.HasField("key_bundle"):
                    b = verify_key_bundle(e.key_bundle, hybrid or key, e.partner, now_ms)
                    peer = Peer(
                        e.partner,
                        int(e.status),
                        frozenset(e.groups),
                        key,
                        kid,
                        b.key_id,
                        HpkePublicKey(b.public_key),
                        hybrid,
                        earlier,
                    )
                out.peers[e.partner] = peer
            except (IdentityError, ValueError) as exc:
                out.problems[e.partner] = str(exc)
        return out


def _earlier(
    e: directory_pb2.DirectoryEntry, ca: x509.Certificate, now_ms: int, current: str
) -> tuple[EarlierKey, ...]:
    """The keys of e's earlier signing certificates that verify against the CA for the
    same partner and are valid now (the current rule for a certificate, so an earlier
    one stops opening anything when it expires). One that does not is left out: it
    verifies nothing, and the partner's current key still does."""
    out = []
    for der in e.previous_signing_certs:
        try:
            key = verify_signing_cert(der, ca, e.partner, now_ms)
            cert = x509.load_der_x509_certificate(der)
            kid = signing_key_id(cert)
            if kid != current:
                out.append(EarlierKey(kid, key, certified_hybrid_key(cert)))
        except (IdentityError, ValueError):
            continue
    return tuple(out)
