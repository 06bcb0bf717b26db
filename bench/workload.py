"""The one workload every row runs: who publishes, who receives, what is sealed, the phases.

5 partners; KOR and USA publish, GBR, UKR and NATO receive. Each message is a 1 KiB
payload labelled ``NATO SECRET // REL TO GBR, UKR, NATO`` and sealed for those 3
recipients: as envelope v2 by default (``coalition.envelope_v2.seal_batch``, each
publisher's messages in batches of ``SEAL_BATCH`` under one hybrid-signed root, one
epoch per recipient), or as v1 (``coalition.envelope.seal``, one signature and one
HPKE encapsulation per recipient per message) with ``--envelope v1``. The whole run's
messages are sealed once, before any row starts (sealing would otherwise swamp the
publishers), and every row sends the same bytes, so the crypto work is identical
across rows. Recipients open (verify + unwrap + decrypt) every delivery inside the
measured window; v2 recipients keep a root cache and their epoch keys, as the SDK does.
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
from coalition import envelope_v2 as env2
from coalition.epoch import RecipientEpochs, SenderEpochs
from coalition.hybrid import HybridPublicKey
from coalition.labels import label_to_proto, parse_label
from coalition.pki import PartnerCredentials, load_partner
from coalition.v1 import envelope_pb2, label_pb2

PARTNERS = ("KOR", "USA", "GBR", "UKR", "NATO")
PUBLISHERS = ("KOR", "USA")
RECEIVERS = ("GBR", "UKR", "NATO")
LABEL_TEXT = "NATO SECRET // REL TO GBR, UKR, NATO"
PAYLOAD_BYTES = 1024
# v2: how many of one publisher's messages share a batch root. The SDK seals together
# the sends that wait while a seal runs; 16 is the batch size the per-message costs
# (make bench-seal) are quoted at.
SEAL_BATCH = 16
ENVELOPE_VERSIONS = ("v2", "v1")
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


def _seal_range(
    pki: str, sender: str, indices: Sequence[int], run_id: str, version: str
) -> list[Sealed]:
    me = load_partner(Path(pki) / "partners" / sender)
    recipients = []
    for code in RECEIVERS:
        creds = load_partner(Path(pki) / "partners" / code)
        key_id = creds.current_key_id
        recipients.append(env.Recipient(code, key_id, creds.hpke_keys[key_id].public_key()))
    label = label_to_proto(parse_label(LABEL_TEXT))
    base = time.time_ns() // 1000  # as the SDK's Sequencer: time-based, strictly increasing
    now_ms = time.time_ns() // 1_000_000
    if version == "v2":
        return _seal_range_v2(me, sender, indices, run_id, recipients, label, base, now_ms)
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


def _seal_range_v2(
    me: PartnerCredentials,
    sender: str,
    indices: Sequence[int],
    run_id: str,
    recipients: list[env.Recipient],
    label: label_pb2.Label,
    base: int,
    now_ms: int,
) -> list[Sealed]:
    if me.hybrid_signing_key is None:
        raise ValueError(f"{sender} has no hybrid signing key: v2 needs an ML-DSA-65 key")
    epochs = SenderEpochs(sender)
    out: list[Sealed] = []
    for at in range(0, len(indices), SEAL_BATCH):
        chunk = indices[at : at + SEAL_BATCH]
        messages = [
            env2.Message(
                plaintext=os.urandom(PAYLOAD_BYTES),
                topic=topic_for(sender),
                label=label,
                precedence=label_pb2.ROUTINE,
                content_type=env.INTEL_SUMMARY,
                recipients=recipients,  # per-recipient sequence 0 (untracked), as for v1
                sequence=base + at + n + 1,
                created_ms=now_ms,
                message_id=f"{run_id}-{k:07d}",
            )
            for n, k in enumerate(chunk)
        ]
        envelopes = env2.seal_batch(
            messages,
            sender=sender,
            signing_key=me.hybrid_signing_key,
            signing_key_id=me.signing_key_id,
            epochs=epochs,
            created_ms=now_ms,
        )
        for m, e in zip(messages, envelopes, strict=True):
            assert m.message_id is not None
            out.append(Sealed(sender, m.message_id, e.SerializeToString()))
    return out


def seal_workload(pki: Path, total: int, out: Path, version: str = "v2") -> None:
    """Seal ``total`` messages (one process per publisher) and pickle them to ``out``.

    ``version`` is ``v2`` (batches of SEAL_BATCH under one root; the partners need
    hybrid signing keys) or ``v1`` (the partners need Ed25519-only signing keys: the
    broker takes v1 only from those)."""
    if version not in ENVELOPE_VERSIONS:
        raise ValueError(f"envelope version must be one of {ENVELOPE_VERSIONS}, not {version!r}")
    run_id = os.urandom(4).hex()
    by_sender = {s: [k for k in range(total) if sender_of(k) == s] for s in PUBLISHERS}
    with ProcessPoolExecutor(len(PUBLISHERS), mp_context=get_context("spawn")) as pool:
        futures = {
            s: pool.submit(_seal_range, str(pki), s, idx, run_id, version)
            for s, idx in by_sender.items()
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
    ``PartnerClient.open`` (the same kernel calls, signer from the CA-verified directory).
    v2 envelopes open with a root cache and the recipient's epoch keys, as the SDK keeps them.
    """

    def __init__(self, pki: Path, code: str) -> None:
        self.code = code
        self.keys = load_partner(pki / "partners" / code).hpke_keys
        self._signers: dict[tuple[str, str], Ed25519PublicKey] = {}
        self._hybrid: dict[tuple[str, str], HybridPublicKey] = {}
        for sender in PUBLISHERS:
            c = load_partner(pki / "partners" / sender)
            self._signers[(sender, c.signing_key_id)] = c.signing_key.public_key()
            if c.hybrid_signing_key is not None:
                self._hybrid[(sender, c.signing_key_id)] = c.hybrid_signing_key.public_key()
        self._epochs = RecipientEpochs(code, self.keys)
        self._roots = env2.RootCache()

    def signer(self, sender: str, key_id: str) -> Ed25519PublicKey:
        return self._signers[(sender, key_id)]

    def hybrid_signer(self, sender: str, key_id: str) -> HybridPublicKey:
        return self._hybrid[(sender, key_id)]

    def open(self, data: bytes) -> str:
        """Parse, verify and decrypt; returns the message id. Raises env.InvalidEnvelope
        or env2.InvalidEnvelopeV2."""
        e = envelope_pb2.Envelope.FromString(data)
        return self.open_envelope(e)

    def open_envelope(self, e: envelope_pb2.Envelope) -> str:
        if env2.is_v2(e):
            opened2 = env2.open(
                e, epochs=self._epochs, signer=self.hybrid_signer, roots=self._roots
            )
            return opened2.header.message_id
        opened = env.open(e, recipient=self.code, keys=self.keys, signer=self.signer)
        return opened.header.message_id
