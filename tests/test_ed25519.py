"""coalition.ed25519.verify: the one Ed25519 check, on libsodium, stricter than OpenSSL's."""

from __future__ import annotations

import os

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from coalition import ed25519

# The group order of edwards25519 (RFC 8032, section 5.1).
L = 2**252 + 27742317777372353535851937790883648493
# RFC 8032, section 7.1, TEST 2: a one-byte message.
RFC_PUBLIC = bytes.fromhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
RFC_MESSAGE = bytes.fromhex("72")
RFC_SIGNATURE = bytes.fromhex(
    "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
    "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
)


def test_rfc_8032_vector_verifies_and_any_change_is_refused() -> None:
    key = Ed25519PublicKey.from_public_bytes(RFC_PUBLIC)
    ed25519.verify(key, RFC_SIGNATURE, RFC_MESSAGE)
    with pytest.raises(InvalidSignature):
        ed25519.verify(key, RFC_SIGNATURE, b"\x73")
    for i in (0, 31, 32, 63):
        bad = bytearray(RFC_SIGNATURE)
        bad[i] ^= 0x01
        with pytest.raises(InvalidSignature):
            ed25519.verify(key, bytes(bad), RFC_MESSAGE)


def test_agrees_with_cryptography_on_its_own_signatures() -> None:
    for _ in range(20):
        private = Ed25519PrivateKey.generate()
        data = os.urandom(700)
        signature = private.sign(data)
        ed25519.verify(private.public_key(), signature, data)
        other = Ed25519PrivateKey.generate().public_key()
        with pytest.raises(InvalidSignature):
            ed25519.verify(other, signature, data)


@pytest.mark.parametrize("length", [0, 63, 65, 128])
def test_wrong_length_signature_is_invalid_not_an_error(length: int) -> None:
    key = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(InvalidSignature):
        ed25519.verify(key, bytes(length), b"data")


def test_non_canonical_s_is_refused() -> None:
    """S + L is the same scalar mod L: a malleated copy of a valid signature."""
    private = Ed25519PrivateKey.generate()
    signature = private.sign(b"data")
    s = int.from_bytes(signature[32:], "little") + L
    assert s < 2**256
    with pytest.raises(InvalidSignature):
        ed25519.verify(private.public_key(), signature[:32] + s.to_bytes(32, "little"), b"data")


def test_small_order_key_cannot_sign_everything() -> None:
    """Under the identity point as public key, R = identity and S = 0 satisfy the
    cofactorless equation for every message; OpenSSL's check accepts that (cryptography
    50), libsodium's refuses small-order keys."""
    identity = bytes([1]) + bytes(31)
    key = Ed25519PublicKey.from_public_bytes(identity)
    forged = identity + bytes(32)
    for data in (b"", b"transfer the keys", os.urandom(64)):
        with pytest.raises(InvalidSignature):
            ed25519.verify(key, forged, data)
