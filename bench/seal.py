"""Envelope seal/open/verify cost: ``python -m bench.seal [--json] [--seconds S] [--messages N]``.

1 KiB payload. First v1 alone: seal to 1, 3 and 10 recipients (one HPKE
ML-KEM-768+X25519 encapsulation each), open by one recipient, and verify (the broker's
check, no decryption); then the bare Ed25519 check on the same bytes with OpenSSL
(cryptography) and with libsodium (what coalition.ed25519 uses). Each case runs for
about ``--seconds`` after a short warm-up.

Then v1 and v2 side by side (``bench.seal_v2``), per message, at batch sizes 1, 16
and 256, 3 recipients.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import cryptography
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bench import seal_v2
from coalition import ed25519, envelope
from coalition.envelope import INTEL_SUMMARY, Recipient
from coalition.hpke import HpkePrivateKey
from coalition.pae import HEADER_TYPE, pae
from coalition.v1 import envelope_pb2, label_pb2

PAYLOAD = os.urandom(1024)
LABEL = label_pb2.Label(
    policy="NATO",
    classification=label_pb2.SECRET,
    categories=[label_pb2.Category(name="REL TO", type=label_pb2.PERMISSIVE, values=["NATO"])],
)
SIGNING_KEY = Ed25519PrivateKey.generate()
PARTNERS = [f"P{i:02d}" for i in range(10)]
HPKE = {p: HpkePrivateKey.generate() for p in PARTNERS}


@dataclass(frozen=True)
class Result:
    case: str
    recipients: int
    iterations: int
    median_us: float
    p90_us: float
    ops_per_s: float


def _signer(sender: str, key_id: str) -> Ed25519PublicKey:
    return SIGNING_KEY.public_key()


def _seal(n: int) -> envelope_pb2.Envelope:
    return envelope.seal(
        plaintext=PAYLOAD,
        sender="KOR",
        signing_key=SIGNING_KEY,
        signing_key_id="bench",
        sequence=1,
        topic="bench.seal",
        label=LABEL,
        precedence=label_pb2.ROUTINE,
        content_type=INTEL_SUMMARY,
        recipients=[Recipient(p, p, HPKE[p].public_key()) for p in PARTNERS[:n]],
        created_ms=0,
    )


def _measure(case: str, recipients: int, run: Callable[[], object], seconds: float) -> Result:
    for _ in range(20):  # warm-up
        run()
    samples: list[int] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 50:
        start = time.perf_counter_ns()
        run()
        samples.append(time.perf_counter_ns() - start)
    median = statistics.median(samples) / 1000
    p90 = statistics.quantiles(samples, n=10)[-1] / 1000
    return Result(case, recipients, len(samples), median, p90, 1e6 / median)


def run(seconds: float) -> list[Result]:
    results = [_measure("seal", n, partial(_seal, n), seconds) for n in (1, 3, 10)]
    sealed = _seal(3)
    keys = {PARTNERS[0]: HPKE[PARTNERS[0]]}
    results.append(
        _measure(
            "open",
            3,
            lambda: envelope.open(sealed, recipient=PARTNERS[0], keys=keys, signer=_signer),
            seconds,
        )
    )
    results.append(_measure("verify", 3, lambda: envelope.verify(sealed, _signer), seconds))
    # The bare signature check, both libraries, on the bytes envelope.verify signs over:
    # the reason coalition.ed25519 uses libsodium (see README, Dependencies).
    signed, public = pae(HEADER_TYPE, sealed.header), SIGNING_KEY.public_key()
    results.append(
        _measure("ed25519-openssl", 0, lambda: public.verify(sealed.signature, signed), seconds)
    )
    results.append(
        _measure(
            "ed25519-libsodium",
            0,
            lambda: ed25519.verify(public, sealed.signature, signed),
            seconds,
        )
    )
    return results


def _table(results: list[Result]) -> str:
    lines = [
        f"{'case':18} {'recipients':>10} {'n':>7} {'median µs':>10} {'p90 µs':>10} {'ops/s':>9}"
    ]
    for r in results:
        lines.append(
            f"{r.case:18} {r.recipients:>10} {r.iterations:>7} {r.median_us:>10.1f} "
            f"{r.p90_us:>10.1f} {r.ops_per_s:>9.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Envelope seal/open benchmark (1 KiB payload).")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per case (default 2)")
    parser.add_argument(
        "--messages",
        type=int,
        default=2048,
        help="messages per batch size in the v1/v2 comparison (default 2048)",
    )
    args = parser.parse_args(argv)
    results = run(args.seconds)
    comparison = seal_v2.compare(args.messages)
    if args.json:
        print(
            json.dumps(
                {
                    "benchmark": "envelope",
                    "payload_bytes": len(PAYLOAD),
                    "python": platform.python_version(),
                    "cryptography": cryptography.__version__,
                    "machine": platform.machine(),
                    "results": [asdict(r) for r in results],
                    "v1_v2": seal_v2.as_json(comparison),
                },
                indent=2,
            )
        )
    else:
        print(f"envelope, {len(PAYLOAD)} B payload, cryptography {cryptography.__version__}")
        print(_table(results))
        print()
        print(seal_v2.table(comparison))


if __name__ == "__main__":
    main()
