"""An envelope's signature check at publish, for v1 and v2, with the same refusals.

v1 (``coalition.envelope.verify``): the Ed25519 signature over the header, under the
sender's certified signing key. v2 (``coalition.envelope_v2.verify``): the header's
inclusion path to its batch root and the root's hybrid signature (Ed25519 AND
ML-DSA-65) under the hybrid key the CA certified in the sender's signing certificate,
each root checked once while it stays in the broker's ``RootCache`` (``ROOT_CACHE_SIZE``
roots). Both versions take the signer through the same certificate, validity and cache
(``broker.exchange.directory``), refuse a sender that is not the authenticated partner
before any signature work, and answer the same codes for the same failures (v2 adds
``bad_path``). Which version a sender must use follows its certificate: one carrying an
ML-DSA-65 key must send v2 (a v1 envelope, Ed25519 only, is refused
``hybrid_key_required``, so nobody can strip its messages back to one signature), one
without may only send v1 (``no_hybrid_key``).

Not thread-safe: the publish pipeline calls it from one thread at a time (the verify
thread, or the event loop while that thread is idle).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.errors import BrokerError, Forbidden, InvalidInput, NotAuthenticated
from broker.exchange.directory import CertifiedKey, SigningCertNotValid
from broker.exchange.headers import with_recipients
from broker.exchange.memo import Memo
from coalition import envelope as env
from coalition import envelope_v2
from coalition.hybrid import HybridPublicKey, HybridSignatureError
from coalition.v1 import envelope_pb2

__all__ = ["ROOT_CACHE_SIZE", "CountingRootCache", "EnvelopeSignatures", "RefusingRootCache"]

# Batch roots remembered as verified. One entry holds the root statement (about 90
# bytes) and its two signatures (3,373 bytes), the key being shared with the directory's
# cache: about 3.5 KB, so at most about 3.5 MB. A root is looked up again only while its
# batch arrives (one or a few Publish requests), so a few roots per sender suffice;
# an evicted root is simply verified again.
ROOT_CACHE_SIZE = 1024


class CountingRootCache(envelope_v2.RootCache):
    """The kernel's RootCache, also counting the lookups it answered without a check.

    ``verifications`` (the kernel's count) is every hybrid signature check made,
    successful or not; ``hits`` every root found verified with the same signature.
    """

    def __init__(self, max_roots: int = ROOT_CACHE_SIZE) -> None:
        super().__init__(max_roots)
        self.hits = 0

    def check(
        self,
        public_key: HybridPublicKey,
        root: bytes,
        signature: envelope_pb2.HybridSignature,
    ) -> None:
        before = self.verifications
        super().check(public_key, root, signature)
        if self.verifications == before:
            self.hits += 1


class RefusingRootCache(CountingRootCache):
    """A CountingRootCache that also remembers roots whose signature failed (by a digest
    of key, root and both signatures, ``ROOT_CACHE_SIZE`` of them), so a sender that
    repeats one bad root costs one hybrid check, not one per envelope. Federation
    ingress uses it: a peer's gateway may repeat what it likes within its rate."""

    def __init__(self, max_roots: int = ROOT_CACHE_SIZE) -> None:
        super().__init__(max_roots)
        self._failed: Memo[bytes, str] = Memo(max_roots)

    def check(
        self,
        public_key: HybridPublicKey,
        root: bytes,
        signature: envelope_pb2.HybridSignature,
    ) -> None:
        slot = hashlib.sha256(
            b"".join(
                len(b).to_bytes(4, "big") + b
                for b in (public_key.raw, root, signature.ed25519, signature.ml_dsa_65)
            )
        ).digest()
        failed = self._failed.get(slot)
        if failed is not None:
            self.hits += 1
            raise HybridSignatureError(failed)
        try:
            super().check(public_key, root, signature)
        except HybridSignatureError as exc:
            self._failed.put(slot, str(exc))
            raise


class EnvelopeSignatures:
    """The publish pipeline's signature step: the verified header, or the refusal."""

    def __init__(
        self,
        certified: Callable[[str, str], CertifiedKey],
        roots: CountingRootCache | None = None,
    ) -> None:
        self._certified = certified  # PartnerDirectory.certified: both halves, valid now
        self.roots = roots if roots is not None else CountingRootCache()

    def verify(self, partner: str, e: envelope_pb2.Envelope) -> envelope_pb2.Header:
        """e's header (v2: its core with its recipients, see broker.exchange.headers),
        once its signature verified for ``partner``. Raises BrokerError."""
        if envelope_v2.is_v2(e):
            return self._verify_v2(partner, e)

        def signer(sender: str, key_id: str) -> Ed25519PublicKey:
            certified = self._signer(partner, sender, key_id)
            if certified.hybrid is not None:
                raise NotAuthenticated(
                    "hybrid_key_required",
                    f"{partner}'s signing certificate carries an ML-DSA-65 key, so its "
                    "envelopes must be v2 (a hybrid-signed batch root); a v1 envelope, "
                    "signed with Ed25519 only, is refused",
                )
            return certified.key

        try:
            return env.verify(e, signer)
        except env.InvalidEnvelope as exc:
            raise _refusal(exc.reason.value, exc) from exc

    def _verify_v2(self, partner: str, e: envelope_pb2.Envelope) -> envelope_pb2.Header:
        def signer(sender: str, key_id: str) -> HybridPublicKey:
            hybrid = self._signer(partner, sender, key_id).hybrid
            if hybrid is None:
                raise NotAuthenticated(
                    "no_hybrid_key",
                    f"{partner}'s signing certificate carries no ML-DSA-65 key, so a v2 "
                    "envelope (a hybrid-signed batch root) cannot be verified under it; "
                    "send v1, or have the CA certify a hybrid signing key",
                )
            return hybrid

        try:
            verified = envelope_v2.verify(e, signer, self.roots)
        except envelope_v2.InvalidEnvelopeV2 as exc:
            raise _refusal(exc.reason.value, exc) from exc
        return with_recipients(verified.header, verified.header_v2)

    def _signer(self, partner: str, sender: str, key_id: str) -> CertifiedKey:
        # Called by verify once the header parsed, before any signature check: an
        # envelope claiming another sender is refused as such, not as a bad signature.
        # BrokerError is not KeyError, so the kernel's verify lets it through.
        if sender != partner:
            raise Forbidden(
                "sender_mismatch",
                f"envelope sender {sender!r} is not the authenticated partner {partner!r}",
            )
        try:
            return self._certified(sender, key_id)
        except SigningCertNotValid as exc:
            raise NotAuthenticated(exc.code, exc.message) from None
        except KeyError:
            raise NotAuthenticated(
                "unknown_signing_key",
                f"signing key {key_id} is not {partner}'s certified key",
            ) from None


def _refusal(code: str, exc: Exception) -> BrokerError:
    """The refusal for a kernel verify failure: malformed is the request's fault
    (INVALID_ARGUMENT); every other failure is an envelope that does not verify."""
    if code == "malformed":
        return InvalidInput("malformed", f"envelope is malformed: {exc}")
    return NotAuthenticated(code, f"envelope does not verify: {exc}")
