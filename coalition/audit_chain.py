"""The audit log's hash chain and signed checkpoints: pure functions, no I/O, no clock.

Entry hash: ``hash_n = SHA-256(hash_{n-1} || canonical_bytes(entry_n))`` with ``hash_0`` = 32
zero bytes. ``canonical_bytes`` is the UTF-8 of the compact JSON array
``[seq, time_ms, kind, actor, partner, message_id, decision, detail_json]`` (separators
``,`` and ``:``, non-ASCII kept as UTF-8; for these strings and integers this equals RFC 8785
JCS). ``detail_json`` is itself canonical JSON of the detail object (keys sorted, compact), and
enters the array as a string. Protobuf bytes are never hashed: protobuf serialization is not
canonical.

Checkpoint signature: Ed25519 over
``pae(AUDIT_CHECKPOINT_TYPE, seq (8 bytes, big-endian) || hash (32) || time_ms (8, big-endian))``.

Limits: checkpoints bound what a writer of the database file can rewrite undetected; entries
after the last checkpoint can be truncated or re-chained by whoever can write the file. Keep
exported checkpoints elsewhere to close that window.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from coalition import ed25519
from coalition.pae import AUDIT_CHECKPOINT_TYPE, pae
from coalition.v1 import audit_pb2

GENESIS = bytes(32)


# Built once: json.dumps with options constructs a new encoder on every call.
_DETAIL_JSON = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
_FIELDS_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def canonical_json(detail: Mapping[str, object] | None) -> str:
    """Canonical JSON of a detail object; raises TypeError/ValueError if not plain JSON."""
    return _DETAIL_JSON.encode(dict(detail or {}))


def canonical_bytes(entry: audit_pb2.AuditEntry) -> bytes:
    """The bytes an entry's hash commits to (see module docstring)."""
    fields = [
        entry.seq,
        entry.time_ms,
        entry.kind,
        entry.actor,
        entry.partner,
        entry.message_id,
        entry.decision,
        entry.detail_json,
    ]
    return _FIELDS_JSON.encode(fields).encode("utf-8")


def entry_hash(prev_hash: bytes, entry: audit_pb2.AuditEntry) -> bytes:
    """SHA-256(prev_hash || canonical_bytes(entry))."""
    return hashlib.sha256(prev_hash + canonical_bytes(entry)).digest()


def canonical_tail(
    kind: str, actor: str, partner: str, message_id: str, decision: str, detail_json: str
) -> bytes:
    """canonical_bytes of an entry with these fields after its ``[seq,time_ms,``: what
    can be encoded before the entry has a seq and a time (see chained_hash)."""
    fields = [kind, actor, partner, message_id, decision, detail_json]
    return _FIELDS_JSON.encode(fields)[1:].encode("utf-8")


def chained_hash(prev_hash: bytes, seq: int, time_ms: int, tail: bytes) -> bytes:
    """entry_hash of the entry at seq and time_ms whose canonical_tail is tail: the same
    bytes hashed, without encoding the fields again."""
    return hashlib.sha256(b"%s[%d,%d,%s" % (prev_hash, seq, time_ms, tail)).digest()


def checkpoint_body(seq: int, chain_hash: bytes, time_ms: int) -> bytes:
    """The PAE-encoded bytes a checkpoint signature covers."""
    return pae(AUDIT_CHECKPOINT_TYPE, struct.pack(">Q32sq", seq, chain_hash, time_ms))


def sign_checkpoint(
    seq: int, chain_hash: bytes, time_ms: int, key: Ed25519PrivateKey
) -> audit_pb2.AuditCheckpoint:
    """A checkpoint of the chain at seq, signed with the broker's audit key."""
    signature = key.sign(checkpoint_body(seq, chain_hash, time_ms))
    return audit_pb2.AuditCheckpoint(seq=seq, hash=chain_hash, time_ms=time_ms, signature=signature)


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of verifying a log: ok, counts, and the first broken seq with a sentence."""

    ok: bool
    entries: int
    checkpoints: int
    first_broken_seq: int = 0
    problem: str = ""


def _signed_by(key: Ed25519PublicKey, signature: bytes, body: bytes) -> bool:
    try:
        ed25519.verify(key, signature, body)
    except InvalidSignature:
        return False
    return True


class ChainVerifier:
    """Feeds on records in export order (entry n, then checkpoints at n); keeps the first fault.

    A checkpoint verifies if any of the keys signed it (several brokers may sign one chain,
    each with its own audit key); add_key() trusts one more key from then on.
    """

    def __init__(self, public_key: Ed25519PublicKey | Iterable[Ed25519PublicKey]) -> None:
        self._keys = [public_key] if isinstance(public_key, Ed25519PublicKey) else [*public_key]
        self._seq = 0
        self._hash = GENESIS
        self._entries = 0
        self._checkpoints = 0
        self._broken_seq = 0
        self._problem = ""

    def feed(self, records: Iterable[audit_pb2.AuditEntry | audit_pb2.AuditCheckpoint]) -> None:
        """Check each record in order."""
        for record in records:
            if isinstance(record, audit_pb2.AuditEntry):
                self._entry(record)
            else:
                self._checkpoint(record)

    def add_key(self, public_key: Ed25519PublicKey) -> None:
        """Accept checkpoints signed by public_key too."""
        self._keys.append(public_key)

    def result(self) -> VerifyResult:
        """The verdict over everything fed so far."""
        return VerifyResult(
            ok=not self._problem,
            entries=self._entries,
            checkpoints=self._checkpoints,
            first_broken_seq=self._broken_seq,
            problem=self._problem,
        )

    def _fail(self, seq: int, problem: str) -> None:
        self._broken_seq, self._problem = seq, problem

    def _entry(self, e: audit_pb2.AuditEntry) -> None:
        self._entries += 1
        if self._problem:
            return
        expected = self._seq + 1
        if e.seq > expected:
            self._fail(expected, f"entry {expected}: missing (the next entry is {e.seq})")
        elif e.seq < expected:
            self._fail(e.seq, f"entry {e.seq}: out of order (it follows entry {self._seq})")
        elif e.prev_hash != self._hash:
            if entry_hash(e.prev_hash, e) == e.hash:
                self._fail(e.seq, f"entry {e.seq}: link to previous entry broken")
            else:
                self._fail(e.seq, f"entry {e.seq}: hash does not match its content")
        elif entry_hash(self._hash, e) != e.hash:
            self._fail(e.seq, f"entry {e.seq}: hash does not match its content")
        else:
            self._seq, self._hash = e.seq, e.hash

    def _checkpoint(self, cp: audit_pb2.AuditCheckpoint) -> None:
        self._checkpoints += 1
        if self._problem:
            return
        body = checkpoint_body(cp.seq, cp.hash, cp.time_ms)
        if not any(_signed_by(key, cp.signature, body) for key in self._keys):
            self._fail(cp.seq, f"checkpoint at {cp.seq}: bad signature")
            return
        if cp.seq > self._seq:
            missing = self._seq + 1
            self._fail(missing, f"checkpoint at {cp.seq}: entries from {missing} are missing")
        elif cp.seq < self._seq:
            self._fail(cp.seq, f"checkpoint at {cp.seq}: out of order (after entry {self._seq})")
        elif cp.hash != self._hash:
            self._fail(cp.seq, f"checkpoint at {cp.seq}: hash does not match the chain")
