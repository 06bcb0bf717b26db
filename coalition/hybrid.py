"""Hybrid signing keys: Ed25519 AND ML-DSA-65 over the same domain-separated bytes.

A hybrid signature is a pair (``envelope_pb2.HybridSignature``): Ed25519 over
``pae(payload_type, body)`` and ML-DSA-65 (FIPS 204, with the context string
``CONTEXT``) over the same bytes. ``HybridPublicKey.verify`` accepts only when BOTH
verify, so forging one needs breaking both schemes: Ed25519 against a classical
attacker, ML-DSA-65 against a quantum one. Ed25519 is checked through
``coalition.ed25519`` (libsodium), ML-DSA-65 by ``cryptography``.

Serialization, fixed lengths and no algorithm field (one recipe):

- public key: Ed25519 public (32) || ML-DSA-65 public (1952) = 1984 bytes;
- private key: Ed25519 seed (32) || ML-DSA-65 seed (32) = 64 bytes;
- signature: Ed25519 (64 bytes) and ML-DSA-65 (3309 bytes), two proto fields.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey, MLDSA65PublicKey

from coalition import ed25519
from coalition.pae import pae
from coalition.v1 import envelope_pb2

__all__ = [
    "CONTEXT",
    "ED25519_SIGNATURE_LEN",
    "ML_DSA_65_SIGNATURE_LEN",
    "PRIVATE_LEN",
    "PUBLIC_LEN",
    "HybridKeyError",
    "HybridPublicKey",
    "HybridSignatureError",
    "HybridSigningKey",
]

CONTEXT = b"coalition hybrid signature"
_ED_PUBLIC_LEN = 32
_ML_DSA_PUBLIC_LEN = 1952
_SEED_LEN = 32
PUBLIC_LEN = _ED_PUBLIC_LEN + _ML_DSA_PUBLIC_LEN
PRIVATE_LEN = 2 * _SEED_LEN
ED25519_SIGNATURE_LEN = 64
ML_DSA_65_SIGNATURE_LEN = 3309


class HybridKeyError(ValueError):
    """Key bytes of the wrong length or form."""


class HybridSignatureError(InvalidSignature):
    """A hybrid signature did not verify; ``component`` names the half that failed."""

    def __init__(self, component: str) -> None:
        super().__init__(f"the {component} signature does not verify")
        self.component = component


@dataclass(frozen=True)
class HybridPublicKey:
    """A hybrid verification key: Ed25519 public key || ML-DSA-65 public key."""

    raw: bytes
    _ed25519: Ed25519PublicKey = field(init=False, repr=False, compare=False)
    _ml_dsa: MLDSA65PublicKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.raw) != PUBLIC_LEN:
            raise HybridKeyError(
                f"hybrid public key must be {PUBLIC_LEN} bytes, got {len(self.raw)}"
            )
        try:
            ed = Ed25519PublicKey.from_public_bytes(self.raw[:_ED_PUBLIC_LEN])
            ml = MLDSA65PublicKey.from_public_bytes(self.raw[_ED_PUBLIC_LEN:])
        except ValueError as exc:
            raise HybridKeyError("malformed hybrid public key") from exc
        object.__setattr__(self, "_ed25519", ed)
        object.__setattr__(self, "_ml_dsa", ml)

    @property
    def ed25519(self) -> Ed25519PublicKey:
        return self._ed25519

    @property
    def ml_dsa(self) -> MLDSA65PublicKey:
        return self._ml_dsa

    def fingerprint(self) -> bytes:
        """SHA-256 of the serialized key: names the key pair, for caches."""
        return hashlib.sha256(self.raw).digest()

    def verify(
        self, signature: envelope_pb2.HybridSignature, payload_type: str, body: bytes
    ) -> None:
        """Check both halves over ``pae(payload_type, body)``.

        Raises HybridSignatureError (an InvalidSignature) naming the first half that is
        missing or does not verify; Ed25519 is checked first.
        """
        signed = pae(payload_type, body)
        try:
            ed25519.verify(self._ed25519, signature.ed25519, signed)
        except InvalidSignature:
            raise HybridSignatureError("Ed25519") from None
        if len(signature.ml_dsa_65) != ML_DSA_65_SIGNATURE_LEN:
            raise HybridSignatureError("ML-DSA-65")
        try:
            self._ml_dsa.verify(signature.ml_dsa_65, signed, CONTEXT)
        except InvalidSignature:
            raise HybridSignatureError("ML-DSA-65") from None


class HybridSigningKey:
    """An Ed25519 + ML-DSA-65 signing key pair."""

    __slots__ = ("_ed25519", "_ml_dsa", "_public")

    def __init__(self, ed25519_key: Ed25519PrivateKey, ml_dsa_key: MLDSA65PrivateKey) -> None:
        self._ed25519 = ed25519_key
        self._ml_dsa = ml_dsa_key
        self._public = HybridPublicKey(
            ed25519_key.public_key().public_bytes_raw() + ml_dsa_key.public_key().public_bytes_raw()
        )

    @classmethod
    def generate(cls) -> HybridSigningKey:
        """A fresh key pair from the OS CSPRNG."""
        return cls.from_private_bytes(os.urandom(PRIVATE_LEN))

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> HybridSigningKey:
        """From Ed25519 seed || ML-DSA-65 seed. Raises HybridKeyError on a wrong length."""
        if len(raw) != PRIVATE_LEN:
            raise HybridKeyError(f"hybrid private key must be {PRIVATE_LEN} bytes")
        return cls(
            Ed25519PrivateKey.from_private_bytes(raw[:_SEED_LEN]),
            MLDSA65PrivateKey.from_seed_bytes(raw[_SEED_LEN:]),
        )

    def private_bytes(self) -> bytes:
        """Serialized private key; write only to 0600 files."""
        return self._ed25519.private_bytes_raw() + self._ml_dsa.private_bytes_raw()

    def public_key(self) -> HybridPublicKey:
        return self._public

    @property
    def ed25519(self) -> Ed25519PrivateKey:
        """The Ed25519 half (for tests and vectors that build one-half signatures)."""
        return self._ed25519

    @property
    def ml_dsa(self) -> MLDSA65PrivateKey:
        """The ML-DSA-65 half."""
        return self._ml_dsa

    def sign(self, payload_type: str, body: bytes) -> envelope_pb2.HybridSignature:
        """Both signatures over ``pae(payload_type, body)``."""
        signed = pae(payload_type, body)
        return envelope_pb2.HybridSignature(
            ed25519=self._ed25519.sign(signed),
            ml_dsa_65=self._ml_dsa.sign(signed, CONTEXT),
        )

    def __repr__(self) -> str:  # never show key material
        return "HybridSigningKey(<redacted>)"
