"""HPKE key material for key wrapping: ML-KEM-768 + X25519 (hybrid, post-quantum).

The suite is fixed: KEM ML-KEM-768+X25519, KDF HKDF-SHA256, AEAD AES-256-GCM,
all from ``cryptography.hazmat.primitives.hpke``. This module only holds and
serializes keys; wrapping happens in ``coalition.envelope``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

KEM_NAME = "MLKEM768-X25519"
SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)

_MLKEM_SEED_LEN = 64
_X25519_LEN = 32
_MLKEM_PUB_LEN = 1184
PRIVATE_LEN = _MLKEM_SEED_LEN + _X25519_LEN
PUBLIC_LEN = _MLKEM_PUB_LEN + _X25519_LEN


class HpkeKeyError(ValueError):
    """Key bytes of the wrong length or form."""


@dataclass(frozen=True)
class HpkePublicKey:
    """A recipient's public key: ML-KEM-768 public key || X25519 public key."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != PUBLIC_LEN:
            raise HpkeKeyError(f"HPKE public key must be {PUBLIC_LEN} bytes, got {len(self.raw)}")

    def to_hpke(self) -> hpke.MLKEM768X25519PublicKey:
        """The key as the cryptography HPKE type. Raises HpkeKeyError if malformed."""
        try:
            return hpke.MLKEM768X25519PublicKey(
                mlkem.MLKEM768PublicKey.from_public_bytes(self.raw[:_MLKEM_PUB_LEN]),
                x25519.X25519PublicKey.from_public_bytes(self.raw[_MLKEM_PUB_LEN:]),
            )
        except ValueError as exc:
            raise HpkeKeyError("malformed HPKE public key") from exc


class HpkePrivateKey:
    """A recipient's private key: ML-KEM-768 seed (64) || X25519 private (32)."""

    __slots__ = ("_hpke", "_mlkem_seed", "_public", "_x25519")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != PRIVATE_LEN:
            raise HpkeKeyError(f"HPKE private key must be {PRIVATE_LEN} bytes")
        self._mlkem_seed = bytes(raw[:_MLKEM_SEED_LEN])
        mk = mlkem.MLKEM768PrivateKey.from_seed_bytes(self._mlkem_seed)
        xk = x25519.X25519PrivateKey.from_private_bytes(raw[_MLKEM_SEED_LEN:])
        self._x25519 = xk
        self._hpke = hpke.MLKEM768X25519PrivateKey(mk, xk)
        self._public = HpkePublicKey(
            mk.public_key().public_bytes_raw() + xk.public_key().public_bytes_raw()
        )

    @classmethod
    def generate(cls) -> HpkePrivateKey:
        """A fresh key pair from the OS CSPRNG."""
        return cls(os.urandom(PRIVATE_LEN))

    def private_bytes(self) -> bytes:
        """Serialized private key; write only to 0600 files."""
        from cryptography.hazmat.primitives import serialization

        x = self._x25519.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return self._mlkem_seed + x

    def public_key(self) -> HpkePublicKey:
        return self._public

    def to_hpke(self) -> hpke.MLKEM768X25519PrivateKey:
        return self._hpke

    def __repr__(self) -> str:  # never show key material
        return "HpkePrivateKey(<redacted>)"
