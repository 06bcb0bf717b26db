"""Envelope v1 beside v2, per message, at batch sizes 1, 16 and 256 (part of ``bench.seal``).

One sender (KOR) seals 1 KiB messages to 3 recipients. For each version and batch
size the run measures, per message:

- ``seal``: the sender's CPU time (v2: ``seal_batch`` over batches of that size, its
  epochs kept across batches, so epoch openings are amortized as they happen);
- ``verify``: the broker's CPU time per envelope (v2: one root cache kept across batches);
- ``open``: one recipient's CPU time per message (v2: its epoch KEK cache and root
  cache kept across batches);
- public-key work: the checks and decapsulations actually made (counted) times their
  unit cost (median wall time) measured in the same process. ``broker sig`` is
  signature checking per envelope; ``recipient PK`` is signature checking plus HPKE
  decapsulation per message.
  Every v2 root check verifies both halves (Ed25519 and ML-DSA-65).

v1 has no batches: its row is measured once and printed beside each v2 row.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from coalition import ed25519, envelope, envelope_v2
from coalition.envelope import INTEL_SUMMARY, Recipient
from coalition.envelope_v2 import Message, RootCache
from coalition.epoch import EpochPolicy, RecipientEpochs, SenderEpochs
from coalition.hpke import SUITE, HpkePrivateKey
from coalition.hybrid import HybridPublicKey, HybridSigningKey
from coalition.pae import BATCH_ROOT_TYPE
from coalition.v1 import envelope_pb2, label_pb2

BATCH_SIZES = (1, 16, 256)
RECIPIENTS = 3
# Targets for batches of 16 and more, per message.
RECIPIENT_PK_TARGET_US = 15.0
BROKER_SIG_TARGET_US = 10.0

PAYLOAD = os.urandom(1024)
LABEL = label_pb2.Label(
    policy="NATO",
    classification=label_pb2.SECRET,
    categories=[label_pb2.Category(name="REL TO", type=label_pb2.PERMISSIVE, values=["NATO"])],
)
V1_KEY = Ed25519PrivateKey.generate()
V2_KEY = HybridSigningKey.generate()
PARTNERS = [f"P{i:02d}" for i in range(RECIPIENTS)]
HPKE = {p: HpkePrivateKey.generate() for p in PARTNERS}
READER = PARTNERS[0]
POLICY = EpochPolicy()


@dataclass(frozen=True)
class UnitCosts:
    """Median cost of each public-key operation, µs."""

    ed25519_verify_us: float
    hybrid_verify_us: float
    hpke_decap_us: float


@dataclass(frozen=True)
class Row:
    version: str
    batch: int
    messages: int
    seal_us: float
    verify_us: float
    broker_sig_us: float
    open_us: float
    recipient_pk_us: float
    broker_signature_checks: int
    recipient_signature_checks: int
    recipient_decapsulations: int


@dataclass(frozen=True)
class Comparison:
    units: UnitCosts
    rows: list[Row]


def _median_us(run: Callable[[], object], n: int = 200) -> float:
    for _ in range(10):
        run()
    samples = []
    for _ in range(n):
        start = time.perf_counter_ns()
        run()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


def unit_costs() -> UnitCosts:
    """Ed25519 check (libsodium), hybrid root check, HPKE decapsulation of a 32-byte key."""
    body = b"x" * 120
    ed_sig = V1_KEY.sign(body)
    ed_pub = V1_KEY.public_key()
    hybrid_sig = V2_KEY.sign(BATCH_ROOT_TYPE, body)
    hybrid_pub = V2_KEY.public_key()
    private = HPKE[READER]
    wrapped = SUITE.encrypt(bytes(32), private.public_key().to_hpke(), info=b"bench")
    return UnitCosts(
        ed25519_verify_us=_median_us(lambda: ed25519.verify(ed_pub, ed_sig, body)),
        hybrid_verify_us=_median_us(lambda: hybrid_pub.verify(hybrid_sig, BATCH_ROOT_TYPE, body)),
        hpke_decap_us=_median_us(lambda: SUITE.decrypt(wrapped, private.to_hpke(), info=b"bench")),
    )


def _recipients(sequence: int) -> list[Recipient]:
    return [Recipient(p, p, HPKE[p].public_key(), sequence) for p in PARTNERS]


def _v1_signer(sender: str, key_id: str) -> Ed25519PublicKey:
    return V1_KEY.public_key()


def _v2_signer(sender: str, key_id: str) -> HybridPublicKey:
    return V2_KEY.public_key()


def _timed(run: Callable[[], object]) -> float:
    """CPU time of this process, µs: steadier than wall time on a shared host."""
    start = time.process_time_ns()
    run()
    return (time.process_time_ns() - start) / 1000


def v1_row(messages: int, units: UnitCosts) -> Row:
    sealed: list[envelope_pb2.Envelope] = []

    def seal_all() -> None:
        for i in range(messages):
            sealed.append(
                envelope.seal(
                    plaintext=PAYLOAD,
                    sender="KOR",
                    signing_key=V1_KEY,
                    signing_key_id="bench",
                    sequence=i + 1,
                    topic="bench.seal",
                    label=LABEL,
                    precedence=label_pb2.ROUTINE,
                    content_type=INTEL_SUMMARY,
                    recipients=_recipients(i + 1),
                    created_ms=0,
                )
            )

    keys = {READER: HPKE[READER]}
    seal_us = _timed(seal_all)
    verify_us = _timed(lambda: [envelope.verify(e, _v1_signer) for e in sealed])
    open_us = _timed(
        lambda: [envelope.open(e, recipient=READER, keys=keys, signer=_v1_signer) for e in sealed]
    )
    return Row(
        version="v1",
        batch=1,
        messages=messages,
        seal_us=seal_us / messages,
        verify_us=verify_us / messages,
        broker_sig_us=units.ed25519_verify_us,
        open_us=open_us / messages,
        recipient_pk_us=units.ed25519_verify_us + units.hpke_decap_us,
        broker_signature_checks=messages,
        recipient_signature_checks=messages,
        recipient_decapsulations=messages,
    )


def v2_row(batch: int, messages: int, units: UnitCosts) -> Row:
    epochs = SenderEpochs("KOR", POLICY)
    pending = [
        Message(
            plaintext=PAYLOAD,
            topic="bench.seal",
            label=LABEL,
            precedence=label_pb2.ROUTINE,
            content_type=INTEL_SUMMARY,
            recipients=_recipients(i + 1),
            sequence=i + 1,
            created_ms=0,
        )
        for i in range(messages)
    ]
    sealed: list[envelope_pb2.Envelope] = []

    def seal_all() -> None:
        for start in range(0, messages, batch):
            sealed.extend(
                envelope_v2.seal_batch(
                    pending[start : start + batch],
                    sender="KOR",
                    signing_key=V2_KEY,
                    signing_key_id="bench",
                    epochs=epochs,
                    created_ms=0,
                )
            )

    broker_roots, reader_roots = RootCache(), RootCache()
    reader = RecipientEpochs(READER, {READER: HPKE[READER]})
    seal_us = _timed(seal_all)
    verify_us = _timed(lambda: [envelope_v2.verify(e, _v2_signer, broker_roots) for e in sealed])
    open_us = _timed(
        lambda: [
            envelope_v2.open(e, epochs=reader, signer=_v2_signer, roots=reader_roots)
            for e in sealed
        ]
    )
    return Row(
        version="v2",
        batch=batch,
        messages=messages,
        seal_us=seal_us / messages,
        verify_us=verify_us / messages,
        broker_sig_us=broker_roots.verifications * units.hybrid_verify_us / messages,
        open_us=open_us / messages,
        recipient_pk_us=(
            reader_roots.verifications * units.hybrid_verify_us
            + reader.decapsulations * units.hpke_decap_us
        )
        / messages,
        broker_signature_checks=broker_roots.verifications,
        recipient_signature_checks=reader_roots.verifications,
        recipient_decapsulations=reader.decapsulations,
    )


def compare(messages: int = 2048) -> Comparison:
    """Measure v1 once and v2 at every batch size over ``messages`` messages each."""
    units = unit_costs()
    rows = [v1_row(messages, units)]
    rows += [v2_row(b, messages, units) for b in BATCH_SIZES]
    return Comparison(units, rows)


def table(c: Comparison) -> str:
    """The comparison as text: v1 beside v2 at each batch size, then the targets."""
    u = c.units
    v1 = c.rows[0]
    lines = [
        f"v1 and v2 per message: {len(PAYLOAD)} B payload, {RECIPIENTS} recipients, "
        f"{v1.messages} messages per row; v2 epochs roll every {POLICY.max_messages} messages",
        f"unit costs: Ed25519 check {u.ed25519_verify_us:.1f} µs, hybrid root check "
        f"(Ed25519 + ML-DSA-65) {u.hybrid_verify_us:.1f} µs, HPKE decapsulation "
        f"{u.hpke_decap_us:.1f} µs",
        f"{'version':7} {'batch':>5} {'seal µs':>9} {'verify µs':>10} {'broker sig µs':>14} "
        f"{'open µs':>9} {'recipient PK µs':>16} {'sig checks':>11} {'decaps':>7}",
        "(seal, verify, open: CPU time per message; broker sig, recipient PK: checks and "
        "decapsulations made, times their unit cost)",
    ]
    for row in c.rows[1:]:
        for r, batch in ((v1, "-"), (row, str(row.batch))):
            lines.append(
                f"{r.version:7} {batch:>5} {r.seal_us:>9.1f} {r.verify_us:>10.1f} "
                f"{r.broker_sig_us:>14.1f} {r.open_us:>9.1f} {r.recipient_pk_us:>16.1f} "
                f"{r.broker_signature_checks:>11} {r.recipient_decapsulations:>7}"
            )
    lines.append(
        f"targets at batch >= 16: recipient PK < {RECIPIENT_PK_TARGET_US:.0f} µs/message, "
        f"broker sig < {BROKER_SIG_TARGET_US:.0f} µs/envelope (both signatures checked)"
    )
    for r in c.rows[1:]:
        if r.batch >= 16:
            lines.append(
                f"  batch {r.batch:>3}: recipient PK {r.recipient_pk_us:.1f} µs "
                f"({_verdict(r.recipient_pk_us, RECIPIENT_PK_TARGET_US)}), broker sig "
                f"{r.broker_sig_us:.1f} µs ({_verdict(r.broker_sig_us, BROKER_SIG_TARGET_US)})"
            )
    smallest = math.ceil(u.hybrid_verify_us / BROKER_SIG_TARGET_US)
    lines.append(
        f"  with this host's hybrid root check, broker sig is under "
        f"{BROKER_SIG_TARGET_US:.0f} µs/envelope from a batch of {smallest}"
    )
    return "\n".join(lines)


def _verdict(value: float, target: float) -> str:
    return "met" if value < target else "NOT met"


def as_json(c: Comparison) -> dict[str, Any]:
    return {
        "payload_bytes": len(PAYLOAD),
        "recipients": RECIPIENTS,
        "epoch_max_messages": POLICY.max_messages,
        "units": asdict(c.units),
        "rows": [asdict(r) for r in c.rows],
    }
