"""Ed25519 signature checks, on libsodium (PyNaCl). Keys, signing and X.509 stay in cryptography.

Every Ed25519 check in the code base goes through ``verify`` here. Why a second library:
the check is the largest single cost per message (the broker pays it once per envelope,
every recipient for every delivery), and libsodium's is the faster of the two; the
figures are in docs/bench.md, and ``python -m bench.seal`` measures both.

libsodium is also the stricter of the two. It refuses a non-canonical ``S`` (``S >= L``),
small-order public keys and a non-canonical ``R``, none of which an honest signer produces.
So a signature accepted here is accepted by OpenSSL too, never the reverse.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nacl.exceptions import BadSignatureError
from nacl.exceptions import ValueError as NaclValueError
from nacl.signing import VerifyKey

__all__ = ["verify"]


def verify(public_key: Ed25519PublicKey, signature: bytes, data: bytes) -> None:
    """Check an Ed25519 signature over data, as ``Ed25519PublicKey.verify`` does.

    Raises cryptography's InvalidSignature when it does not verify, whatever the reason
    (wrong length, wrong key, altered data, a malformed or non-canonical signature).
    """
    try:  # a signature of the wrong length is libsodium's ValueError
        VerifyKey(public_key.public_bytes_raw()).verify(data, signature)
    except (BadSignatureError, NaclValueError):
        raise InvalidSignature from None
