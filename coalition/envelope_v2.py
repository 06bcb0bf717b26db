"""Envelope v2: one hybrid signature per batch, one HPKE encapsulation per epoch.

Beside ``coalition.envelope`` (v1), which stays as it is: a v1 envelope sets
``Envelope.header`` and ``signature``; a v2 envelope leaves both empty and sets
``header_v2`` and ``batch``. ``is_v2`` tells them apart.

Recipe, for a batch of messages sealed together by one sender:

- each message gets a fresh 32-byte AES-256-GCM data key; the 12-byte random nonce is
  prefixed to the ciphertext; the associated data is ``HeaderV2.core``, the serialized
  ``Header`` (label, topic, sender, sequence, ids) without keys or digest, exactly as
  sent;
- the data key is wrapped for each recipient under that recipient's epoch key
  (``coalition.epoch``), bound to the same header core;
- ``HeaderV2`` = core, the epoch keys and the SHA-256 of the ciphertext; its exact bytes,
  prefixed with a 32-byte random salt, are one leaf of an RFC 9162 Merkle tree
  (``coalition.merkle``) over the batch;
- the sender signs one ``BatchRoot`` (sender, signing key id, batch id, tree size, root,
  time) with its hybrid key (``coalition.hybrid``: Ed25519 and ML-DSA-65, both
  required) over ``pae(BATCH_ROOT_TYPE, root bytes)``;
- each envelope carries its salt, leaf index, inclusion path, the root bytes and the
  root signature, so it verifies on its own: header + path + root signature.

``verify()`` (the broker's check) and ``open()`` never re-serialize anything they check.
They check bounds, the inclusion path, the root signature (once per root when given a
``RootCache``) and the payload digest before anything touches the content. Every
failure raises ``InvalidEnvelopeV2`` whose ``reason`` names the failed step.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError

from coalition import merkle
from coalition.envelope import MAX_RECIPIENTS, Recipient, recipients_bounds_problem
from coalition.epoch import (
    ENCAPSULATION_LEN,
    EPOCH_ID_LEN,
    WRAPPED_LEN,
    EpochKeyError,
    RecipientEpochs,
    SenderEpochs,
)
from coalition.hybrid import HybridPublicKey, HybridSignatureError, HybridSigningKey
from coalition.labels import valid_precedence
from coalition.pae import BATCH_ROOT_TYPE
from coalition.v1 import envelope_pb2, label_pb2

__all__ = [
    "BATCH_ID_LEN",
    "MAX_BATCH",
    "Failure",
    "InvalidEnvelopeV2",
    "Message",
    "OpenedV2",
    "RootCache",
    "Verified",
    "is_v2",
    "open",
    "parse_v2",
    "seal_batch",
    "verify",
]

MAX_BATCH = merkle.MAX_TREE_SIZE
BATCH_ID_LEN = 16
_NONCE_LEN = 12
_TAG_LEN = 16
_DIGEST_LEN = 32

HybridSigner = Callable[[str, str], HybridPublicKey]


class Failure(enum.StrEnum):
    """What failed when a v2 envelope was refused (v1's names where the step is the same)."""

    MALFORMED = "malformed"
    UNKNOWN_SENDER = "unknown_sender"
    BAD_PATH = "bad_path"
    BAD_SIGNATURE = "bad_signature"
    DIGEST_MISMATCH = "digest_mismatch"
    NOT_A_RECIPIENT = "not_a_recipient"
    UNWRAP_FAILED = "unwrap_failed"
    DECRYPT_FAILED = "decrypt_failed"


class InvalidEnvelopeV2(Exception):
    """The v2 envelope was refused; ``reason`` says which step failed.

    The message names the step and header metadata only, never plaintext or keys.
    """

    def __init__(self, reason: Failure, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Message:
    """One message of a batch: content, routing metadata and its recipients."""

    plaintext: bytes
    topic: str
    label: label_pb2.Label
    precedence: int
    content_type: str
    recipients: Sequence[Recipient]
    sequence: int
    created_ms: int
    message_id: str | None = None


@dataclass(frozen=True)
class Verified:
    """A v2 envelope whose path, root signature and digest checked out."""

    header: envelope_pb2.Header  # the core: everything but keys and digest
    header_v2: envelope_pb2.HeaderV2
    root: envelope_pb2.BatchRoot


@dataclass(frozen=True)
class OpenedV2:
    """A verified, decrypted v2 envelope."""

    header: envelope_pb2.Header
    plaintext: bytes
    sequence: int  # the per-(sender, recipient) sequence for this recipient
    epoch_id: bytes
    recipients: tuple[str, ...] = ()  # every partner an epoch key was wrapped for


class RootCache:
    """Batch roots whose hybrid signature verified, so each is checked once.

    Keyed by (signing public key, root bytes); a hit needs the same signature bytes
    too, so an envelope is accepted only with the signature that verified. Bounded:
    the least recently used root is dropped first. Not thread-safe: one per thread, or
    guarded by the caller.
    """

    def __init__(self, max_roots: int = 4096) -> None:
        self._max = max_roots
        self._roots: OrderedDict[tuple[bytes, bytes], tuple[bytes, bytes]] = OrderedDict()
        self.verifications = 0  # hybrid signature checks performed so far

    def check(
        self, public_key: HybridPublicKey, root: bytes, signature: envelope_pb2.HybridSignature
    ) -> None:
        """Verify (or find verified) ``signature`` over ``root``. Raises HybridSignatureError."""
        slot = (public_key.raw, root)
        sigs = (signature.ed25519, signature.ml_dsa_65)
        seen = self._roots.get(slot)
        if seen is not None and seen == sigs:
            self._roots.move_to_end(slot)
            return
        self.verifications += 1
        public_key.verify(signature, BATCH_ROOT_TYPE, root)
        self._roots[slot] = sigs
        while len(self._roots) > self._max:
            self._roots.popitem(last=False)


def is_v2(envelope: envelope_pb2.Envelope) -> bool:
    """Whether the envelope is v2 (header_v2 and batch set); v1 otherwise."""
    return envelope.HasField("batch") or bool(envelope.header_v2)


def seal_batch(
    messages: Sequence[Message],
    *,
    sender: str,
    signing_key: HybridSigningKey,
    signing_key_id: str,
    epochs: SenderEpochs,
    created_ms: int,
) -> list[envelope_pb2.Envelope]:
    """Encrypt each message, wrap its data key per recipient epoch, sign one root.

    Returns one envelope per message, in order. Raises ValueError on bad input (an empty
    or oversized batch, or any message that v1's seal would refuse).
    """
    if not 1 <= len(messages) <= MAX_BATCH:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH} messages, not {len(messages)}")
    if not signing_key_id:
        raise ValueError("signing_key_id must not be empty")
    headers: list[bytes] = []
    ciphertexts: list[bytes] = []
    for m in messages:
        core = _core(m, sender, signing_key_id)
        data_key = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(_NONCE_LEN)
        ciphertext = nonce + AESGCM(data_key).encrypt(nonce, m.plaintext, core)
        header_v2 = envelope_pb2.HeaderV2(
            core=core,
            epoch_keys=[epochs.wrap(r, core, data_key) for r in m.recipients],
            payload_digest=hashlib.sha256(ciphertext).digest(),
        )
        headers.append(header_v2.SerializeToString())
        ciphertexts.append(ciphertext)
    salts = [os.urandom(merkle.SALT_LEN) for _ in messages]
    root_hash, paths = merkle.inclusion_paths(
        [merkle.leaf_hash(s, h) for s, h in zip(salts, headers, strict=True)]
    )
    root = envelope_pb2.BatchRoot(
        sender=sender,
        signing_key_id=signing_key_id,
        batch_id=os.urandom(BATCH_ID_LEN),
        tree_size=len(messages),
        root=root_hash,
        created_ms=created_ms,
    ).SerializeToString()
    signature = signing_key.sign(BATCH_ROOT_TYPE, root)
    return [
        envelope_pb2.Envelope(
            header_v2=headers[i],
            ciphertext=ciphertexts[i],
            batch=envelope_pb2.BatchProof(
                leaf_salt=salts[i], leaf_index=i, path=paths[i], root=root, root_signature=signature
            ),
        )
        for i in range(len(messages))
    ]


def _core(m: Message, sender: str, signing_key_id: str) -> bytes:
    """The serialized header core, after every check parse_v2 will make."""
    if not m.recipients:
        raise ValueError("a message needs at least one recipient")
    partners = [r.partner for r in m.recipients]
    if len(set(partners)) != len(partners):
        raise ValueError("duplicate recipient")
    if not valid_precedence(m.precedence):
        raise ValueError("precedence must be ROUTINE, PRIORITY, IMMEDIATE or FLASH")
    header = envelope_pb2.Header(
        message_id=m.message_id if m.message_id is not None else os.urandom(16).hex(),
        sender=sender,
        sequence=m.sequence,
        topic=m.topic,
        precedence=label_pb2.Precedence.ValueType(m.precedence),
        created_ms=m.created_ms,
        content_type=m.content_type,
        signing_key_id=signing_key_id,
    )
    header.label.CopyFrom(m.label)
    problem = _missing(header) or _bounds(
        header, [(r.partner, r.key_id, r.sequence) for r in m.recipients]
    )
    if problem:
        raise ValueError(problem)
    return header.SerializeToString()


def _missing(header: envelope_pb2.Header) -> str:
    missing = [
        name
        for name, empty in (
            ("message_id", not header.message_id),
            ("sender", not header.sender),
            ("topic", not header.topic),
            ("sequence", header.sequence == 0),
            ("signing_key_id", not header.signing_key_id),
        )
        if empty
    ]
    return f"header lacks {', '.join(missing)}" if missing else ""


def _bounds(header: envelope_pb2.Header, entries: Sequence[tuple[str, str, int]]) -> str:
    """v1's header bounds, with the epoch keys standing where v1 has wrapped keys (the
    header core holds none: _core builds it so, parse_v2 refuses one that does)."""
    if len(entries) > MAX_RECIPIENTS:
        return f"header carries {len(entries)} epoch keys; the limit is {MAX_RECIPIENTS}"
    problem = recipients_bounds_problem(header, entries)
    return problem.replace("wrapped_keys[", "epoch_keys[") if problem else ""


def parse_v2(
    envelope: envelope_pb2.Envelope,
) -> tuple[envelope_pb2.Header, envelope_pb2.HeaderV2, envelope_pb2.BatchRoot]:
    """Header core, header and batch root, UNVERIFIED. Raises InvalidEnvelopeV2(MALFORMED)."""
    if not is_v2(envelope) or envelope.header or envelope.signature:
        raise InvalidEnvelopeV2(Failure.MALFORMED, "not a v2 envelope")
    proof = envelope.batch
    try:
        header_v2 = envelope_pb2.HeaderV2.FromString(envelope.header_v2)
        core = envelope_pb2.Header.FromString(header_v2.core)
        root = envelope_pb2.BatchRoot.FromString(proof.root)
    except DecodeError:
        raise InvalidEnvelopeV2(Failure.MALFORMED, "header or batch root does not parse") from None
    entries = [(k.recipient, k.key_id, k.sequence) for k in header_v2.epoch_keys]
    problem = (
        _missing(core)
        or (
            "header core holds keys or a digest" if core.wrapped_keys or core.payload_digest else ""
        )
        or _bounds(core, entries)
        or _epoch_keys_problem(header_v2, entries)
        or _proof_problem(proof, root, core)
    )
    if problem:
        raise InvalidEnvelopeV2(Failure.MALFORMED, problem)
    return core, header_v2, root


def _epoch_keys_problem(
    header_v2: envelope_pb2.HeaderV2, entries: Sequence[tuple[str, str, int]]
) -> str:
    if len(header_v2.payload_digest) != _DIGEST_LEN:
        return "payload digest is not 32 bytes"
    if len({r for r, _, _ in entries}) == len(entries) and all(
        len(k.epoch_id) == EPOCH_ID_LEN
        and len(k.encapsulation) in (0, ENCAPSULATION_LEN)
        and len(k.wrapped) == WRAPPED_LEN
        for k in header_v2.epoch_keys
    ):
        return ""  # every key well formed; below, which one is not, to name it
    seen: set[str] = set()
    for i, k in enumerate(header_v2.epoch_keys):
        if k.recipient in seen:
            return "header carries two epoch keys for one recipient"
        seen.add(k.recipient)
        if len(k.epoch_id) != EPOCH_ID_LEN:
            return f"epoch_keys[{i}].epoch_id is not {EPOCH_ID_LEN} bytes"
        if k.encapsulation and len(k.encapsulation) != ENCAPSULATION_LEN:
            return f"epoch_keys[{i}].encapsulation is not {ENCAPSULATION_LEN} bytes"
        if len(k.wrapped) != WRAPPED_LEN:
            return f"epoch_keys[{i}].wrapped is not {WRAPPED_LEN} bytes"
    return ""


def _proof_problem(
    proof: envelope_pb2.BatchProof, root: envelope_pb2.BatchRoot, core: envelope_pb2.Header
) -> str:
    if root.sender != core.sender or root.signing_key_id != core.signing_key_id:
        return "batch root names another sender or signing key than the header"
    if not 1 <= root.tree_size <= MAX_BATCH:
        return f"batch root tree size {root.tree_size} is outside 1 to {MAX_BATCH}"
    if proof.leaf_index >= root.tree_size:
        return f"leaf index {proof.leaf_index} is outside the batch of {root.tree_size}"
    if len(root.root) != merkle.HASH_LEN or len(root.batch_id) != BATCH_ID_LEN:
        return "batch root hash or batch id has the wrong length"
    if len(proof.leaf_salt) != merkle.SALT_LEN:
        return f"leaf salt is not {merkle.SALT_LEN} bytes"
    if len(proof.path) > root.tree_size.bit_length():
        return "inclusion path is longer than the tree is deep"
    return ""


def verify(
    envelope: envelope_pb2.Envelope,
    signer: HybridSigner,
    roots: RootCache | None = None,
) -> Verified:
    """Check bounds, inclusion path, root signature and payload digest, without decrypting.

    ``signer(sender, signing_key_id)`` returns the sender's certified hybrid key or
    raises KeyError. With ``roots`` each root's signature is checked once. Raises
    InvalidEnvelopeV2: MALFORMED, UNKNOWN_SENDER, BAD_PATH, BAD_SIGNATURE, DIGEST_MISMATCH.
    """
    core, header_v2, root = parse_v2(envelope)
    try:
        public_key = signer(core.sender, core.signing_key_id)
    except KeyError:
        raise InvalidEnvelopeV2(
            Failure.UNKNOWN_SENDER,
            f"no certified signing key for sender {_show(core.sender)} "
            f"key id {_show(core.signing_key_id)}",
        ) from None
    proof = envelope.batch
    leaf = merkle.leaf_hash(proof.leaf_salt, envelope.header_v2)
    if not merkle.verify_inclusion(proof.leaf_index, root.tree_size, leaf, proof.path, root.root):
        raise InvalidEnvelopeV2(
            Failure.BAD_PATH, "header is not in the batch root at its index (inclusion path)"
        )
    try:
        if roots is None:
            public_key.verify(proof.root_signature, BATCH_ROOT_TYPE, proof.root)
        else:
            roots.check(public_key, proof.root, proof.root_signature)
    except HybridSignatureError as exc:
        raise InvalidEnvelopeV2(
            Failure.BAD_SIGNATURE,
            f"batch root {exc.component} signature does not verify for sender {_show(core.sender)}",
        ) from None
    if not hmac.compare_digest(
        hashlib.sha256(envelope.ciphertext).digest(), header_v2.payload_digest
    ):
        raise InvalidEnvelopeV2(Failure.DIGEST_MISMATCH, "ciphertext does not match payload digest")
    return Verified(header=core, header_v2=header_v2, root=root)


def open(  # the contract's name; shadows the builtin in this module only
    envelope: envelope_pb2.Envelope,
    *,
    epochs: RecipientEpochs,
    signer: HybridSigner,
    roots: RootCache | None = None,
) -> OpenedV2:
    """Verify, recover the data key for ``epochs.recipient`` and decrypt.

    Raises InvalidEnvelopeV2 (verify's reasons, then NOT_A_RECIPIENT, UNWRAP_FAILED,
    DECRYPT_FAILED).
    """
    verified = verify(envelope, signer, roots)
    recipient = epochs.recipient
    entry = next((k for k in verified.header_v2.epoch_keys if k.recipient == recipient), None)
    if entry is None:
        raise InvalidEnvelopeV2(
            Failure.NOT_A_RECIPIENT, f"no key is wrapped for {_show(recipient)}"
        )
    core = verified.header_v2.core
    try:
        data_key = epochs.unwrap(verified.header.sender, core, entry)
    except EpochKeyError as exc:
        reason = Failure.NOT_A_RECIPIENT if exc.not_held else Failure.UNWRAP_FAILED
        raise InvalidEnvelopeV2(reason, f"{exc} (for {_show(recipient)})") from None
    ct = envelope.ciphertext
    if len(ct) < _NONCE_LEN + _TAG_LEN:
        raise InvalidEnvelopeV2(Failure.DECRYPT_FAILED, "ciphertext is too short")
    try:
        plaintext = AESGCM(data_key).decrypt(ct[:_NONCE_LEN], ct[_NONCE_LEN:], core)
    except InvalidTag:
        raise InvalidEnvelopeV2(Failure.DECRYPT_FAILED, "payload does not decrypt") from None
    return OpenedV2(
        header=verified.header,
        plaintext=plaintext,
        sequence=entry.sequence,
        epoch_id=bytes(entry.epoch_id),
        recipients=tuple(k.recipient for k in verified.header_v2.epoch_keys),
    )


def _show(value: str) -> str:
    """Header metadata for an error message: quoted, escaped and bounded."""
    return repr(value[:64])
