"""Test-vector keys, derived in code from public labels so no private key is ever committed.

These keys are public by construction (anyone can derive them): use them only for
test vectors. Used by scripts/make_envelope_vectors.py, scripts/make_envelope_v2_vectors.py and the
tests of both vector files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from coalition.envelope import Recipient
from coalition.hpke import PRIVATE_LEN, HpkePrivateKey, HpkePublicKey
from coalition.hybrid import PRIVATE_LEN as HYBRID_PRIVATE_LEN
from coalition.hybrid import HybridPublicKey, HybridSigningKey

_PREFIX = b"coalition test vector: "

PARTNERS = ("KOR", "USA", "GBR", "UKR")


def _derive(label: bytes, length: int) -> bytes:
    """length bytes from sha256(label + b"/1") || sha256(label + b"/2") || ..."""
    out = b""
    counter = 1
    while len(out) < length:
        out += hashlib.sha256(label + b"/%d" % counter).digest()
        counter += 1
    return out[:length]


def signing_key(partner: str) -> Ed25519PrivateKey:
    """The partner's Ed25519 test signing key."""
    seed = hashlib.sha256(_PREFIX + b"signing " + partner.encode()).digest()
    return Ed25519PrivateKey.from_private_bytes(seed)


def signing_key_id(partner: str) -> str:
    """A stand-in for the signing certificate serial (hex)."""
    return hashlib.sha256(_PREFIX + b"signing key id " + partner.encode()).hexdigest()[:16]


def hpke_key(partner: str) -> HpkePrivateKey:
    """The partner's HPKE (ML-KEM-768 + X25519) test key."""
    return HpkePrivateKey(_derive(_PREFIX + b"hpke " + partner.encode(), PRIVATE_LEN))


def key_id_for(public: HpkePublicKey) -> str:
    """First 16 hex of SHA-256 of the public key, as coalition.identity.key_id_for defines it."""
    return hashlib.sha256(public.raw).hexdigest()[:16]


@dataclass(frozen=True)
class TestPartner:
    __test__ = False  # not a pytest test class

    code: str
    signing_key: Ed25519PrivateKey
    signing_key_id: str
    hpke_key: HpkePrivateKey
    hpke_key_id: str

    @property
    def recipient(self) -> Recipient:
        return Recipient(self.code, self.hpke_key_id, self.hpke_key.public_key())

    @property
    def keys(self) -> dict[str, HpkePrivateKey]:
        return {self.hpke_key_id: self.hpke_key}


def partner(code: str) -> TestPartner:
    """Every test key of one partner."""
    hk = hpke_key(code)
    return TestPartner(
        code, signing_key(code), signing_key_id(code), hk, key_id_for(hk.public_key())
    )


def signer(sender: str, key_id: str) -> Ed25519PublicKey:
    """A directory of the vector partners' signing keys; KeyError when unknown."""
    if sender not in PARTNERS or key_id != signing_key_id(sender):
        raise KeyError((sender, key_id))
    return signing_key(sender).public_key()


def public_summary() -> dict[str, dict[str, str]]:
    """Public keys and key ids, recorded in the vectors file to detect a changed derivation."""
    out: dict[str, dict[str, str]] = {}
    for code in PARTNERS:
        p = partner(code)
        out[code] = {
            "signing_key_id": p.signing_key_id,
            "signing_public_key": p.signing_key.public_key().public_bytes_raw().hex(),
            "hpke_key_id": p.hpke_key_id,
            "hpke_public_key_sha256": hashlib.sha256(p.hpke_key.public_key().raw).hexdigest(),
        }
    return out


def hybrid_key(partner: str) -> HybridSigningKey:
    """The partner's hybrid (Ed25519 + ML-DSA-65) test signing key, for envelope v2."""
    return HybridSigningKey.from_private_bytes(
        _derive(_PREFIX + b"hybrid signing " + partner.encode(), HYBRID_PRIVATE_LEN)
    )


def hybrid_key_id(partner: str) -> str:
    """A stand-in for the hybrid signing certificate serial (hex)."""
    return hashlib.sha256(_PREFIX + b"hybrid key id " + partner.encode()).hexdigest()[:16]


def hybrid_signer(sender: str, key_id: str) -> HybridPublicKey:
    """A directory of the vector partners' hybrid keys; KeyError when unknown."""
    if sender not in PARTNERS or key_id != hybrid_key_id(sender):
        raise KeyError((sender, key_id))
    return hybrid_key(sender).public_key()


def public_summary_v2() -> dict[str, dict[str, str]]:
    """As public_summary, with the hybrid signing keys envelope v2 uses."""
    out = public_summary()
    for code in PARTNERS:
        out[code]["hybrid_key_id"] = hybrid_key_id(code)
        out[code]["hybrid_public_key_sha256"] = hashlib.sha256(
            hybrid_key(code).public_key().raw
        ).hexdigest()
    return out
