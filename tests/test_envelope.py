"""coalition.envelope: round trips, refusals, and the recipe pinned byte for byte."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from coalition import envelope
from coalition.envelope import INTEL_SUMMARY, Failure, InvalidEnvelope, Recipient, seal
from coalition.hpke import SUITE, HpkePrivateKey
from coalition.pae import HEADER_TYPE, pae
from coalition.v1 import envelope_pb2, label_pb2

# A small pool of partners, keys generated once for the module.
POOL = ("KOR", "USA", "GBR", "UKR", "NATO", "FRA")
HPKE = {code: HpkePrivateKey.generate() for code in POOL}
KEY_ID = {code: f"{code.lower()}-hpke-1" for code in POOL}
SENDER = "KOR"
SIGNING_KEY = Ed25519PrivateKey.generate()
SIGNING_KEY_ID = "0a1b2c3d"
CREATED_MS = 1_767_225_600_000
LABEL = label_pb2.Label(
    policy="NATO",
    classification=label_pb2.SECRET,
    categories=[
        label_pb2.Category(name="REL TO", type=label_pb2.PERMISSIVE, values=["KOR", "USA"])
    ],
)
DIGEST_FIELD_PREFIX = b"\x4a\x20"  # Header.payload_digest, 32 bytes


def signer(sender: str, key_id: str) -> Ed25519PublicKey:
    if (sender, key_id) != (SENDER, SIGNING_KEY_ID):
        raise KeyError(sender)
    return SIGNING_KEY.public_key()


def recipient(code: str) -> Recipient:
    return Recipient(code, KEY_ID[code], HPKE[code].public_key())


def keys(code: str) -> dict[str, HpkePrivateKey]:
    return {KEY_ID[code]: HPKE[code]}


def make(
    plaintext: bytes = b"two companies moving south",
    to: tuple[str, ...] = ("USA", "GBR"),
    **overrides: object,
) -> envelope_pb2.Envelope:
    args: dict[str, object] = {
        "plaintext": plaintext,
        "sender": SENDER,
        "signing_key": SIGNING_KEY,
        "signing_key_id": SIGNING_KEY_ID,
        "sequence": 1,
        "topic": "intel.ground.kor",
        "label": LABEL,
        "precedence": label_pb2.ROUTINE,
        "content_type": INTEL_SUMMARY,
        "recipients": [recipient(c) for c in to],
        "created_ms": CREATED_MS,
    }
    args.update(overrides)
    return seal(**args)  # type: ignore[arg-type]


def open_as(env: envelope_pb2.Envelope, code: str) -> envelope.Opened:
    return envelope.open(env, recipient=code, keys=keys(code), signer=signer)


def resigned(env: envelope_pb2.Envelope, header: bytes) -> envelope_pb2.Envelope:
    """The envelope with new header bytes, signed by the real sender."""
    return envelope_pb2.Envelope(
        header=header,
        ciphertext=env.ciphertext,
        signature=SIGNING_KEY.sign(pae(HEADER_TYPE, header)),
    )


def with_digest_last(header: envelope_pb2.Header) -> bytes:
    body = envelope_pb2.Header()
    body.CopyFrom(header)
    body.ClearField("payload_digest")
    return body.SerializeToString() + DIGEST_FIELD_PREFIX + header.payload_digest


SEALED = make(b"the one envelope every corruption test starts from")
SEALED_BYTES = SEALED.SerializeToString()

topics = st.from_regex(r"[a-z0-9_-]{1,8}(\.[a-z0-9_-]{1,8}){0,3}", fullmatch=True)


@settings(max_examples=40, deadline=None)
@given(
    plaintext=st.binary(max_size=2048),
    topic=topics,
    to=st.lists(st.sampled_from(POOL), min_size=1, max_size=5, unique=True),
    sequence=st.integers(min_value=1, max_value=2**63 - 1),
    precedence=st.sampled_from(
        [label_pb2.ROUTINE, label_pb2.PRIORITY, label_pb2.IMMEDIATE, label_pb2.FLASH]
    ),
)
def test_round_trip(
    plaintext: bytes, topic: str, to: list[str], sequence: int, precedence: int
) -> None:
    env = make(plaintext, tuple(to), topic=topic, sequence=sequence, precedence=precedence)
    for code in to:
        opened = open_as(env, code)
        assert opened.plaintext == plaintext
        h = opened.header
        assert (h.sender, h.sequence, h.topic, h.precedence) == (
            SENDER,
            sequence,
            topic,
            precedence,
        )
        assert (h.created_ms, h.content_type, h.signing_key_id) == (
            CREATED_MS,
            INTEL_SUMMARY,
            SIGNING_KEY_ID,
        )
        assert h.label == LABEL
        assert [(w.recipient, w.key_id) for w in h.wrapped_keys] == [(c, KEY_ID[c]) for c in to]
    assert envelope.verify(env, signer) == envelope.parse_header(env)
    outsider = next(c for c in POOL if c not in to)
    with pytest.raises(InvalidEnvelope) as info:
        open_as(env, outsider)
    assert info.value.reason is Failure.NOT_A_RECIPIENT


def _assert_refused(env: envelope_pb2.Envelope) -> None:
    for code in ("USA", "GBR"):
        with pytest.raises(InvalidEnvelope):
            open_as(env, code)
    with pytest.raises(InvalidEnvelope):
        envelope.verify(env, signer)


@settings(max_examples=300, deadline=None)
@given(index=st.integers(0, len(SEALED_BYTES) - 1), mask=st.integers(1, 255))
def test_any_byte_corruption_of_the_wire_form_is_refused(index: int, mask: int) -> None:
    data = bytearray(SEALED_BYTES)
    data[index] ^= mask
    try:
        env = envelope_pb2.Envelope.FromString(bytes(data))
    except DecodeError:
        return  # not an Envelope at all: refused before the envelope API
    _assert_refused(env)


@settings(max_examples=300, deadline=None)
@given(
    field=st.sampled_from(["header", "ciphertext", "signature"]),
    position=st.floats(0, 1, exclude_max=True),
    mask=st.integers(1, 255),
)
def test_any_byte_corruption_of_a_field_is_refused(field: str, position: float, mask: int) -> None:
    value = bytearray(getattr(SEALED, field))
    value[int(position * len(value))] ^= mask
    env = envelope_pb2.Envelope()
    env.CopyFrom(SEALED)
    setattr(env, field, bytes(value))
    _assert_refused(env)


def test_recipe_matches_the_contract() -> None:
    """Open by hand, step by step as docs/internal-api.md fixes it."""
    plaintext = b"recipe check"
    env = make(plaintext, ("USA",), message_id="00" * 16)
    header_bytes = env.header
    SIGNING_KEY.public_key().verify(env.signature, pae(HEADER_TYPE, header_bytes))
    header = envelope_pb2.Header.FromString(header_bytes)
    assert header.payload_digest == hashlib.sha256(env.ciphertext).digest()
    # The digest is the header's last field; the bytes before it are the AEAD's AAD.
    assert header_bytes.endswith(DIGEST_FIELD_PREFIX + header.payload_digest)
    aad = header_bytes[: -len(DIGEST_FIELD_PREFIX) - 32]
    assert envelope_pb2.Header.FromString(aad).payload_digest == b""
    (wk,) = header.wrapped_keys
    info = b"coalition/v1 wrap\x00" + b"00" * 16 + b"\x00USA\x00" + KEY_ID["USA"].encode()
    data_key = SUITE.decrypt(wk.wrapped, HPKE["USA"].to_hpke(), info=info)
    assert len(data_key) == 32
    nonce, body = env.ciphertext[:12], env.ciphertext[12:]
    assert len(body) == len(plaintext) + 16
    assert AESGCM(data_key).decrypt(nonce, body, aad) == plaintext


def test_message_id_defaults_to_16_random_bytes_hex() -> None:
    ids = {envelope.parse_header(make()).message_id for _ in range(3)}
    assert len(ids) == 3
    assert all(len(i) == 32 and bytes.fromhex(i) for i in ids)


def test_fresh_data_key_and_nonce_per_message() -> None:
    a, b = make(b"same"), make(b"same")
    assert a.ciphertext[:12] != b.ciphertext[:12]
    assert a.ciphertext != b.ciphertext


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"recipients": []}, "at least one recipient"),
        ({"recipients": [recipient("USA"), recipient("USA")]}, "duplicate recipient"),
        ({"sequence": 0}, "sequence"),
        ({"sequence": -1}, "sequence"),
        ({"sequence": 2**64}, "sequence"),
        ({"sequence": 2**63}, "sequence"),
        ({"sender": ""}, "sender"),
        ({"topic": ""}, "topic"),
        ({"message_id": ""}, "message_id"),
        ({"signing_key_id": ""}, "signing_key_id"),
        ({"precedence": 0}, "precedence"),
        ({"recipients": [Recipient("US\x00A", "k", HPKE["USA"].public_key())]}, "NUL"),
    ],
)
def test_seal_refuses_bad_input(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(b"x", ("USA",), **overrides)


def test_unknown_sender() -> None:
    def nobody(sender: str, key_id: str) -> Ed25519PublicKey:
        raise KeyError(sender)

    with pytest.raises(InvalidEnvelope) as info:
        envelope.open(SEALED, recipient="USA", keys=keys("USA"), signer=nobody)
    assert info.value.reason is Failure.UNKNOWN_SENDER


def test_signer_is_asked_for_the_header_sender_and_key_id() -> None:
    asked: list[tuple[str, str]] = []

    def recording(sender: str, key_id: str) -> Ed25519PublicKey:
        asked.append((sender, key_id))
        return signer(sender, key_id)

    envelope.verify(SEALED, recording)
    assert asked == [(SENDER, SIGNING_KEY_ID)]


def test_signature_under_another_key_is_refused() -> None:
    def impostor(sender: str, key_id: str) -> Ed25519PublicKey:
        return Ed25519PrivateKey.generate().public_key()

    with pytest.raises(InvalidEnvelope) as info:
        envelope.open(SEALED, recipient="USA", keys=keys("USA"), signer=impostor)
    assert info.value.reason is Failure.BAD_SIGNATURE


def test_small_order_signing_key_cannot_sign_every_header() -> None:
    """Under the identity point as key, R = identity and S = 0 satisfy the cofactorless
    check for any bytes (OpenSSL's check accepts it); the envelope check must refuse it."""
    identity = bytes([1]) + bytes(31)
    forged = envelope_pb2.Envelope(
        header=SEALED.header, ciphertext=SEALED.ciphertext, signature=identity + bytes(32)
    )
    with pytest.raises(InvalidEnvelope) as info:
        envelope.verify(forged, lambda sender, key_id: Ed25519PublicKey.from_public_bytes(identity))
    assert info.value.reason is Failure.BAD_SIGNATURE


def test_signature_is_checked_before_anything_else() -> None:
    env = envelope_pb2.Envelope(header=SEALED.header, ciphertext=b"junk", signature=b"\x00" * 64)
    with pytest.raises(InvalidEnvelope) as info:
        envelope.open(env, recipient="nobody", keys={}, signer=signer)
    assert info.value.reason is Failure.BAD_SIGNATURE


def test_recipient_without_the_wrapped_key_id_is_not_a_recipient() -> None:
    with pytest.raises(InvalidEnvelope) as info:
        envelope.open(SEALED, recipient="USA", keys={"other-key": HPKE["USA"]}, signer=signer)
    assert info.value.reason is Failure.NOT_A_RECIPIENT


def test_wrong_private_key_under_the_right_key_id_fails_to_unwrap() -> None:
    wrong = {KEY_ID["USA"]: HPKE["GBR"]}
    with pytest.raises(InvalidEnvelope) as info:
        envelope.open(SEALED, recipient="USA", keys=wrong, signer=signer)
    assert info.value.reason is Failure.UNWRAP_FAILED


def test_wrapped_key_relabelled_for_another_recipient_fails_to_unwrap() -> None:
    """The HPKE info binds the wrapped key to recipient and key id."""
    header = envelope.parse_header(SEALED)
    usa = header.wrapped_keys[0]
    usa.recipient, usa.key_id = "GBR", KEY_ID["GBR"]
    del header.wrapped_keys[1]
    env = resigned(SEALED, with_digest_last(header))
    with pytest.raises(InvalidEnvelope) as info:
        open_as(env, "GBR")
    assert info.value.reason is Failure.UNWRAP_FAILED


@pytest.mark.parametrize(
    "field", ["sender", "message_id", "topic", "sequence", "payload_digest", "duplicate"]
)
def test_signed_but_malformed_headers_are_refused(field: str) -> None:
    header = envelope.parse_header(SEALED)
    if field == "duplicate":
        header.wrapped_keys.add().CopyFrom(header.wrapped_keys[0])
    else:
        header.ClearField(field)  # type: ignore[arg-type]
    env = resigned(SEALED, with_digest_last(header))
    with pytest.raises(InvalidEnvelope) as info:
        open_as(env, "USA")
    assert info.value.reason is Failure.MALFORMED


@pytest.mark.parametrize("ciphertext", [b"", b"\x00" * 27])
def test_too_short_ciphertext_signed_by_the_sender_fails_to_decrypt(ciphertext: bytes) -> None:
    header = envelope.parse_header(SEALED)
    header.payload_digest = hashlib.sha256(ciphertext).digest()
    env = resigned(SEALED, with_digest_last(header))
    env.ciphertext = ciphertext
    with pytest.raises(InvalidEnvelope) as info:
        open_as(env, "USA")
    assert info.value.reason is Failure.DECRYPT_FAILED


def test_errors_never_show_plaintext_or_keys() -> None:
    secret = b"GRID 52S CH 12345 67890"
    env = make(secret)
    flipped = env.ciphertext[:-1] + bytes([env.ciphertext[-1] ^ 1])
    header = envelope.parse_header(env)
    header.payload_digest = hashlib.sha256(flipped).digest()
    tampered = resigned(env, with_digest_last(header))
    tampered.ciphertext = flipped
    with pytest.raises(InvalidEnvelope) as info:
        open_as(tampered, "USA")
    assert info.value.reason is Failure.DECRYPT_FAILED
    message = str(info.value)
    assert secret.decode() not in message
    assert HPKE["USA"].private_bytes().hex() not in message
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
