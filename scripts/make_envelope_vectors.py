"""Write tests/vectors/envelopes.json: one valid envelope and each way of breaking it.

Inputs are fixed (keys derived from public labels in tests/vector_keys.py, fixed
message ids and times); HPKE encapsulation, the data key and the nonce are random,
so each run writes different bytes. Run once and commit the output:

    .venv/bin/python scripts/make_envelope_vectors.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coalition.envelope import INTEL_SUMMARY, Failure, InvalidEnvelope, open, seal, verify  # noqa: E402
from coalition.pae import HEADER_TYPE, pae  # noqa: E402
from coalition.v1 import envelope_pb2, intel_pb2, label_pb2  # noqa: E402
from tests import vector_keys  # noqa: E402

OUT = ROOT / "tests" / "vectors" / "envelopes.json"
CREATED_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
TOPIC = "intel.ground.kor"
OK = "ok"
DIGEST_FIELD_PREFIX = bytes([(9 << 3) | 2, 32])
# Failures the broker's verify() can report; the others need decryption.
VERIFY_FAILURES: set[str] = {
    Failure.MALFORMED,
    Failure.UNKNOWN_SENDER,
    Failure.BAD_SIGNATURE,
    Failure.DIGEST_MISMATCH,
}


def label() -> label_pb2.Label:
    """NATO SECRET // REL TO KOR, USA, GBR, built directly from the proto."""
    return label_pb2.Label(
        policy="NATO",
        classification=label_pb2.SECRET,
        categories=[
            label_pb2.Category(
                name="REL TO", type=label_pb2.PERMISSIVE, values=["KOR", "USA", "GBR"]
            )
        ],
        origination_time_ms=CREATED_MS,
        originator="KOR",
    )


def intel(title: str, summary: str) -> bytes:
    return intel_pb2.IntelSummary(
        title=title,
        summary=summary,
        area=intel_pb2.AreaOfInterest(
            name="Sector 7", south=37.5, west=126.5, north=38.3, east=127.6
        ),
        window_start_ms=CREATED_MS - 3_600_000,
        window_end_ms=CREATED_MS,
        reliability=intel_pb2.RELIABILITY_B,
        credibility=intel_pb2.CREDIBILITY_2,
    ).SerializeToString()


def seal_from_kor(plaintext: bytes, message_id: str, sequence: int) -> envelope_pb2.Envelope:
    kor = vector_keys.partner("KOR")
    return seal(
        plaintext=plaintext,
        sender="KOR",
        signing_key=kor.signing_key,
        signing_key_id=kor.signing_key_id,
        sequence=sequence,
        topic=TOPIC,
        label=label(),
        precedence=label_pb2.PRIORITY,
        content_type=INTEL_SUMMARY,
        recipients=[vector_keys.partner("USA").recipient, vector_keys.partner("GBR").recipient],
        created_ms=CREATED_MS,
        message_id=message_id,
    )


def header_bytes(header: envelope_pb2.Header) -> bytes:
    """The layout seal() writes: header without digest, then the digest field last."""
    body = envelope_pb2.Header()
    body.CopyFrom(header)
    body.ClearField("payload_digest")
    return body.SerializeToString() + DIGEST_FIELD_PREFIX + header.payload_digest


def edit_header(
    env: envelope_pb2.Envelope,
    change: Callable[[envelope_pb2.Header], None],
    *,
    resign: bool = False,
) -> envelope_pb2.Envelope:
    header = envelope_pb2.Header.FromString(env.header)
    change(header)
    out = envelope_pb2.Envelope()
    out.CopyFrom(env)
    out.header = header_bytes(header)
    if resign:
        out.signature = vector_keys.signing_key("KOR").sign(pae(HEADER_TYPE, out.header))
    return out


def flip_bit(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def build() -> dict[str, Any]:
    plaintext = intel("Armour movement near Sector 7", "Two companies moving south at dusk.")
    valid = seal_from_kor(plaintext, "00112233445566778899aabbccddeeff", 1)
    other = seal_from_kor(
        intel("Bridge repaired", "Crossing 4 usable again."), "ffeeddccbbaa99887766554433221100", 2
    )
    assert header_bytes(envelope_pb2.Header.FromString(valid.header)) == valid.header

    def mutated(**fields: bytes) -> envelope_pb2.Envelope:
        out = envelope_pb2.Envelope()
        out.CopyFrom(valid)
        for name, value in fields.items():
            setattr(out, name, value)
        return out

    def downgrade(h: envelope_pb2.Header) -> None:
        h.label.classification = label_pb2.RESTRICTED

    def widen(h: envelope_pb2.Header) -> None:
        h.label.categories[0].values.append("UKR")

    def impersonate_usa(h: envelope_pb2.Header) -> None:
        h.sender = "USA"
        h.signing_key_id = vector_keys.signing_key_id("USA")

    def unknown_sender(h: envelope_pb2.Header) -> None:
        h.sender = "ZZZ"

    def swap_wrapped(h: envelope_pb2.Header) -> None:
        usa, gbr = h.wrapped_keys
        assert (usa.recipient, gbr.recipient) == ("USA", "GBR")
        usa.wrapped, gbr.wrapped = gbr.wrapped, usa.wrapped

    def sequence_zero(h: envelope_pb2.Header) -> None:
        h.sequence = 0

    flipped_ct = flip_bit(valid.ciphertext, len(valid.ciphertext) // 2)

    def digest_of_flipped(h: envelope_pb2.Header) -> None:
        h.payload_digest = hashlib.sha256(flipped_ct).digest()

    canonical = envelope_pb2.Envelope()
    canonical.CopyFrom(valid)
    canonical.header = envelope_pb2.Header.FromString(valid.header).SerializeToString()
    canonical.signature = vector_keys.signing_key("KOR").sign(pae(HEADER_TYPE, canonical.header))

    cases: list[tuple[str, str, envelope_pb2.Envelope, str, str]] = [
        ("valid", "KOR to USA and GBR, opened by USA", valid, "USA", OK),
        ("valid_for_gbr", "the same envelope opened by GBR", valid, "GBR", OK),
        (
            "ciphertext_bit_flipped",
            "one bit of the ciphertext flipped",
            mutated(ciphertext=flipped_ct),
            "USA",
            Failure.DIGEST_MISMATCH,
        ),
        (
            "ciphertext_bit_flipped_resigned",
            "one ciphertext bit flipped and the sender re-signed a header with its digest",
            edit_header(mutated(ciphertext=flipped_ct), digest_of_flipped, resign=True),
            "USA",
            Failure.DECRYPT_FAILED,
        ),
        (
            "label_altered",
            "header label downgraded to RESTRICTED, signature kept",
            edit_header(valid, downgrade),
            "USA",
            Failure.BAD_SIGNATURE,
        ),
        (
            "label_rel_to_widened",
            "UKR added to REL TO in the header label, signature kept",
            edit_header(valid, widen),
            "USA",
            Failure.BAD_SIGNATURE,
        ),
        (
            "sender_altered",
            "header sender and signing key id changed to USA's, signature kept",
            edit_header(valid, impersonate_usa),
            "GBR",
            Failure.BAD_SIGNATURE,
        ),
        (
            "sender_unknown",
            "header sender changed to a partner absent from the directory",
            edit_header(valid, unknown_sender),
            "USA",
            Failure.UNKNOWN_SENDER,
        ),
        (
            "wrong_recipient",
            "opened by UKR, which no key was wrapped for",
            valid,
            "UKR",
            Failure.NOT_A_RECIPIENT,
        ),
        (
            "signature_truncated",
            "last byte of the signature removed",
            mutated(signature=valid.signature[:-1]),
            "USA",
            Failure.BAD_SIGNATURE,
        ),
        (
            "wrapped_keys_swapped",
            "wrapped keys of USA and GBR exchanged in the header, not re-signed",
            edit_header(valid, swap_wrapped),
            "USA",
            Failure.BAD_SIGNATURE,
        ),
        (
            "wrapped_keys_swapped_resigned",
            "wrapped keys of USA and GBR exchanged and the header re-signed by the sender",
            edit_header(valid, swap_wrapped, resign=True),
            "USA",
            Failure.UNWRAP_FAILED,
        ),
        (
            "replayed_header_new_payload",
            "header and signature of message A with the ciphertext of message B",
            mutated(ciphertext=other.ciphertext),
            "USA",
            Failure.DIGEST_MISMATCH,
        ),
        (
            "header_truncated",
            "last byte of the header removed",
            mutated(header=valid.header[:-1]),
            "USA",
            Failure.MALFORMED,
        ),
        (
            "sequence_zero_resigned",
            "header sequence set to 0 and re-signed by the sender",
            edit_header(valid, sequence_zero, resign=True),
            "USA",
            Failure.MALFORMED,
        ),
        (
            "digest_not_last_resigned",
            "header re-serialized in field order (digest not last) and re-signed",
            canonical,
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
            entry["plaintext_sha256"] = hashlib.sha256(plaintext).hexdigest()
        vectors.append(entry)
    return {
        "description": "Coalition envelopes (coalition/envelope.py): one valid, the rest broken. "
        "Keys derive from public labels in tests/vector_keys.py. "
        "Generated by scripts/make_envelope_vectors.py.",
        "sender": "KOR",
        "topic": TOPIC,
        "content_type": INTEL_SUMMARY,
        "keys": vector_keys.public_summary(),
        "vectors": vectors,
    }


def _open(env: envelope_pb2.Envelope, recipient: str) -> bytes:
    keys = vector_keys.partner(recipient).keys
    return open(env, recipient=recipient, keys=keys, signer=vector_keys.signer).plaintext


def _verify(env: envelope_pb2.Envelope) -> None:
    verify(env, vector_keys.signer)


def _outcome(run: Callable[[], object]) -> str:
    try:
        run()
    except InvalidEnvelope as exc:
        return exc.reason.value
    return "ok"


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
