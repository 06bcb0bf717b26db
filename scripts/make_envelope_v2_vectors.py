"""Write tests/vectors/envelopes_v2.json: valid v2 envelopes and each way of breaking one.

Inputs are fixed (keys derived from public labels in tests/vector_keys.py, fixed
message ids and times); salts, batch ids, epoch keys, encapsulations, data keys and
nonces are random, so each run writes different bytes. Run once and commit the output:

    .venv/bin/python scripts/make_envelope_v2_vectors.py

Every vector opens on its own with a fresh recipient state (the epoch encapsulation
is carried in every message), so a checker needs only the recipient's HPKE key and
the sender's hybrid public key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coalition import envelope_v2  # noqa: E402
from coalition.envelope import INTEL_SUMMARY  # noqa: E402
from coalition.envelope_v2 import Failure, InvalidEnvelopeV2, Message  # noqa: E402
from coalition.epoch import RecipientEpochs, SenderEpochs  # noqa: E402
from coalition.hybrid import HybridSigningKey  # noqa: E402
from coalition.pae import BATCH_ROOT_TYPE  # noqa: E402
from coalition.v1 import envelope_pb2, label_pb2  # noqa: E402
from scripts.make_envelope_vectors import CREATED_MS, TOPIC, intel, label  # noqa: E402
from tests import v2_tools, vector_keys  # noqa: E402

OUT = ROOT / "tests" / "vectors" / "envelopes_v2.json"
OK = "ok"
# Failures the broker's verify() can report; the others need the recipient's key.
VERIFY_FAILURES: set[str] = {
    Failure.MALFORMED,
    Failure.UNKNOWN_SENDER,
    Failure.BAD_PATH,
    Failure.BAD_SIGNATURE,
    Failure.DIGEST_MISMATCH,
}
TEXTS = [
    ("Armour movement near Sector 7", "Two companies moving south at dusk."),
    ("Bridge repaired", "Crossing 4 usable again."),
    ("Fuel convoy", "Twelve tankers on route 3."),
]


def seal_from_kor(epochs: SenderEpochs, first: int, count: int) -> list[envelope_pb2.Envelope]:
    kor = "KOR"
    messages = [
        Message(
            plaintext=intel(*TEXTS[i % len(TEXTS)]),
            topic=TOPIC,
            label=label(),
            precedence=label_pb2.PRIORITY,
            content_type=INTEL_SUMMARY,
            recipients=[
                replace(vector_keys.partner(code).recipient, sequence=first + i)
                for code in ("USA", "GBR")
            ],
            sequence=first + i,
            created_ms=CREATED_MS,
            message_id=f"{first + i:032x}",
        )
        for i in range(count)
    ]
    return envelope_v2.seal_batch(
        messages,
        sender=kor,
        signing_key=vector_keys.hybrid_key(kor),
        signing_key_id=vector_keys.hybrid_key_id(kor),
        epochs=epochs,
        created_ms=CREATED_MS,
    )


def flip_bit(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def build() -> dict[str, Any]:
    kor_key = vector_keys.hybrid_key("KOR")
    epochs = SenderEpochs("KOR")
    batch = seal_from_kor(epochs, 1, 3)
    single = seal_from_kor(epochs, 4, 1)[0]
    epochs.roll()  # as on a policy, key-bundle or membership change
    later = seal_from_kor(epochs, 5, 1)[0]
    valid = batch[0]
    copy = v2_tools.copy

    def with_proof(**fields: Any) -> envelope_pb2.Envelope:
        out = copy(valid)
        for name, value in fields.items():
            setattr(out.batch, name, value)
        return out

    wrong_path = copy(valid)
    wrong_path.batch.path[0] = flip_bit(valid.batch.path[0], 0)
    swapped_leaf = copy(valid)
    swapped_leaf.header_v2, swapped_leaf.ciphertext = batch[1].header_v2, batch[1].ciphertext

    def downgrade(h: envelope_pb2.Header) -> None:
        h.label.classification = label_pb2.RESTRICTED

    def widen(h: envelope_pb2.Header) -> None:
        h.label.categories[0].values.append("UKR")

    def half(name: str) -> Callable[[envelope_pb2.HybridSignature], envelope_pb2.HybridSignature]:
        def keep(s: envelope_pb2.HybridSignature) -> envelope_pb2.HybridSignature:
            out = envelope_pb2.HybridSignature()
            setattr(out, name, getattr(s, name))
            return out

        return keep

    other_ml_dsa = HybridSigningKey.from_private_bytes(
        kor_key.ed25519.private_bytes_raw() + hashlib.sha256(b"another ML-DSA seed").digest()
    )
    good_ed = valid.batch.root_signature.ed25519
    root = envelope_pb2.BatchRoot.FromString(valid.batch.root)
    root.created_ms += 1
    root_altered = with_proof(root=root.SerializeToString())

    def swap_epoch_keys(h: envelope_pb2.HeaderV2) -> None:
        usa, gbr = h.epoch_keys
        assert (usa.recipient, gbr.recipient) == ("USA", "GBR")
        usa.recipient, gbr.recipient = "GBR", "USA"
        usa.key_id, gbr.key_id = gbr.key_id, usa.key_id

    old_keys = envelope_pb2.HeaderV2.FromString(valid.header_v2).epoch_keys

    def splice_old_epoch(h: envelope_pb2.HeaderV2) -> None:
        del h.epoch_keys[:]
        h.epoch_keys.extend(old_keys)

    flipped = copy(valid)
    flipped.ciphertext = flip_bit(valid.ciphertext, len(valid.ciphertext) // 2)

    def unknown_sender(h: envelope_pb2.Header) -> None:
        h.sender = "ZZZ"

    unknown = v2_tools.rebatch([v2_tools.edit_core(valid, unknown_sender)], kor_key)[0]
    unknown_root = envelope_pb2.BatchRoot.FromString(unknown.batch.root)
    unknown_root.sender = "ZZZ"
    unknown.batch.root = unknown_root.SerializeToString()
    unknown.batch.root_signature.CopyFrom(kor_key.sign(BATCH_ROOT_TYPE, unknown.batch.root))
    v1_signature = copy(valid)
    v1_signature.signature = good_ed

    cases: list[tuple[str, str, envelope_pb2.Envelope, str, str]] = [
        ("valid", "leaf 0 of a batch of 3, KOR to USA and GBR, opened by USA", valid, "USA", OK),
        ("valid_for_gbr", "the same envelope opened by GBR", valid, "GBR", OK),
        ("valid_last_leaf", "leaf 2 of the same batch, opened by USA", batch[2], "USA", OK),
        ("valid_batch_of_one", "a batch of one, in the same epoch", single, "USA", OK),
        ("valid_after_roll", "the first message of a new epoch", later, "GBR", OK),
        (
            "wrong_path",
            "one bit of the first path hash flipped",
            wrong_path,
            "USA",
            Failure.BAD_PATH,
        ),
        (
            "swapped_leaf",
            "header and payload of leaf 1 with the proof of leaf 0",
            swapped_leaf,
            "USA",
            Failure.BAD_PATH,
        ),
        (
            "leaf_index_altered",
            "leaf index 0 changed to 1",
            with_proof(leaf_index=1),
            "USA",
            Failure.BAD_PATH,
        ),
        (
            "leaf_salt_altered",
            "leaf salt zeroed",
            with_proof(leaf_salt=bytes(32)),
            "USA",
            Failure.BAD_PATH,
        ),
        (
            "label_altered",
            "header label downgraded to RESTRICTED, proof kept",
            v2_tools.edit_core(valid, downgrade),
            "USA",
            Failure.BAD_PATH,
        ),
        (
            "root_signed_by_ed25519_only",
            "the batch re-signed with the Ed25519 half only",
            v2_tools.rebatch(batch, kor_key, keep=half("ed25519"))[0],
            "USA",
            Failure.BAD_SIGNATURE,
        ),
        (
            "root_signed_by_ml_dsa_only",
            "the batch re-signed with the ML-DSA-65 half only",
            v2_tools.rebatch(batch, kor_key, keep=half("ml_dsa_65"))[0],
            "USA",
            Failure.BAD_SIGNATURE,
        ),
        (
            "root_ml_dsa_from_another_key",
            "the sender's Ed25519 half with an ML-DSA-65 half from a key not certified",
            v2_tools.rebatch(batch, other_ml_dsa)[0],
            "USA",
            Failure.BAD_SIGNATURE,
        ),
        (
            "root_altered",
            "batch root time changed, signature kept",
            root_altered,
            "USA",
            Failure.BAD_SIGNATURE,
        ),
        (
            "epoch_key_for_another_recipient",
            "USA's and GBR's epoch keys exchanged and the batch re-signed by the sender",
            v2_tools.rebatch([v2_tools.edit_header_v2(valid, swap_epoch_keys)], kor_key)[0],
            "GBR",
            Failure.UNWRAP_FAILED,
        ),
        (
            "old_epoch_key_spliced",
            "a later message carrying the epoch keys of an earlier epoch, re-signed by the sender",
            v2_tools.rebatch([v2_tools.edit_header_v2(later, splice_old_epoch)], kor_key)[0],
            "USA",
            Failure.UNWRAP_FAILED,
        ),
        (
            "label_widened_resigned",
            "UKR added to REL TO and the batch re-signed by the sender over the old keys",
            v2_tools.rebatch([v2_tools.edit_core(valid, widen)], kor_key)[0],
            "USA",
            Failure.UNWRAP_FAILED,
        ),
        (
            "ciphertext_bit_flipped",
            "one bit of the ciphertext flipped",
            flipped,
            "USA",
            Failure.DIGEST_MISMATCH,
        ),
        (
            "ciphertext_bit_flipped_resigned",
            "one ciphertext bit flipped, the digest updated and the batch re-signed",
            v2_tools.rebatch([v2_tools.set_digest(flipped)], kor_key)[0],
            "USA",
            Failure.DECRYPT_FAILED,
        ),
        (
            "wrong_recipient",
            "opened by UKR, which no key was wrapped for",
            valid,
            "UKR",
            Failure.NOT_A_RECIPIENT,
        ),
        (
            "sender_unknown",
            "sender ZZZ, absent from the directory",
            unknown,
            "USA",
            Failure.UNKNOWN_SENDER,
        ),
        (
            "root_names_another_sender",
            "header sender changed to USA, the batch root still names KOR",
            v2_tools.edit_core(valid, lambda h: setattr(h, "sender", "USA")),
            "USA",
            Failure.MALFORMED,
        ),
        (
            "v1_signature_on_v2",
            "a v2 envelope that also sets the v1 signature field",
            v1_signature,
            "USA",
            Failure.MALFORMED,
        ),
    ]

    vectors = []
    for name, description, env, recipient, expected in cases:
        expected_verify = expected if expected in VERIFY_FAILURES else OK
        got = _outcome(partial(_open, env, recipient))
        got_verify = _outcome(partial(_verify, env))
        if (got, got_verify) != (expected, expected_verify):
            raise SystemExit(
                f"{name}: expected {expected}/{expected_verify}, got {got}/{got_verify}"
            )
        entry: dict[str, Any] = {
            "name": name,
            "description": description,
            "envelope": env.SerializeToString().hex(),
            "recipient": recipient,
            "expected": str(expected),
            "expected_verify": str(expected_verify),
        }
        if expected == OK:
            entry["plaintext_sha256"] = hashlib.sha256(_open(env, recipient)).hexdigest()
        vectors.append(entry)
    return {
        "description": "Coalition v2 envelopes (coalition/envelope_v2.py): valid ones and broken "
        "ones. Keys derive from public labels in tests/vector_keys.py. "
        "Generated by scripts/make_envelope_v2_vectors.py.",
        "sender": "KOR",
        "topic": TOPIC,
        "content_type": INTEL_SUMMARY,
        "keys": vector_keys.public_summary_v2(),
        "vectors": vectors,
    }


def _open(env: envelope_pb2.Envelope, recipient: str) -> bytes:
    epochs = RecipientEpochs(recipient, vector_keys.partner(recipient).keys)
    return envelope_v2.open(env, epochs=epochs, signer=vector_keys.hybrid_signer).plaintext


def _verify(env: envelope_pb2.Envelope) -> None:
    envelope_v2.verify(env, vector_keys.hybrid_signer)


def _outcome(run: Callable[[], object]) -> str:
    try:
        run()
    except InvalidEnvelopeV2 as exc:
        return exc.reason.value
    return OK


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    data = build()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    for v in data["vectors"]:
        print(f"{v['name']:34} {v['expected']:16} verify={v['expected_verify']}")


if __name__ == "__main__":
    main()
