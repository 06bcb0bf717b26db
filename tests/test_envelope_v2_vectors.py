"""Run the committed v2 vectors (tests/vectors/envelopes_v2.json) against coalition.envelope_v2.

Regenerate with scripts/make_envelope_v2_vectors.py (then commit the output).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from coalition import envelope_v2
from coalition.envelope import INTEL_SUMMARY
from coalition.envelope_v2 import Failure, InvalidEnvelopeV2, RootCache
from coalition.epoch import RecipientEpochs
from coalition.v1 import envelope_pb2, intel_pb2, label_pb2
from tests import vector_keys

VECTORS_FILE = Path(__file__).parent / "vectors" / "envelopes_v2.json"
DATA: dict[str, Any] = json.loads(VECTORS_FILE.read_text())
VECTORS: list[dict[str, Any]] = DATA["vectors"]

# Every breakage the vectors must cover, with the failure open() must report.
REQUIRED = {
    "valid": "ok",
    "valid_after_roll": "ok",
    "wrong_path": "bad_path",
    "swapped_leaf": "bad_path",
    "label_altered": "bad_path",
    "root_signed_by_ed25519_only": "bad_signature",
    "root_signed_by_ml_dsa_only": "bad_signature",
    "root_ml_dsa_from_another_key": "bad_signature",
    "root_altered": "bad_signature",
    "epoch_key_for_another_recipient": "unwrap_failed",
    "old_epoch_key_spliced": "unwrap_failed",
    "label_widened_resigned": "unwrap_failed",
    "ciphertext_bit_flipped": "digest_mismatch",
    "wrong_recipient": "not_a_recipient",
}
VERIFY_FAILURES = {"malformed", "unknown_sender", "bad_path", "bad_signature", "digest_mismatch"}


def _envelope(vector: dict[str, Any]) -> envelope_pb2.Envelope:
    return envelope_pb2.Envelope.FromString(bytes.fromhex(vector["envelope"]))


def _open(vector: dict[str, Any], roots: RootCache | None = None) -> envelope_v2.OpenedV2:
    recipient = vector["recipient"]
    epochs = RecipientEpochs(recipient, vector_keys.partner(recipient).keys)
    return envelope_v2.open(
        _envelope(vector), epochs=epochs, signer=vector_keys.hybrid_signer, roots=roots
    )


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_open(vector: dict[str, Any]) -> None:
    if vector["expected"] == "ok":
        opened = _open(vector)
        assert hashlib.sha256(opened.plaintext).hexdigest() == vector["plaintext_sha256"]
        summary = intel_pb2.IntelSummary.FromString(opened.plaintext)
        assert summary.reliability == intel_pb2.RELIABILITY_B
        assert opened.header.sender == DATA["sender"]
        assert opened.header.topic == DATA["topic"]
        assert opened.header.content_type == DATA["content_type"] == INTEL_SUMMARY
        assert opened.header.label.classification == label_pb2.SECRET
        assert list(opened.header.label.categories[0].values) == ["KOR", "USA", "GBR"]
        assert opened.sequence == opened.header.sequence
    else:
        with pytest.raises(InvalidEnvelopeV2) as info:
            _open(vector)
        assert info.value.reason == Failure(vector["expected"])
        assert str(info.value).startswith(vector["expected"] + ": ")


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_verify(vector: dict[str, Any]) -> None:
    env = _envelope(vector)
    if vector["expected_verify"] == "ok":
        verified = envelope_v2.verify(env, vector_keys.hybrid_signer)
        assert verified.header == envelope_v2.parse_v2(env)[0]
    else:
        with pytest.raises(InvalidEnvelopeV2) as info:
            envelope_v2.verify(env, vector_keys.hybrid_signer)
        assert info.value.reason == Failure(vector["expected_verify"])


def test_a_root_cache_changes_no_outcome() -> None:
    """Valid vectors first, so every root is cached before the broken ones are checked."""
    roots = RootCache()
    for vector in sorted(VECTORS, key=lambda v: v["expected"] != "ok"):
        try:
            _open(vector, roots)
            outcome = "ok"
        except InvalidEnvelopeV2 as exc:
            outcome = exc.reason.value
        assert outcome == vector["expected"], vector["name"]


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
        assert envelope_v2.is_v2(_envelope(v))


def test_key_derivation_matches_the_vectors() -> None:
    assert DATA["keys"] == vector_keys.public_summary_v2()


def test_no_private_key_bytes_in_the_vectors() -> None:
    text = VECTORS_FILE.read_text().lower()
    for code in vector_keys.PARTNERS:
        p = vector_keys.partner(code)
        for secret in (p.hpke_key.private_bytes(), vector_keys.hybrid_key(code).private_bytes()):
            assert secret.hex() not in text
            assert secret[:16].hex() not in text
