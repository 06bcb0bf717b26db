"""coalition.envelope_v2 with coalition.epoch: batches, hybrid root signatures, epoch keys."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from coalition import envelope, envelope_v2
from coalition.envelope import InvalidEnvelope, Recipient
from coalition.envelope_v2 import Failure, InvalidEnvelopeV2, Message, RootCache
from coalition.epoch import EpochPolicy, RecipientEpochs, SenderEpochs
from coalition.hpke import HpkePrivateKey
from coalition.hybrid import HybridPublicKey, HybridSigningKey
from coalition.v1 import envelope_pb2, label_pb2
from tests import v2_tools

SENDER = "KOR"
KEY = HybridSigningKey.generate()
KEY_ID = "kor-hybrid-1"
HPKE = {code: HpkePrivateKey.generate() for code in ("USA", "GBR", "UKR")}
CREATED_MS = 1_767_225_600_000
LABEL = label_pb2.Label(
    policy="NATO",
    classification=label_pb2.SECRET,
    categories=[
        label_pb2.Category(name="REL TO", type=label_pb2.PERMISSIVE, values=["KOR", "USA", "GBR"])
    ],
)


def signer(sender: str, key_id: str) -> HybridPublicKey:
    if (sender, key_id) != (SENDER, KEY_ID):
        raise KeyError(sender)
    return KEY.public_key()


def recipient(code: str, key_id: str | None = None, sequence: int = 0) -> Recipient:
    return Recipient(code, key_id or f"{code.lower()}-1", HPKE[code].public_key(), sequence)


def inbox(code: str) -> RecipientEpochs:
    return RecipientEpochs(code, {f"{code.lower()}-1": HPKE[code]})


def batch(
    n: int,
    epochs: SenderEpochs,
    to: Sequence[str] = ("USA", "GBR"),
    first_sequence: int = 1,
    text: bytes = b"two companies moving south",
) -> list[envelope_pb2.Envelope]:
    messages = [
        Message(
            plaintext=text + b" %d" % i,
            topic="intel.ground.kor",
            label=LABEL,
            precedence=label_pb2.PRIORITY,
            content_type="text/plain",
            recipients=[recipient(c, sequence=first_sequence + i) for c in to],
            sequence=first_sequence + i,
            created_ms=CREATED_MS,
        )
        for i in range(n)
    ]
    return envelope_v2.seal_batch(
        messages,
        sender=SENDER,
        signing_key=KEY,
        signing_key_id=KEY_ID,
        epochs=epochs,
        created_ms=CREATED_MS,
    )


def refused(env: envelope_pb2.Envelope, reason: Failure, who: str = "USA") -> str:
    with pytest.raises(InvalidEnvelopeV2) as info:
        envelope_v2.open(env, epochs=inbox(who), signer=signer)
    assert info.value.reason == reason, str(info.value)
    return str(info.value)


@pytest.mark.parametrize("n", [1, 2, 3, 16, 17])
def test_every_envelope_verifies_alone_and_opens(n: int) -> None:
    envs = batch(n, SenderEpochs(SENDER))
    for i, env in enumerate(envs):
        assert envelope_v2.is_v2(env) and not env.header and not env.signature
        # A third party with nothing cached: header + path + root signature.
        verified = envelope_v2.verify(env, signer)
        assert verified.header.sequence == i + 1
        assert verified.root.tree_size == n
        for code in ("USA", "GBR"):
            opened = envelope_v2.open(env, epochs=inbox(code), signer=signer)
            assert opened.plaintext == b"two companies moving south %d" % i
            assert opened.sequence == i + 1
            assert opened.header.label == LABEL


def test_one_signature_check_per_batch_and_one_encapsulation_per_epoch() -> None:
    sender = SenderEpochs(SENDER)
    usa, roots = inbox("USA"), RootCache()
    broker_roots = RootCache()
    for b in range(3):
        for env in batch(16, sender, first_sequence=1 + 16 * b):
            envelope_v2.verify(env, signer, broker_roots)
            envelope_v2.open(env, epochs=usa, signer=signer, roots=roots)
    assert broker_roots.verifications == roots.verifications == 3  # one per batch
    assert usa.decapsulations == 1  # one epoch for all 48 messages
    assert sender.encapsulations == 2  # one per recipient


def test_v1_envelopes_are_unchanged_and_the_versions_do_not_mix() -> None:
    from tests import vector_keys

    kor, usa = vector_keys.partner("KOR"), vector_keys.partner("USA")
    v1 = envelope.seal(
        plaintext=b"v1",
        sender="KOR",
        signing_key=kor.signing_key,
        signing_key_id=kor.signing_key_id,
        sequence=1,
        topic="t",
        label=LABEL,
        precedence=label_pb2.ROUTINE,
        content_type="text/plain",
        recipients=[usa.recipient],
        created_ms=CREATED_MS,
    )
    assert not envelope_v2.is_v2(v1)
    assert envelope.open(v1, recipient="USA", keys=usa.keys, signer=vector_keys.signer).plaintext
    with pytest.raises(InvalidEnvelopeV2) as info:
        envelope_v2.verify(v1, signer)
    assert info.value.reason == Failure.MALFORMED
    v2 = batch(1, SenderEpochs(SENDER))[0]
    with pytest.raises(InvalidEnvelope) as info1:  # a v1-only reader refuses v2 outright
        envelope.verify(v2, vector_keys.signer)
    assert info1.value.reason == envelope.Failure.MALFORMED
    mixed = v2_tools.copy(v2)
    mixed.signature = v1.signature
    refused(mixed, Failure.MALFORMED)


def test_tampered_leaf_swapped_leaf_and_wrong_path() -> None:
    envs = batch(5, SenderEpochs(SENDER))

    def downgrade(h: envelope_pb2.Header) -> None:
        h.label.classification = label_pb2.RESTRICTED

    assert "inclusion path" in refused(v2_tools.edit_core(envs[2], downgrade), Failure.BAD_PATH)
    swapped = v2_tools.copy(envs[2])  # message 3's header and payload with message 2's proof
    swapped.header_v2, swapped.ciphertext = envs[3].header_v2, envs[3].ciphertext
    refused(swapped, Failure.BAD_PATH)
    wrong = v2_tools.copy(envs[2])
    wrong.batch.path[0] = bytes(32)
    refused(wrong, Failure.BAD_PATH)
    moved = v2_tools.copy(envs[2])
    moved.batch.leaf_index = 3
    refused(moved, Failure.BAD_PATH)
    salted = v2_tools.copy(envs[2])
    salted.batch.leaf_salt = bytes(32)
    refused(salted, Failure.BAD_PATH)
    payload = v2_tools.copy(envs[2])
    payload.ciphertext = envs[3].ciphertext
    refused(payload, Failure.DIGEST_MISMATCH)


def test_tampered_root_and_one_signature_only() -> None:
    envs = batch(4, SenderEpochs(SENDER))
    root = envelope_pb2.BatchRoot.FromString(envs[0].batch.root)
    root.created_ms += 1
    altered = v2_tools.copy(envs[0])
    altered.batch.root = root.SerializeToString()
    refused(altered, Failure.BAD_SIGNATURE)
    for half, missing in (("ml_dsa_65", "ML-DSA-65"), ("ed25519", "Ed25519")):
        only = v2_tools.copy(envs[0])
        only.batch.root_signature.ClearField(half)  # type: ignore[arg-type]
        assert missing in refused(only, Failure.BAD_SIGNATURE)
    other = HybridSigningKey.generate()
    refused(v2_tools.rebatch(envs, other)[1], Failure.BAD_SIGNATURE)
    # Half from the right key, half from another: still refused.
    good = envs[0].batch.root_signature
    forged = v2_tools.rebatch(
        envs,
        other,
        keep=lambda s: envelope_pb2.HybridSignature(ed25519=s.ed25519, ml_dsa_65=good.ml_dsa_65),
    )
    refused(forged[0], Failure.BAD_SIGNATURE)


def test_a_cached_root_needs_the_same_signature() -> None:
    envs = batch(4, SenderEpochs(SENDER))
    roots = RootCache()
    envelope_v2.verify(envs[0], signer, roots)
    stripped = v2_tools.copy(envs[1])
    stripped.batch.root_signature.ClearField("ml_dsa_65")
    with pytest.raises(InvalidEnvelopeV2) as info:
        envelope_v2.verify(stripped, signer, roots)
    assert info.value.reason == Failure.BAD_SIGNATURE
    envelope_v2.verify(envs[1], signer, roots)
    assert roots.verifications == 2  # the stripped copy was checked, not taken from the cache


def test_roots_signed_by_a_sender_cannot_be_claimed_by_another() -> None:
    envs = batch(2, SenderEpochs(SENDER))

    def impersonate(h: envelope_pb2.Header) -> None:
        h.sender = "USA"

    assert "another sender" in refused(v2_tools.edit_core(envs[0], impersonate), Failure.MALFORMED)


def test_verify_before_decrypt() -> None:
    env = batch(1, SenderEpochs(SENDER))[0]
    env.batch.root_signature.ClearField("ed25519")
    usa = inbox("USA")
    with pytest.raises(InvalidEnvelopeV2):
        envelope_v2.open(env, epochs=usa, signer=signer)
    assert usa.decapsulations == 0


def test_epoch_key_for_another_recipient() -> None:
    envs = batch(1, SenderEpochs(SENDER))

    def give_usas_key_to_gbr(h: envelope_pb2.HeaderV2) -> None:
        usa, gbr = h.epoch_keys
        assert (usa.recipient, gbr.recipient) == ("USA", "GBR")
        usa.recipient, gbr.recipient = "GBR", "USA"
        usa.key_id, gbr.key_id = gbr.key_id, usa.key_id

    # Even re-signed by the sender, GBR cannot open USA's epoch key.
    swapped = v2_tools.rebatch([v2_tools.edit_header_v2(envs[0], give_usas_key_to_gbr)], KEY)[0]
    refused(swapped, Failure.UNWRAP_FAILED, who="GBR")
    refused(swapped, Failure.UNWRAP_FAILED, who="USA")
    refused(envs[0], Failure.NOT_A_RECIPIENT, who="UKR")
    # An inbox holding another key id than the one the epoch was opened under.
    stranger = RecipientEpochs("USA", {"usa-2": HPKE["USA"]})
    with pytest.raises(InvalidEnvelopeV2) as info:
        envelope_v2.open(envs[0], epochs=stranger, signer=signer)
    assert info.value.reason == Failure.NOT_A_RECIPIENT


def test_label_is_bound_to_the_keys_and_payload_by_associated_data() -> None:
    sender = SenderEpochs(SENDER)
    env = batch(1, sender)[0]

    def widen(h: envelope_pb2.Header) -> None:
        h.label.categories[0].values.append("UKR")

    # The sender re-signs a widened label over the old epoch keys and payload.
    relabelled = v2_tools.rebatch([v2_tools.edit_core(env, widen)], KEY)[0]
    refused(relabelled, Failure.UNWRAP_FAILED)
    # Even with the data key re-wrapped for the new header, the payload refuses it.
    usa = inbox("USA")
    old_core = envelope_pb2.HeaderV2.FromString(env.header_v2)
    data_key = usa.unwrap(SENDER, old_core.core, old_core.epoch_keys[0])
    new_core = envelope_pb2.HeaderV2.FromString(relabelled.header_v2).core

    def rewrap(h: envelope_pb2.HeaderV2) -> None:
        h.epoch_keys[0].CopyFrom(sender.wrap(recipient("USA"), new_core, data_key))

    rewrapped = v2_tools.rebatch([v2_tools.edit_header_v2(relabelled, rewrap)], KEY)[0]
    refused(rewrapped, Failure.DECRYPT_FAILED)


def test_removed_recipient_gets_no_key_for_later_messages() -> None:
    sender = SenderEpochs(SENDER)
    gbr = inbox("GBR")
    for env in batch(4, sender):
        envelope_v2.open(env, epochs=gbr, signer=signer)
    before = {code: sender.current_epoch(code) for code in ("USA", "GBR")}
    # GBR is removed from the release: the caller rolls every epoch.
    sender.roll()
    later = batch(4, sender, to=("USA",), first_sequence=5)
    assert sender.current_epoch("USA") not in (None, before["USA"])
    assert sender.current_epoch("GBR") is None
    for env in later:
        refused(env, Failure.NOT_A_RECIPIENT, who="GBR")
        # No later envelope carries a key under an epoch GBR has ever held, nor USA's old one.
        for k in envelope_pb2.HeaderV2.FromString(env.header_v2).epoch_keys:
            assert not gbr.holds(SENDER, k.key_id, k.epoch_id)
            assert k.epoch_id not in (before["USA"], before["GBR"])
    # Re-added later, GBR gets a new epoch, never its old one.
    again = batch(1, sender, first_sequence=9)
    assert sender.current_epoch("GBR") not in (None, before["GBR"])
    envelope_v2.open(again[0], epochs=gbr, signer=signer)


def test_a_key_bundle_change_rolls_the_epoch_at_once() -> None:
    sender = SenderEpochs(SENDER)
    core = b"core"
    first = sender.wrap(recipient("USA"), core, bytes(32))
    assert sender.wrap(recipient("USA"), core, bytes(32)).epoch_id == first.epoch_id
    rotated = sender.wrap(recipient("USA", key_id="usa-2"), core, bytes(32))
    assert rotated.epoch_id != first.epoch_id and rotated.key_id == "usa-2"
    new_key = Recipient("USA", "usa-2", HpkePrivateKey.generate().public_key())
    assert sender.wrap(new_key, core, bytes(32)).epoch_id != rotated.epoch_id
    assert sender.encapsulations == 3


def test_epochs_roll_after_n_messages_or_t_seconds() -> None:
    now = [0.0]
    sender = SenderEpochs(SENDER, EpochPolicy(max_messages=3, max_seconds=60), clock=lambda: now[0])
    ids = [sender.wrap(recipient("USA"), b"c", bytes(32)).epoch_id for _ in range(7)]
    assert [len(set(ids[i : i + 3])) for i in (0, 3)] == [1, 1]
    assert len({ids[0], ids[3], ids[6]}) == 3
    now[0] = 59.0
    assert sender.wrap(recipient("USA"), b"c", bytes(32)).epoch_id == ids[6]
    now[0] = 60.0
    assert sender.wrap(recipient("USA"), b"c", bytes(32)).epoch_id != ids[6]
    assert sender.encapsulations == 4
    with pytest.raises(ValueError):
        EpochPolicy(max_messages=0)


def test_a_recipient_that_missed_the_epoch_opening_still_opens() -> None:
    sender = SenderEpochs(SENDER)
    first = batch(2, sender)
    later = batch(2, sender, first_sequence=3)
    usa = inbox("USA")  # never saw `first`
    assert envelope_v2.open(later[1], epochs=usa, signer=signer).plaintext.endswith(b" 1")
    assert usa.decapsulations == 1
    envelope_v2.open(later[0], epochs=usa, signer=signer)
    envelope_v2.open(first[0], epochs=usa, signer=signer)  # the same epoch: no new decapsulation
    assert usa.decapsulations == 1
    # Once USA acknowledged the epoch, the encapsulation is no longer carried to it.
    epoch_id = sender.current_epoch("USA")
    assert epoch_id is not None
    sender.acknowledge("USA", epoch_id)
    acked = batch(1, sender, first_sequence=5)[0]
    keys = {k.recipient: k for k in envelope_pb2.HeaderV2.FromString(acked.header_v2).epoch_keys}
    assert not keys["USA"].encapsulation and keys["GBR"].encapsulation
    assert envelope_v2.open(acked, epochs=usa, signer=signer).epoch_id == epoch_id
    assert "not carried" in refused(acked, Failure.UNWRAP_FAILED, who="USA")  # a fresh inbox
    envelope_v2.open(acked, epochs=inbox("GBR"), signer=signer)


def test_an_old_epoch_cannot_be_replayed_into_new_messages() -> None:
    sender = SenderEpochs(SENDER)
    old = batch(1, sender)[0]
    sender.roll()
    new = batch(1, sender, first_sequence=2)[0]
    old_keys = envelope_pb2.HeaderV2.FromString(old.header_v2).epoch_keys

    def splice(h: envelope_pb2.HeaderV2) -> None:
        del h.epoch_keys[:]
        h.epoch_keys.extend(old_keys)

    # Even the sender cannot move an old epoch's wrapped key into another message.
    spliced = v2_tools.rebatch([v2_tools.edit_header_v2(new, splice)], KEY)[0]
    refused(spliced, Failure.UNWRAP_FAILED)
    # An old envelope re-delivered opens only as itself: the same message id and
    # per-(sender, recipient) sequence, which the replay and gap checks already refuse.
    usa = inbox("USA")
    a = envelope_v2.open(old, epochs=usa, signer=signer)
    b = envelope_v2.open(old, epochs=usa, signer=signer)
    assert (
        (a.header.message_id, a.sequence)
        == (b.header.message_id, b.sequence)
        == (
            envelope_v2.verify(old, signer).header.message_id,
            1,
        )
    )


def test_malformed_envelopes_are_refused_before_any_signature_check() -> None:
    env = batch(3, SenderEpochs(SENDER))[1]
    cases = []
    e = v2_tools.copy(env)
    e.batch.leaf_index = 3
    cases.append((e, "outside the batch"))
    e = v2_tools.copy(env)
    e.header_v2 = b"\xff\xff"
    cases.append((e, "does not parse"))

    def with_wrapped(h: envelope_pb2.Header) -> None:
        h.wrapped_keys.add(recipient="USA", key_id="k", wrapped=b"x")

    cases.append((v2_tools.edit_core(env, with_wrapped), "holds keys"))

    def twice(h: envelope_pb2.HeaderV2) -> None:
        h.epoch_keys[1].recipient = h.epoch_keys[0].recipient

    cases.append((v2_tools.edit_header_v2(env, twice), "two epoch keys"))

    def bad_epoch(h: envelope_pb2.HeaderV2) -> None:
        h.epoch_keys[0].epoch_id = b"short"

    cases.append((v2_tools.edit_header_v2(env, bad_epoch), "epoch_id"))

    def bad_code(h: envelope_pb2.HeaderV2) -> None:
        h.epoch_keys[0].recipient = "usa\n"

    cases.append((v2_tools.edit_header_v2(env, bad_code), "epoch_keys[0].recipient"))
    e = v2_tools.copy(env)
    e.batch.path.extend([bytes(32)] * 5)
    cases.append((e, "longer than the tree"))
    for bad, words in cases:
        roots = RootCache()
        with pytest.raises(InvalidEnvelopeV2) as info:
            envelope_v2.verify(bad, signer, roots)
        assert info.value.reason == Failure.MALFORMED, words
        assert words in str(info.value)
        assert roots.verifications == 0


def test_unknown_sender_and_errors_never_show_plaintext() -> None:
    env = batch(1, SenderEpochs(SENDER), text=b"SECRET-PLAINTEXT")[0]

    def other_key_id(h: envelope_pb2.Header) -> None:
        h.signing_key_id = "kor-hybrid-9"

    e = v2_tools.rebatch([v2_tools.edit_core(env, other_key_id)], KEY)[0]
    root = envelope_pb2.BatchRoot.FromString(e.batch.root)
    root.signing_key_id = "kor-hybrid-9"
    e.batch.root = root.SerializeToString()
    message = refused(e, Failure.UNKNOWN_SENDER)
    for bad in (e, v2_tools.edit_header_v2(env, lambda h: h.epoch_keys[0].ClearField("wrapped"))):
        try:
            envelope_v2.open(bad, epochs=inbox("USA"), signer=signer)
        except InvalidEnvelopeV2 as exc:
            message += str(exc)
    assert "SECRET-PLAINTEXT" not in message
    assert KEY.private_bytes().hex()[:16] not in message


def test_seal_refuses_bad_batches() -> None:
    with pytest.raises(ValueError, match="1 to 1024"):
        batch(0, SenderEpochs(SENDER))
    bad = Message(b"x", "t", LABEL, label_pb2.ROUTINE, "text/plain", [], 1, CREATED_MS)
    with pytest.raises(ValueError, match="recipient"):
        envelope_v2.seal_batch(
            [bad],
            sender=SENDER,
            signing_key=KEY,
            signing_key_id=KEY_ID,
            epochs=SenderEpochs(SENDER),
            created_ms=0,
        )
    zero = Message(b"x", "t", LABEL, label_pb2.ROUTINE, "text/plain", [recipient("USA")], 0, 0)
    with pytest.raises(ValueError, match="sequence"):
        envelope_v2.seal_batch(
            [zero],
            sender=SENDER,
            signing_key=KEY,
            signing_key_id=KEY_ID,
            epochs=SenderEpochs(SENDER),
            created_ms=0,
        )
