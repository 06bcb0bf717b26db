"""coalition.hybrid: Ed25519 AND ML-DSA-65, both required."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey

from coalition import hybrid
from coalition.hybrid import HybridKeyError, HybridSignatureError, HybridSigningKey
from coalition.pae import BATCH_ROOT_TYPE, pae
from coalition.v1 import envelope_pb2

KEY = HybridSigningKey.generate()
BODY = b"batch root statement"


def test_round_trip_and_serialization() -> None:
    sig = KEY.sign(BATCH_ROOT_TYPE, BODY)
    assert len(sig.ed25519) == hybrid.ED25519_SIGNATURE_LEN
    assert len(sig.ml_dsa_65) == hybrid.ML_DSA_65_SIGNATURE_LEN
    KEY.public_key().verify(sig, BATCH_ROOT_TYPE, BODY)
    again = HybridSigningKey.from_private_bytes(KEY.private_bytes())
    assert again.public_key() == KEY.public_key()
    assert len(KEY.public_key().raw) == hybrid.PUBLIC_LEN == 1984
    assert len(KEY.private_bytes()) == hybrid.PRIVATE_LEN == 64
    assert "redacted" in repr(KEY)
    assert KEY.private_bytes().hex() not in repr(KEY.public_key())


def test_both_halves_are_over_the_domain_separated_bytes() -> None:
    sig = KEY.sign(BATCH_ROOT_TYPE, BODY)
    signed = pae(BATCH_ROOT_TYPE, BODY)
    KEY.ed25519.public_key().verify(sig.ed25519, signed)
    KEY.ml_dsa.public_key().verify(sig.ml_dsa_65, signed, hybrid.CONTEXT)
    with pytest.raises(InvalidSignature):  # the context string is part of what is signed
        KEY.ml_dsa.public_key().verify(sig.ml_dsa_65, signed)
    with pytest.raises(HybridSignatureError):  # another payload type is another message
        KEY.public_key().verify(sig, "application/vnd.coalition.header.v1+proto", BODY)


@pytest.mark.parametrize("half", ["ed25519", "ml_dsa_65"])
def test_one_half_alone_is_refused(half: str) -> None:
    good = KEY.sign(BATCH_ROOT_TYPE, BODY)
    only = envelope_pb2.HybridSignature()
    setattr(only, half, getattr(good, half))
    with pytest.raises(HybridSignatureError) as info:
        KEY.public_key().verify(only, BATCH_ROOT_TYPE, BODY)
    assert info.value.component == ("ML-DSA-65" if half == "ed25519" else "Ed25519")


def test_a_half_from_another_key_is_refused() -> None:
    good = KEY.sign(BATCH_ROOT_TYPE, BODY)
    # The same Ed25519 key with another ML-DSA key: the Ed25519 half verifies, not the other.
    other = HybridSigningKey(KEY.ed25519, MLDSA65PrivateKey.generate()).sign(BATCH_ROOT_TYPE, BODY)
    mixed = envelope_pb2.HybridSignature(ed25519=good.ed25519, ml_dsa_65=other.ml_dsa_65)
    with pytest.raises(HybridSignatureError, match="ML-DSA-65"):
        KEY.public_key().verify(mixed, BATCH_ROOT_TYPE, BODY)
    other = HybridSigningKey(Ed25519PrivateKey.generate(), KEY.ml_dsa).sign(BATCH_ROOT_TYPE, BODY)
    mixed = envelope_pb2.HybridSignature(ed25519=other.ed25519, ml_dsa_65=good.ml_dsa_65)
    with pytest.raises(HybridSignatureError, match="Ed25519"):
        KEY.public_key().verify(mixed, BATCH_ROOT_TYPE, BODY)


def test_altered_body_or_signature_is_refused() -> None:
    sig = KEY.sign(BATCH_ROOT_TYPE, BODY)
    with pytest.raises(HybridSignatureError):
        KEY.public_key().verify(sig, BATCH_ROOT_TYPE, BODY + b"x")
    flipped = envelope_pb2.HybridSignature()
    flipped.CopyFrom(sig)
    flipped.ml_dsa_65 = sig.ml_dsa_65[:-1] + bytes([sig.ml_dsa_65[-1] ^ 1])
    with pytest.raises(HybridSignatureError, match="ML-DSA-65"):
        KEY.public_key().verify(flipped, BATCH_ROOT_TYPE, BODY)
    flipped.ml_dsa_65 = sig.ml_dsa_65[:-1]
    with pytest.raises(HybridSignatureError, match="ML-DSA-65"):
        KEY.public_key().verify(flipped, BATCH_ROOT_TYPE, BODY)


def test_malformed_keys_are_refused() -> None:
    with pytest.raises(HybridKeyError):
        hybrid.HybridPublicKey(b"\x00" * 10)
    with pytest.raises(HybridKeyError):
        HybridSigningKey.from_private_bytes(b"\x00" * 63)
