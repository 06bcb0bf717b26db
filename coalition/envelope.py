"""Signed, end-to-end encrypted envelopes: one fixed recipe, no algorithm knobs.

Recipe (after STANAG 4778, with DSSE-style signing of exact bytes):

- a fresh 32-byte AES-256-GCM data key per message encrypts the plaintext; the
  12-byte random nonce is prefixed to the ciphertext;
- the data key is wrapped for each recipient with HPKE (``coalition.hpke.SUITE``)
  under ``info`` binding message id, recipient and key id;
- the header is serialized once; the AAD is those exact bytes, and the header sent
  is those bytes followed by one more field, ``payload_digest`` = SHA-256 of the
  ciphertext field (it cannot be inside its own AAD). The bytes sent are signed:
  Ed25519 over ``pae(HEADER_TYPE, header)``.

``open()`` and ``verify()`` never re-serialize the header: they parse it for its
fields but verify the signature over the bytes received, and the signature is
checked before anything touches the content. Every failure raises
``InvalidEnvelope`` whose ``reason`` names the failed step.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError

from coalition import ed25519
from coalition.hpke import SUITE, HpkePrivateKey, HpkePublicKey
from coalition.labels import label_bounds_problem, valid_precedence
from coalition.pae import HEADER_TYPE, pae
from coalition.v1 import envelope_pb2, label_pb2

__all__ = [
    "INTEL_SUMMARY",
    "MAX_CONTENT_TYPE_CHARS",
    "MAX_KEY_ID_CHARS",
    "MAX_MESSAGE_ID_CHARS",
    "MAX_RECIPIENTS",
    "MAX_SEQUENCE",
    "MAX_TOPIC_CHARS",
    "MAX_WRAPPED_KEY_BYTES",
    "Failure",
    "InvalidEnvelope",
    "Opened",
    "Recipient",
    "header_bounds_problem",
    "open",
    "parse_header",
    "recipients_bounds_problem",
    "seal",
    "verify",
]

INTEL_SUMMARY = "application/vnd.coalition.intel-summary.v1+proto"

_WRAP_INFO_PREFIX = b"coalition/v1 wrap\x00"
_NONCE_LEN = 12
_DATA_KEY_LEN = 32
_TAG_LEN = 16
_DIGEST_LEN = 32
# Header.payload_digest (field 9, length-delimited) holding 32 bytes.
_DIGEST_FIELD_PREFIX = bytes([(9 << 3) | 2, _DIGEST_LEN])

# Bounds on every header field (docs/labels.md, "Size limits"; the label's own are in
# coalition.labels). They are part of the wire contract, not a broker setting: seal()
# refuses to exceed them and parse_header() (so the broker's verify() and a recipient's
# open()) refuses an envelope that does, before any signature is checked. Each is
# generous for real use and small enough that no field can make the broker or a node
# store, index or compare a lot of bytes.
MAX_MESSAGE_ID_CHARS = 64
MAX_TOPIC_CHARS = 255  # as coalition.topics allows
MAX_CONTENT_TYPE_CHARS = 128
MAX_KEY_ID_CHARS = 64
MAX_RECIPIENTS = 256
# One HPKE wrap of a 32-byte key under the suite is 1,168 bytes (1,120 encapsulation,
# 32 key, 16 tag); room is left, nothing more.
MAX_WRAPPED_KEY_BYTES = 2048
# Sequence numbers and times are stored as SQLite INTEGER (signed 64 bits).
MAX_SEQUENCE = 2**63 - 1
_ID = re.compile(r"[A-Za-z0-9._:-]+")
_PARTNER = re.compile(r"[A-Z][A-Z0-9-]{1,23}")
_CONTENT_TYPE = re.compile(r"[\x21-\x7e]+")


class Failure(enum.StrEnum):
    """What failed when an envelope was refused."""

    MALFORMED = "malformed"
    UNKNOWN_SENDER = "unknown_sender"
    BAD_SIGNATURE = "bad_signature"
    DIGEST_MISMATCH = "digest_mismatch"
    NOT_A_RECIPIENT = "not_a_recipient"
    UNWRAP_FAILED = "unwrap_failed"
    DECRYPT_FAILED = "decrypt_failed"


class InvalidEnvelope(Exception):
    """The envelope was refused; ``reason`` says which step failed.

    The message names the step and header metadata only, never plaintext or keys.
    """

    def __init__(self, reason: Failure, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Recipient:
    """A partner the data key is wrapped for, with its current HPKE public key."""

    partner: str
    key_id: str
    public_key: HpkePublicKey
    # Per (sender, recipient) sequence for the recipient's gap detection; 0 = untracked.
    sequence: int = 0


@dataclass(frozen=True)
class Opened:
    """A verified, decrypted envelope."""

    header: envelope_pb2.Header
    plaintext: bytes


def seal(
    *,
    plaintext: bytes,
    sender: str,
    signing_key: Ed25519PrivateKey,
    signing_key_id: str,
    sequence: int,
    topic: str,
    label: label_pb2.Label,
    precedence: int,
    content_type: str,
    recipients: Sequence[Recipient],
    created_ms: int,
    message_id: str | None = None,
) -> envelope_pb2.Envelope:
    """Encrypt, wrap the data key for each recipient, and sign. Raises ValueError on bad input."""
    if message_id is None:
        message_id = os.urandom(16).hex()
    _check_seal_inputs(sender, signing_key_id, sequence, topic, message_id, recipients)
    if not valid_precedence(precedence):
        raise ValueError("precedence must be ROUTINE, PRIORITY, IMMEDIATE or FLASH")

    data_key = AESGCM.generate_key(bit_length=256)
    header = envelope_pb2.Header(
        message_id=message_id,
        sender=sender,
        sequence=sequence,
        topic=topic,
        precedence=label_pb2.Precedence.ValueType(precedence),
        created_ms=created_ms,
        content_type=content_type,
        signing_key_id=signing_key_id,
    )
    header.label.CopyFrom(label)
    # Whatever seal makes, parse_header (the broker's and every recipient's) accepts.
    problem = _scalar_problem(header) or label_bounds_problem(header.label)
    if problem:
        raise ValueError(problem)
    for r in recipients:
        wrapped = SUITE.encrypt(
            data_key, r.public_key.to_hpke(), info=_wrap_info(message_id, r.partner, r.key_id)
        )
        header.wrapped_keys.add(
            recipient=r.partner, key_id=r.key_id, wrapped=wrapped, sequence=r.sequence
        )

    # The digest names the ciphertext and the ciphertext's AAD is the header, so the
    # header cannot hold the digest when it is used as AAD. The header is therefore
    # serialized once without the digest (those exact bytes are the AAD) and the
    # digest field is appended as its last field: protobuf parses a concatenation
    # as a merge, and the receiver takes the AAD as the received bytes before it.
    prefix = header.SerializeToString()
    nonce = os.urandom(_NONCE_LEN)
    ciphertext = nonce + AESGCM(data_key).encrypt(nonce, plaintext, prefix)
    header_bytes = prefix + _digest_field(hashlib.sha256(ciphertext).digest())
    signature = signing_key.sign(pae(HEADER_TYPE, header_bytes))
    return envelope_pb2.Envelope(header=header_bytes, ciphertext=ciphertext, signature=signature)


def parse_header(envelope: envelope_pb2.Envelope) -> envelope_pb2.Header:
    """The header's fields, UNVERIFIED. Raises InvalidEnvelope(MALFORMED)."""
    try:
        header = envelope_pb2.Header.FromString(envelope.header)
    except DecodeError:
        raise InvalidEnvelope(Failure.MALFORMED, "header does not parse") from None
    missing = [
        name
        for name, empty in (
            ("message_id", not header.message_id),
            ("sender", not header.sender),
            ("topic", not header.topic),
            ("sequence", header.sequence == 0),
        )
        if empty
    ]
    if missing:
        raise InvalidEnvelope(Failure.MALFORMED, f"header lacks {', '.join(missing)}")
    problem = header_bounds_problem(header)
    if problem:
        raise InvalidEnvelope(Failure.MALFORMED, problem)
    if len(header.payload_digest) != _DIGEST_LEN or not envelope.header.endswith(
        _digest_field(header.payload_digest)
    ):
        raise InvalidEnvelope(Failure.MALFORMED, "payload digest is not the header's last field")
    seen: set[str] = set()
    for wk in header.wrapped_keys:
        if wk.recipient in seen:
            raise InvalidEnvelope(Failure.MALFORMED, "header wraps a key twice for one recipient")
        seen.add(wk.recipient)
    return header


def header_bounds_problem(header: envelope_pb2.Header) -> str | None:
    """Why a header is over a bound (naming the field and its limit), or None.

    Lengths, counts, character sets and integer ranges only: it reads the parsed fields
    and nothing else, so it is cheap enough to run before the signature check.
    """
    problem = _scalar_problem(header) or label_bounds_problem(header.label)
    if problem:
        return problem
    if len(header.wrapped_keys) > MAX_RECIPIENTS:
        return (
            f"header wraps {len(header.wrapped_keys)} keys; "
            f"the limit is {MAX_RECIPIENTS} recipients"
        )
    for i, wk in enumerate(header.wrapped_keys):
        problem = _recipient_problem(i, wk.recipient, wk.key_id) or _wrapped_problem(i, wk)
        if problem:
            return problem
    return None


# (partner, key id) pairs found well formed (the same recipients come with every message
# of a sender): checked once; emptied when full.
_VALID_RECIPIENTS: set[tuple[str, str]] = set()
_VALID_RECIPIENTS_MAX = 1024


def recipients_bounds_problem(
    header: envelope_pb2.Header, recipients: Sequence[tuple[str, str, int]]
) -> str | None:
    """header_bounds_problem for a header without wrapped keys whose recipients
    (partner, key id, sequence) travel beside it, as envelope v2's epoch keys do.

    The same checks and the same messages (recipients named ``wrapped_keys[i]``) as
    header_bounds_problem on a copy of header carrying them as wrapped keys without key
    bytes, without building that copy: a recipient is checked field by field, and the
    message is only composed for one that fails.
    """
    problem = _scalar_problem(header) or label_bounds_problem(header.label)
    if problem:
        return problem
    if len(recipients) > MAX_RECIPIENTS:
        return f"header wraps {len(recipients)} keys; the limit is {MAX_RECIPIENTS} recipients"
    for i, (partner, key_id, sequence) in enumerate(recipients):
        if sequence <= MAX_SEQUENCE and (partner, key_id) in _VALID_RECIPIENTS:
            continue
        if (
            len(partner) <= 24
            and _PARTNER.fullmatch(partner)
            and len(key_id) <= MAX_KEY_ID_CHARS
            and _ID.fullmatch(key_id)
            and sequence <= MAX_SEQUENCE
        ):
            if len(_VALID_RECIPIENTS) >= _VALID_RECIPIENTS_MAX:
                _VALID_RECIPIENTS.clear()
            _VALID_RECIPIENTS.add((partner, key_id))
            continue
        return _recipient_problem(i, partner, key_id) or (
            f"wrapped_keys[{i}].sequence {sequence} is above the limit {MAX_SEQUENCE}"
        )
    return None


def _text_problem(name: str, value: str, limit: int, pattern: re.Pattern[str], what: str) -> str:
    if len(value) > limit:
        return f"{name} is {len(value)} characters; the limit is {limit}"
    if not pattern.fullmatch(value):
        return f"{name} {_show(value)} is not {what}"
    return ""


def _scalar_problem(header: envelope_pb2.Header) -> str:
    ids = "letters, digits, '.', '_', ':' or '-'"
    return (
        _text_problem("message_id", header.message_id, MAX_MESSAGE_ID_CHARS, _ID, ids)
        or _text_problem("sender", header.sender, 24, _PARTNER, "a partner code")
        or (
            f"topic is {len(header.topic)} characters; the limit is {MAX_TOPIC_CHARS}"
            if len(header.topic) > MAX_TOPIC_CHARS
            else ""
        )
        or (
            _text_problem(
                "content_type",
                header.content_type,
                MAX_CONTENT_TYPE_CHARS,
                _CONTENT_TYPE,
                "printable ASCII",
            )
            if header.content_type
            else ""
        )
        or (
            _text_problem("signing_key_id", header.signing_key_id, MAX_KEY_ID_CHARS, _ID, ids)
            if header.signing_key_id
            else ""
        )
        or (
            f"sequence {header.sequence} is above the limit {MAX_SEQUENCE}"
            if header.sequence > MAX_SEQUENCE
            else ""
        )
        or (f"created_ms {header.created_ms} is negative" if header.created_ms < 0 else "")
    )


def _recipient_problem(i: int, partner: str, key_id: str) -> str:
    ids = "letters, digits, '.', '_', ':' or '-'"
    return _text_problem(
        f"wrapped_keys[{i}].recipient", partner, 24, _PARTNER, "a partner code"
    ) or _text_problem(f"wrapped_keys[{i}].key_id", key_id, MAX_KEY_ID_CHARS, _ID, ids)


def _wrapped_problem(i: int, wk: envelope_pb2.WrappedKey) -> str:
    if len(wk.wrapped) > MAX_WRAPPED_KEY_BYTES:
        return (
            f"wrapped_keys[{i}].wrapped is {len(wk.wrapped)} bytes; "
            f"the limit is {MAX_WRAPPED_KEY_BYTES}"
        )
    if wk.sequence > MAX_SEQUENCE:
        return f"wrapped_keys[{i}].sequence {wk.sequence} is above the limit {MAX_SEQUENCE}"
    return ""


def verify(
    envelope: envelope_pb2.Envelope, signer: Callable[[str, str], Ed25519PublicKey]
) -> envelope_pb2.Header:
    """Check signature and payload digest without decrypting (the broker's check).

    Raises InvalidEnvelope: MALFORMED, UNKNOWN_SENDER, BAD_SIGNATURE, DIGEST_MISMATCH.
    """
    header = parse_header(envelope)
    try:
        public_key = signer(header.sender, header.signing_key_id)
    except KeyError:
        raise InvalidEnvelope(
            Failure.UNKNOWN_SENDER,
            f"no certified signing key for sender {_show(header.sender)} "
            f"key id {_show(header.signing_key_id)}",
        ) from None
    try:
        ed25519.verify(public_key, envelope.signature, pae(HEADER_TYPE, envelope.header))
    except InvalidSignature:
        raise InvalidEnvelope(
            Failure.BAD_SIGNATURE,
            f"header signature does not verify for sender {_show(header.sender)}",
        ) from None
    digest = hashlib.sha256(envelope.ciphertext).digest()
    if not hmac.compare_digest(digest, header.payload_digest):
        raise InvalidEnvelope(Failure.DIGEST_MISMATCH, "ciphertext does not match payload digest")
    return header


def open(  # the contract's name; shadows the builtin in this module only
    envelope: envelope_pb2.Envelope,
    *,
    recipient: str,
    keys: Mapping[str, HpkePrivateKey],
    signer: Callable[[str, str], Ed25519PublicKey],
) -> Opened:
    """Verify, unwrap the data key for ``recipient`` and decrypt. Raises InvalidEnvelope."""
    header = verify(envelope, signer)
    wrapped = next((wk for wk in header.wrapped_keys if wk.recipient == recipient), None)
    if wrapped is None:
        raise InvalidEnvelope(Failure.NOT_A_RECIPIENT, f"no key is wrapped for {_show(recipient)}")
    private_key = keys.get(wrapped.key_id)
    if private_key is None:
        raise InvalidEnvelope(
            Failure.NOT_A_RECIPIENT,
            f"key wrapped for {_show(recipient)} uses key id {_show(wrapped.key_id)}, "
            "which is not held",
        )
    try:
        data_key = SUITE.decrypt(
            wrapped.wrapped,
            private_key.to_hpke(),
            info=_wrap_info(header.message_id, recipient, wrapped.key_id),
        )
    except (InvalidTag, ValueError):
        raise InvalidEnvelope(Failure.UNWRAP_FAILED, "wrapped data key does not unwrap") from None
    if len(data_key) != _DATA_KEY_LEN:
        raise InvalidEnvelope(Failure.UNWRAP_FAILED, "wrapped data key has the wrong length")
    ct = envelope.ciphertext
    if len(ct) < _NONCE_LEN + _TAG_LEN:
        raise InvalidEnvelope(Failure.DECRYPT_FAILED, "ciphertext is too short")
    try:
        plaintext = AESGCM(data_key).decrypt(
            ct[:_NONCE_LEN], ct[_NONCE_LEN:], _aad(envelope.header)
        )
    except InvalidTag:
        raise InvalidEnvelope(Failure.DECRYPT_FAILED, "payload does not decrypt") from None
    return Opened(header=header, plaintext=plaintext)


def _digest_field(digest: bytes) -> bytes:
    return _DIGEST_FIELD_PREFIX + digest


def _aad(header_bytes: bytes) -> bytes:
    """The header bytes before the trailing digest field (parse_header checked it is there)."""
    return header_bytes[: -len(_DIGEST_FIELD_PREFIX) - _DIGEST_LEN]


def _wrap_info(message_id: str, recipient: str, key_id: str) -> bytes:
    return b"%s%s\x00%s\x00%s" % (
        _WRAP_INFO_PREFIX,
        message_id.encode(),
        recipient.encode(),
        key_id.encode(),
    )


def _show(value: str) -> str:
    """Header metadata for an error message: quoted, escaped and bounded."""
    return repr(value[:64])


def _check_seal_inputs(
    sender: str,
    signing_key_id: str,
    sequence: int,
    topic: str,
    message_id: str,
    recipients: Sequence[Recipient],
) -> None:
    if not recipients:
        raise ValueError("seal needs at least one recipient")
    partners = [r.partner for r in recipients]
    if len(set(partners)) != len(partners):
        raise ValueError("duplicate recipient")
    if not 1 <= sequence <= MAX_SEQUENCE:
        raise ValueError("sequence must be between 1 and 2**63 - 1")
    if len(recipients) > MAX_RECIPIENTS:
        raise ValueError(f"{len(recipients)} recipients; the limit is {MAX_RECIPIENTS}")
    for name, value in (
        ("sender", sender),
        ("signing_key_id", signing_key_id),
        ("topic", topic),
        ("message_id", message_id),
    ):
        if not value:
            raise ValueError(f"{name} must not be empty")
    # The HPKE info joins these with NUL, so NUL inside them would make it ambiguous.
    for value in (message_id, *partners, *(r.key_id for r in recipients)):
        if not value or "\x00" in value:
            raise ValueError("message_id, recipient and key_id must be non-empty without NUL")
    for i, r in enumerate(recipients):
        problem = _recipient_problem(i, r.partner, r.key_id)
        if problem:
            raise ValueError(problem)
        if not 0 <= r.sequence <= MAX_SEQUENCE:
            raise ValueError(f"recipient {r.partner} sequence must be between 0 and 2**63 - 1")
