"""Opening a delivery, v1 or v2, into one ``Opened``.

The envelope's own form decides (``envelope_v2.is_v2``): a v1 envelope opens with
``coalition.envelope.open`` under the sender's certified Ed25519 key; a v2 envelope with
``envelope_v2.open`` under the sender's certified hybrid key, through this client's
``RecipientEpochs`` (each epoch decapsulated once) and ``RootCache`` (each batch root
verified once), both bounded. Whatever reads a header afterwards (the node's checks,
its inbox) reads ``Opened``: the signed header fields are in ``header`` for both (for v2
the signed core, which carries no keys), and the sender's number for this recipient is
``recipient_sequence``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from coalition import envelope as env
from coalition import envelope_v2
from coalition.envelope_v2 import RootCache
from coalition.epoch import RecipientEpochs
from coalition.hpke import HpkePrivateKey
from coalition.hybrid import HybridPublicKey
from coalition.v1 import envelope_pb2

__all__ = [
    "OPEN_ERRORS",
    "OpenError",
    "Opened",
    "Opener",
    "Signers",
    "claimed_header",
    "is_unknown_sender",
]

OpenError = env.InvalidEnvelope | envelope_v2.InvalidEnvelopeV2
# Every refusal of open(), v1's and v2's; ``reason.value`` names the step either way.
OPEN_ERRORS = (env.InvalidEnvelope, envelope_v2.InvalidEnvelopeV2)


@dataclass(frozen=True)
class Opened:
    """A verified, decrypted delivery, v1 or v2."""

    header: envelope_pb2.Header  # the signed header (for v2 its core: no keys, no digest)
    plaintext: bytes
    recipient_sequence: int  # the sender's number for this recipient; 0 = untracked
    recipients: tuple[str, ...]  # every partner the sender wrapped a key for
    version: int  # 1 or 2


class Signers(Protocol):
    """The senders' certified keys, as a verified ``coalition.directory.Directory`` gives
    them: each raises KeyError for a sender or signing key id it does not know."""

    def signer(self, sender: str, key_id: str) -> Ed25519PublicKey: ...

    def hybrid_signer(self, sender: str, key_id: str) -> HybridPublicKey: ...


def is_unknown_sender(exc: OpenError) -> bool:
    """Whether open() failed because the directory has no key for the sender's key id."""
    return exc.reason.value == env.Failure.UNKNOWN_SENDER.value


def claimed_header(envelope: envelope_pb2.Envelope) -> envelope_pb2.Header | None:
    """The header an envelope CLAIMS (unverified), v1 or v2; None when it does not parse."""
    try:
        if envelope_v2.is_v2(envelope):
            return envelope_v2.parse_v2(envelope)[0]
        return env.parse_header(envelope)
    except OPEN_ERRORS:
        return None


class Opener:
    """One recipient's opening state: its epoch keys and the roots it verified."""

    def __init__(
        self,
        recipient: str,
        keys: Mapping[str, HpkePrivateKey],
        *,
        max_roots: int = 4096,
        max_epochs: int = 4096,
    ) -> None:
        self.recipient = recipient
        self._keys = keys
        self.epochs = RecipientEpochs(recipient, keys, max_epochs)
        self.roots = RootCache(max_roots)

    def open(self, envelope: envelope_pb2.Envelope, directory: Signers) -> Opened:
        """Verify and decrypt. Raises env.InvalidEnvelope or envelope_v2.InvalidEnvelopeV2."""
        if envelope_v2.is_v2(envelope):
            o2 = envelope_v2.open(
                envelope, epochs=self.epochs, signer=directory.hybrid_signer, roots=self.roots
            )
            return Opened(o2.header, o2.plaintext, o2.sequence, o2.recipients, 2)
        o1 = env.open(
            envelope, recipient=self.recipient, keys=self._keys, signer=_v1_signer(directory)
        )
        wrapped = o1.header.wrapped_keys
        mine = next((w.sequence for w in wrapped if w.recipient == self.recipient), 0)
        return Opened(o1.header, o1.plaintext, mine, tuple(w.recipient for w in wrapped), 1)


def _v1_signer(directory: Signers) -> Callable[[str, str], Ed25519PublicKey]:
    """The signer for a v1 envelope: the sender's Ed25519 key, unless its signing
    certificate certifies an ML-DSA-65 key.

    Such a certificate says its holder signs v2 only (the broker refuses v1 from it at
    publish, ``hybrid_key_required``); accepting v1 under it here would let whoever can
    forge Ed25519 alone, with a broker to deliver it, speak for a hybrid sender. Called
    by ``env.open`` before the signature check, which lets the refusal through.
    """

    def signer(sender: str, key_id: str) -> Ed25519PublicKey:
        key = directory.signer(sender, key_id)  # KeyError: open() says unknown_sender
        try:
            directory.hybrid_signer(sender, key_id)
        except KeyError:
            return key  # a v1-only certificate
        raise env.InvalidEnvelope(
            env.Failure.BAD_SIGNATURE,
            f"{sender[:64]!r}'s signing certificate certifies an ML-DSA-65 key, so its "
            "envelopes must be v2 (a hybrid-signed batch root); a v1 envelope, signed with "
            "Ed25519 only, is refused",
        )

    return signer
