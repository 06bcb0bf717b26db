"""The partner directory as a partner verifies it: each entry's signing certificate against
the coalition CA, and its key bundle under that certified key (both halves of it when the
certificate certifies an ML-DSA-65 key too). Pure: no network I/O; the SDK fetches the
entries, anyone holding them and the CA certificate can check them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

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

__all__ = ["Directory", "Peer"]


@dataclass(frozen=True)
class Peer:
    """A partner as this node verified it: certified signing key, signed key bundle.

    The broker's directory gives partners no status or groups of other partners (only
    operators see those), so ``status`` is 0 and ``groups`` empty for entries from it;
    ``hpke_public`` is set only for partners this node may send to (and itself).
    ``hybrid_public`` is the certified Ed25519 + ML-DSA-65 key envelope v2 roots verify
    under, None for a partner whose certificate certifies no ML-DSA-65 key (v1 only).
    """

    partner: str
    status: int
    groups: frozenset[str]
    signing_key: Ed25519PublicKey
    signing_key_id: str
    key_id: str = ""
    hpke_public: HpkePublicKey | None = None
    hybrid_public: HybridPublicKey | None = None


@dataclass
class Directory:
    """The partner directory, each entry checked against the coalition CA."""

    peers: dict[str, Peer] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    def signer(self, sender: str, key_id: str) -> Ed25519PublicKey:
        peer = self.peers.get(sender)
        if peer is None or peer.signing_key_id != key_id:
            raise KeyError(sender)
        return peer.signing_key

    def hybrid_signer(self, sender: str, signing_key_id: str) -> HybridPublicKey:
        """sender's certified hybrid key under ``signing_key_id`` (what
        ``envelope_v2.verify`` and ``open`` take as ``signer``). Raises KeyError when the
        sender is unknown, the key id is not its certificate's, or the certificate
        certifies no ML-DSA-65 key."""
        peer = self.peers.get(sender)
        if peer is None or peer.signing_key_id != signing_key_id or peer.hybrid_public is None:
            raise KeyError(sender)
        return peer.hybrid_public

    @classmethod
    def verify(
        cls, entries: Sequence[directory_pb2.DirectoryEntry], ca: x509.Certificate, now_ms: int
    ) -> Directory:
        """Keep only entries whose signing cert and key bundle verify; note the others."""
        out = cls()
        for e in entries:
            try:
                key = verify_signing_cert(e.signing_cert, ca, e.partner, now_ms)
                cert = x509.load_der_x509_certificate(e.signing_cert)
                kid = signing_key_id(cert)
                hybrid = certified_hybrid_key(cert)
                peer = Peer(
                    e.partner, int(e.status), frozenset(e.groups), key, kid, hybrid_public=hybrid
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
                    )
                out.peers[e.partner] = peer
            except (IdentityError, ValueError) as exc:
                out.problems[e.partner] = str(exc)
        return out
