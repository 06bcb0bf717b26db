"""The one workload every row runs: who publishes, who receives, what is sealed, the phases.

5 partners; KOR and USA publish, GBR, UKR and NATO receive. Each message is a 1 KiB
payload labelled ``NATO SECRET // REL TO GBR, UKR, NATO`` and sealed with
``coalition.envelope.seal`` for those 3 recipients. The whole run's messages are
sealed once, before any row starts (sealing costs about 1 ms of CPU per message
on this class of machine and would otherwise swamp the publishers), and every row
sends the same bytes, so the crypto work is identical across rows. Recipients
open (verify + unwrap + decrypt) every delivery inside the measured window.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from coalition import envelope as env
from coalition.labels import label_to_proto, parse_label
from coalition.pki import load_partner
from coalition.v1 import envelope_pb2, label_pb2

PARTNERS = ("KOR", "USA", "GBR", "UKR", "NATO")
PUBLISHERS = ("KOR", "USA")
RECEIVERS = ("GBR", "UKR", "NATO")
LABEL_TEXT = "NATO SECRET // REL TO GBR, UKR, NATO"
PAYLOAD_BYTES = 1024
OPERATORS = ("op1", "op2")


def topic_for(sender: str) -> str:
    """Coalition topic of a sender."""
    return f"intel.bench.{sender.lower()}"


SUBSCRIBE_TOPIC = "intel.bench.>"


def subject_for(sender: str) -> str:
    """NATS subject of a sender (NATS rows)."""
    return f"bench.{sender.lower()}"


SUBSCRIBE_SUBJECT = "bench.>"


@dataclass(frozen=True)
class Phase:
    """One measured step of a row.

    ``kind`` is ``closed`` (as fast as possible with at most ``window`` messages sent
    but not yet opened by every recipient) or ``open`` (sends scheduled at fixed times,
    ``rate`` messages/s, regardless of how the system keeps up).
    """

    name: str
    kind: str
    count: int
    rate: int = 0
    window: int = 0
    measured: bool = True
    # Closed loop: stop sending after this many seconds (0: no limit), so that a slow
    # row cannot stretch the run; only messages actually sent are counted.
    max_s: float = 0.0


@dataclass(frozen=True)
class Plan:
    """The phases every row runs, ``rounds`` times: the rows take turns (round 1 of
    every row, then round 2 of every row, ...), so each row is measured at several
    moments of the shared host's load, and each round uses fresh messages."""

    phases: tuple[Phase, ...]
    row_timeout_s: float
    rounds: int = 1

    @property
    def per_round(self) -> int:
        return sum(p.count for p in self.phases)

    @property
    def total(self) -> int:
        return self.rounds * self.per_round


WINDOW = 512


def plan_for(mode: str) -> Plan:
    """Sizes per mode: ``full`` (make bench), ``quick`` (make bench-quick), ``smoke`` (tests)."""
    sizes = {
        # rounds; per round: saturation messages and time cap, seconds at 500/s and 2000/s
        "full": (2, 6000, 20.0, 5.0, 1.0),
        "quick": (1, 1000, 5.0, 1.2, 0.25),
        "smoke": (2, 75, 0.0, 0.15, 0.04),
    }
    rounds, sat, cap, s500, s2000 = sizes[mode]
    warm = 100 if mode != "smoke" else 20
    return Plan(
        phases=(
            Phase("warmup", "closed", warm, window=WINDOW, measured=False),
            Phase("saturation", "closed", sat, window=WINDOW, max_s=cap),
            Phase("load-500", "open", int(500 * s500), rate=500),
            Phase("load-2000", "open", int(2000 * s2000), rate=2000),
        ),
        row_timeout_s=120.0 if mode == "full" else 60.0,
        rounds=rounds,
    )


# -- sealing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sealed:
    """Message k of the run: its publisher, id, and the serialized envelope."""

    sender: str
    message_id: str
    data: bytes


def sender_of(k: int) -> str:
    """Messages alternate between the publishers, so each phase is split evenly."""
    return PUBLISHERS[k % len(PUBLISHERS)]


def _seal_range(pki: str, sender: str, indices: Sequence[int], run_id: str) -> list[Sealed]:
    me = load_partner(Path(pki) / "partners" / sender)
    recipients = []
    for code in RECEIVERS:
        creds = load_partner(Path(pki) / "partners" / code)
        key_id = creds.current_key_id
        recipients.append(env.Recipient(code, key_id, creds.hpke_keys[key_id].public_key()))
    label = label_to_proto(parse_label(LABEL_TEXT))
    base = time.time_ns() // 1000  # as the SDK's Sequencer: time-based, strictly increasing
    now_ms = time.time_ns() // 1_000_000
    out = []
    for n, k in enumerate(indices):
        mid = f"{run_id}-{k:07d}"
        e = env.seal(
            plaintext=os.urandom(PAYLOAD_BYTES),
            sender=sender,
            signing_key=me.signing_key,
            signing_key_id=me.signing_key_id,
            sequence=base + n + 1,
            topic=topic_for(sender),
            label=label,
            precedence=label_pb2.ROUTINE,
            content_type=env.INTEL_SUMMARY,
            recipients=recipients,
            created_ms=now_ms,
            message_id=mid,
        )
        out.append(Sealed(sender, mid, e.SerializeToString()))
    return out


def seal_workload(pki: Path, total: int, out: Path) -> None:
    """Seal ``total`` messages (one process per publisher) and pickle them to ``out``."""
    run_id = os.urandom(4).hex()
    by_sender = {s: [k for k in range(total) if sender_of(k) == s] for s in PUBLISHERS}
    with ProcessPoolExecutor(len(PUBLISHERS), mp_context=get_context("spawn")) as pool:
        futures = {
            s: pool.submit(_seal_range, str(pki), s, idx, run_id) for s, idx in by_sender.items()
        }
        sealed = {s: f.result() for s, f in futures.items()}
    merged: list[Sealed] = []
    cursors = dict.fromkeys(PUBLISHERS, 0)
    for k in range(total):
        s = sender_of(k)
        merged.append(sealed[s][cursors[s]])
        cursors[s] += 1
    out.write_bytes(pickle.dumps(merged, protocol=pickle.HIGHEST_PROTOCOL))


def load_workload(path: Path) -> list[Sealed]:
    loaded: list[Sealed] = pickle.loads(path.read_bytes())
    return loaded


# -- opening -------------------------------------------------------------------------------


class Opener:
    """What a recipient holds to open: its HPKE keys and the senders' certified signing keys.

    Used by the rows that have no directory service; the coalition row opens through
    ``PartnerClient.open`` (same ``env.open``, signer from the CA-verified directory).
    """

    def __init__(self, pki: Path, code: str) -> None:
        self.code = code
        self.keys = load_partner(pki / "partners" / code).hpke_keys
        self._signers: dict[tuple[str, str], Ed25519PublicKey] = {}
        for sender in PUBLISHERS:
            c = load_partner(pki / "partners" / sender)
            self._signers[(sender, c.signing_key_id)] = c.signing_key.public_key()

    def signer(self, sender: str, key_id: str) -> Ed25519PublicKey:
        return self._signers[(sender, key_id)]

    def open(self, data: bytes) -> str:
        """Parse, verify and decrypt; returns the message id. Raises env.InvalidEnvelope."""
        e = envelope_pb2.Envelope.FromString(data)
        return self.open_envelope(e)

    def open_envelope(self, e: envelope_pb2.Envelope) -> str:
        opened = env.open(e, recipient=self.code, keys=self.keys, signer=self.signer)
        return opened.header.message_id
