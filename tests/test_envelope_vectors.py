"""Run the committed envelope vectors (tests/vectors/envelopes.json) against coalition.envelope.

Regenerate with scripts/make_envelope_vectors.py (then commit the output).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from coalition import envelope
from coalition.envelope import INTEL_SUMMARY, Failure, InvalidEnvelope
from coalition.v1 import envelope_pb2, intel_pb2, label_pb2
from tests import vector_keys

VECTORS_FILE = Path(__file__).parent / "vectors" / "envelopes.json"
DATA: dict[str, Any] = json.loads(VECTORS_FILE.read_text())
VECTORS: list[dict[str, Any]] = DATA["vectors"]

# Every breakage the vectors must cover, with the failure open() must report.
REQUIRED = {
    "valid": "ok",
    "ciphertext_bit_flipped": "digest_mismatch",
    "label_altered": "bad_signature",
    "sender_altered": "bad_signature",
    "wrong_recipient": "not_a_recipient",
    "signature_truncated": "bad_signature",
    "wrapped_keys_swapped": "bad_signature",
    "wrapped_keys_swapped_resigned": "unwrap_failed",
    "replayed_header_new_payload": "digest_mismatch",
}
# What the broker's verify() can see; the other failures need the recipient's key.
VERIFY_FAILURES = {"malformed", "unknown_sender", "bad_signature", "digest_mismatch"}


def _envelope(vector: dict[str, Any]) -> envelope_pb2.Envelope:
    return envelope_pb2.Envelope.FromString(bytes.fromhex(vector["envelope"]))


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_open(vector: dict[str, Any]) -> None:
    env = _envelope(vector)
    recipient = vector["recipient"]
    keys = vector_keys.partner(recipient).keys
    if vector["expected"] == "ok":
        opened = envelope.open(env, recipient=recipient, keys=keys, signer=vector_keys.signer)
        assert hashlib.sha256(opened.plaintext).hexdigest() == vector["plaintext_sha256"]
        summary = intel_pb2.IntelSummary.FromString(opened.plaintext)
        assert summary.reliability == intel_pb2.RELIABILITY_B
        assert opened.header.sender == DATA["sender"]
        assert opened.header.topic == DATA["topic"]
        assert opened.header.content_type == DATA["content_type"] == INTEL_SUMMARY
        assert opened.header.label.classification == label_pb2.SECRET
        assert list(opened.header.label.categories[0].values) == ["KOR", "USA", "GBR"]
    else:
        with pytest.raises(InvalidEnvelope) as info:
            envelope.open(env, recipient=recipient, keys=keys, signer=vector_keys.signer)
        assert info.value.reason == Failure(vector["expected"])
        assert str(info.value).startswith(vector["expected"] + ": ")


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_verify(vector: dict[str, Any]) -> None:
    env = _envelope(vector)
    if vector["expected_verify"] == "ok":
        header = envelope.verify(env, vector_keys.signer)
        assert header == envelope.parse_header(env)
    else:
        with pytest.raises(InvalidEnvelope) as info:
            envelope.verify(env, vector_keys.signer)
        assert info.value.reason == Failure(vector["expected_verify"])


def test_every_listed_breakage_is_present() -> None:
    found = {v["name"]: v["expected"] for v in VECTORS}
    assert {name: found.get(name) for name in REQUIRED} == REQUIRED


def test_every_failure_is_exercised() -> None:
    assert {v["expected"] for v in VECTORS} == {"ok"} | {f.value for f in Failure}


def test_vector_fields_are_consistent() -> None:
    names = [v["name"] for v in VECTORS]
    assert len(names) == len(set(names))
    for v in VECTORS:
        assert set(v) >= {"name", "description", "envelope", "recipient", "expected"}
        assert v["recipient"] in vector_keys.PARTNERS
        expected_verify = v["expected"] if v["expected"] in VERIFY_FAILURES else "ok"
        assert v["expected_verify"] == expected_verify, v["name"]
        assert ("plaintext_sha256" in v) == (v["expected"] == "ok"), v["name"]


def test_key_derivation_matches_the_vectors() -> None:
    assert DATA["keys"] == vector_keys.public_summary()


def test_no_private_key_bytes_in_the_vectors() -> None:
    text = VECTORS_FILE.read_text().lower()
    for code in vector_keys.PARTNERS:
        p = vector_keys.partner(code)
        secrets = [
            p.hpke_key.private_bytes(),
            p.signing_key.private_bytes_raw(),
        ]
        for secret in secrets:
            assert secret.hex() not in text
            assert secret[:16].hex() not in text
