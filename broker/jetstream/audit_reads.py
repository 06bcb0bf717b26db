"""Reading the audit stream back: every block in order, and which checkpoint signers a
verification trusts."""

from __future__ import annotations

from collections.abc import AsyncIterator

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.jetstream.audit_blocks import Block
from broker.jetstream.audit_stream import AuditStream
from coalition.identity import IdentityError, IdentityKind, identity_from_cert, verify_audit_cert


async def scan(stream: AuditStream, last: int) -> AsyncIterator[tuple[int, Block | None]]:
    """(stream sequence, block) for every message up to last, in order; None for a
    message that is not a block."""
    for seq in range(1, last + 1):
        yield seq, await stream.read(seq)


class SignerTrust:
    """Which audit certificates carried by checkpoints a verification accepts: those the
    CA issued to a broker identity, valid when the checkpoint was signed (none without a
    CA). Each certificate is judged once, at the first checkpoint that carries it."""

    def __init__(self, ca: x509.Certificate | None, own: bytes = b"") -> None:
        self._ca = ca
        self._judged: dict[bytes, Ed25519PublicKey | None] = {}
        if own:
            self._judged[own] = None  # this broker's own key is trusted by the caller
        self.seen: list[bytes] = []  # every distinct signer certificate met, in order

    def meet(self, der: bytes, time_ms: int) -> Ed25519PublicKey | None:
        """The key of der if it is newly trusted (to add to the verifier), else None."""
        if not der:
            return None
        if der not in self.seen:
            self.seen.append(der)
        if der in self._judged:
            return None
        self._judged[der] = key = self._certified(der, time_ms)
        return key

    def _certified(self, der: bytes, time_ms: int) -> Ed25519PublicKey | None:
        if self._ca is None:
            return None
        try:
            identity = identity_from_cert(x509.load_der_x509_certificate(der))
            if identity.kind is not IdentityKind.BROKER:
                return None
            return verify_audit_cert(der, self._ca, identity.name, time_ms)
        except (ValueError, IdentityError):
            return None
