"""Epoch keys: one HPKE encapsulation per (sender, recipient) per epoch, not per message.

Sender side (``SenderEpochs``): for each recipient the sender opens an epoch by drawing
a fresh 32-byte key-encryption key (KEK) and a 16-byte epoch id and encapsulating the
KEK to the recipient's HPKE key (``coalition.hpke.SUITE``) under ``info`` binding
sender, recipient, key id and epoch id. Each message's data key is then wrapped under
the KEK with AES-256-GCM (fresh 12-byte nonce) and associated data binding sender,
recipient, epoch id and the message's header core (``HeaderV2.core``: message id,
label, topic, sequence and the rest), so a wrapped key opens only for that header.

An epoch rolls (the next message opens a new one):

- after ``EpochPolicy.max_messages`` messages or ``max_seconds`` seconds;
- at once when the recipient's key id or public key differs from the one the epoch was
  opened under (a key-bundle change);
- at once on ``roll()``, which the caller must call on any policy, key-bundle or
  membership change (one recipient or all). A rolled epoch's KEK is dropped and never
  used again, so a partner removed from a release never holds a KEK that wraps the data
  key of any later message: later messages are wrapped only under the KEKs of the
  partners they are addressed to, each opened after the change.

Missed epoch openings: the encapsulation is carried in every message of the epoch
until the sender records the recipient's acknowledgement (``acknowledge()``), so a
recipient that never saw the message that opened an epoch opens the later ones from
the copy they carry.

Recipient side (``RecipientEpochs``): decapsulates an epoch's KEK once, caches it
(bounded, least recently used dropped first) keyed by (sender, key id, epoch id), and
unwraps data keys with it. It caches a KEK only after it unwrapped a data key, and it
raises ``EpochKeyError`` for any failure without saying more than which step failed.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from coalition.envelope import Recipient
from coalition.hpke import SUITE, HpkePrivateKey
from coalition.pae import pae
from coalition.v1 import envelope_pb2

__all__ = [
    "ENCAPSULATION_LEN",
    "EPOCH_ID_LEN",
    "KEK_LEN",
    "WRAPPED_LEN",
    "EpochKeyError",
    "EpochPolicy",
    "RecipientEpochs",
    "SenderEpochs",
    "encapsulation_info",
    "wrap_aad",
]

KEK_LEN = 32
EPOCH_ID_LEN = 16
_NONCE_LEN = 12
_TAG_LEN = 16
_DATA_KEY_LEN = 32
# HPKE of a 32-byte KEK under the suite: 1,120 encapsulation, 32 key, 16 tag.
ENCAPSULATION_LEN = 1120 + KEK_LEN + _TAG_LEN
WRAPPED_LEN = _NONCE_LEN + _DATA_KEY_LEN + _TAG_LEN
_ENCAP_INFO = b"coalition/v2 epoch\x00"
_WRAP_TYPE = "application/vnd.coalition.epoch-wrap.v2"


class EpochKeyError(ValueError):
    """A data key could not be recovered. ``not_held`` is True when no private key fits."""

    def __init__(self, detail: str, *, not_held: bool = False) -> None:
        super().__init__(detail)
        self.not_held = not_held


@dataclass(frozen=True)
class EpochPolicy:
    """When a sender's epoch for one recipient rolls by itself."""

    max_messages: int = 1024
    max_seconds: float = 600.0

    def __post_init__(self) -> None:
        if self.max_messages < 1 or self.max_seconds <= 0:
            raise ValueError("an epoch needs max_messages >= 1 and max_seconds > 0")


def encapsulation_info(sender: str, recipient: str, key_id: str, epoch_id: bytes) -> bytes:
    """HPKE info for an epoch's KEK: binds both partners, the key id and the epoch id."""
    return b"%s%s\x00%s\x00%s\x00%s" % (
        _ENCAP_INFO,
        sender.encode(),
        recipient.encode(),
        key_id.encode(),
        epoch_id,
    )


def wrap_aad(sender: str, recipient: str, epoch_id: bytes, core: bytes) -> bytes:
    """Associated data of one wrapped data key: both partners, the epoch and the header core."""
    return pae(
        _WRAP_TYPE, b"%s\x00%s\x00%s%s" % (sender.encode(), recipient.encode(), epoch_id, core)
    )


class _Epoch:
    __slots__ = (
        "acknowledged",
        "encapsulation",
        "epoch_id",
        "kek",
        "key_id",
        "messages",
        "opened_at",
        "public_raw",
    )

    def __init__(self, sender: str, recipient: Recipient, now: float) -> None:
        self.epoch_id = os.urandom(EPOCH_ID_LEN)
        kek_bytes = os.urandom(KEK_LEN)
        self.kek = AESGCM(kek_bytes)
        self.key_id = recipient.key_id
        self.public_raw = recipient.public_key.raw
        self.encapsulation = SUITE.encrypt(
            kek_bytes,
            recipient.public_key.to_hpke(),
            info=encapsulation_info(sender, recipient.partner, recipient.key_id, self.epoch_id),
        )
        self.opened_at = now
        self.messages = 0
        self.acknowledged = False


class SenderEpochs:
    """A sender's open epochs, one per recipient. Not thread-safe; one per signing sender."""

    def __init__(
        self,
        sender: str,
        policy: EpochPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sender = sender
        self._policy = policy or EpochPolicy()
        self._clock = clock
        self._epochs: dict[str, _Epoch] = {}
        self.encapsulations = 0  # epochs opened so far (each one HPKE encapsulation)

    def wrap(self, recipient: Recipient, core: bytes, data_key: bytes) -> envelope_pb2.EpochKey:
        """The recipient's copy of ``data_key`` for the message whose header core is ``core``.

        Opens a new epoch first when the current one must roll. Raises ValueError for a
        data key that is not 32 bytes and HpkeKeyError for a malformed public key.
        """
        if len(data_key) != _DATA_KEY_LEN:
            raise ValueError("data key must be 32 bytes")
        epoch = self._current(recipient)
        epoch.messages += 1
        nonce = os.urandom(_NONCE_LEN)
        aad = wrap_aad(self._sender, recipient.partner, epoch.epoch_id, core)
        return envelope_pb2.EpochKey(
            recipient=recipient.partner,
            key_id=epoch.key_id,
            epoch_id=epoch.epoch_id,
            encapsulation=b"" if epoch.acknowledged else epoch.encapsulation,
            wrapped=nonce + epoch.kek.encrypt(nonce, data_key, aad),
            sequence=recipient.sequence,
        )

    def _current(self, recipient: Recipient) -> _Epoch:
        now = self._clock()
        epoch = self._epochs.get(recipient.partner)
        if (
            epoch is None
            or epoch.messages >= self._policy.max_messages
            or now - epoch.opened_at >= self._policy.max_seconds
            or epoch.key_id != recipient.key_id
            or epoch.public_raw != recipient.public_key.raw
        ):
            epoch = _Epoch(self._sender, recipient, now)
            self._epochs[recipient.partner] = epoch
            self.encapsulations += 1
        return epoch

    def roll(self, recipient: str | None = None) -> None:
        """Close the epoch of one recipient, or of all; the next message opens a new one.

        Call on every policy, key-bundle or membership change.
        """
        if recipient is None:
            self._epochs.clear()
        else:
            self._epochs.pop(recipient, None)

    def acknowledge(self, recipient: str, epoch_id: bytes) -> None:
        """The recipient holds this epoch's KEK: stop carrying its encapsulation.

        An acknowledgement for an epoch that is no longer current is ignored.
        """
        epoch = self._epochs.get(recipient)
        if epoch is not None and epoch.epoch_id == epoch_id:
            epoch.acknowledged = True

    def current_epoch(self, recipient: str) -> bytes | None:
        """The id of the recipient's open epoch, or None."""
        epoch = self._epochs.get(recipient)
        return None if epoch is None else epoch.epoch_id


class RecipientEpochs:
    """One recipient's cache of epoch KEKs, keyed by (sender, key id, epoch id). Not thread-safe."""

    def __init__(
        self,
        recipient: str,
        keys: Mapping[str, HpkePrivateKey],
        max_epochs: int = 4096,
    ) -> None:
        self._recipient = recipient
        self._keys = keys
        self._max = max_epochs
        self._keks: OrderedDict[tuple[str, str, bytes], AESGCM] = OrderedDict()
        self.decapsulations = 0  # HPKE decapsulations performed so far

    @property
    def recipient(self) -> str:
        return self._recipient

    def unwrap(self, sender: str, core: bytes, epoch_key: envelope_pb2.EpochKey) -> bytes:
        """The data key in ``epoch_key``, for the message whose header core is ``core``.

        Raises EpochKeyError: the entry is for another recipient or under a key id not
        held (``not_held``), the epoch is unknown and carries no encapsulation, the
        encapsulation does not open, or the data key does not unwrap.
        """
        if epoch_key.recipient != self._recipient:
            raise EpochKeyError("the epoch key is for another recipient", not_held=True)
        slot = (sender, epoch_key.key_id, bytes(epoch_key.epoch_id))
        kek = self._keks.get(slot)
        fresh = kek is None
        if kek is None:
            kek = self._decapsulate(sender, epoch_key)
        wrapped = epoch_key.wrapped
        if len(wrapped) != WRAPPED_LEN:
            raise EpochKeyError("wrapped data key has the wrong length")
        aad = wrap_aad(sender, self._recipient, slot[2], core)
        try:
            data_key = kek.decrypt(wrapped[:_NONCE_LEN], wrapped[_NONCE_LEN:], aad)
        except InvalidTag:
            raise EpochKeyError("wrapped data key does not unwrap") from None
        if fresh:
            self._keks[slot] = kek
            while len(self._keks) > self._max:
                self._keks.popitem(last=False)
        else:
            self._keks.move_to_end(slot)
        return data_key

    def _decapsulate(self, sender: str, epoch_key: envelope_pb2.EpochKey) -> AESGCM:
        private_key = self._keys.get(epoch_key.key_id)
        if private_key is None:
            raise EpochKeyError("the epoch is under a key id that is not held", not_held=True)
        if not epoch_key.encapsulation:
            raise EpochKeyError("epoch not known here and its encapsulation is not carried")
        if len(epoch_key.epoch_id) != EPOCH_ID_LEN:
            raise EpochKeyError("epoch id has the wrong length")
        self.decapsulations += 1
        try:
            kek = SUITE.decrypt(
                epoch_key.encapsulation,
                private_key.to_hpke(),
                info=encapsulation_info(
                    sender, self._recipient, epoch_key.key_id, epoch_key.epoch_id
                ),
            )
        except (InvalidTag, ValueError):
            raise EpochKeyError("epoch key encapsulation does not open") from None
        if len(kek) != KEK_LEN:
            raise EpochKeyError("epoch key has the wrong length")
        return AESGCM(kek)

    def forget(self, sender: str | None = None) -> None:
        """Drop the cached KEKs of one sender, or all."""
        for slot in [s for s in self._keks if sender is None or s[0] == sender]:
            del self._keks[slot]

    def holds(self, sender: str, key_id: str, epoch_id: bytes) -> bool:
        """Whether this epoch's KEK is cached."""
        return (sender, key_id, epoch_id) in self._keks
