"""The audit stream's blocks: how a run of chain entries travels as one JetStream message.

A block is one message of the audit stream. It holds a run of consecutive chain entries
(each with its seq, prev_hash and hash, exactly as ``coalition.audit_chain`` defines
them), the checkpoints signed over them (each with the DER of the audit certificate
whose key signed it), and the drained mark of every outbox source as it stands after
the block. So the last block alone says where the chain ends and how far each outbox
is drained, and whatever a block holds is committed at once: one message is atomic.

Payload: compact JSON ``{"v": 1, "id": ..., "entries": [[seq, time_ms, kind, actor,
partner, message_id, decision, detail_json, prev_hash hex, hash hex], ...],
"checkpoints": [{"seq", "hash", "time_ms", "signature", "signer"}], "marks": {source:
id}, "head_time_ms": ...}``. Pure: no I/O, no clock.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from coalition.audit_chain import GENESIS, entry_hash
from coalition.v1 import audit_pb2

__all__ = ["Block", "BlockError", "Head", "SignedCheckpoint", "chain", "decode", "encode"]

_VERSION = 1


class BlockError(ValueError):
    """A stream message that is not an audit block (or not one this code can read)."""


@dataclass(frozen=True)
class SignedCheckpoint:
    """A checkpoint and the DER of the certificate of the key that signed it (b"" if the
    broker was given none)."""

    checkpoint: audit_pb2.AuditCheckpoint
    signer: bytes = b""


@dataclass(frozen=True)
class Block:
    """One message of the audit stream (see the module docstring)."""

    id: str
    entries: Sequence[audit_pb2.AuditEntry] = ()
    checkpoints: Sequence[SignedCheckpoint] = ()
    marks: Mapping[str, int] = field(default_factory=dict)
    head_time_ms: int = 0  # the time of the chain's last entry after this block


@dataclass(frozen=True)
class Head:
    """Where the chain ends: the stream sequence of its last block, the last entry's seq,
    hash and time, whether a checkpoint covers it, and the drained marks."""

    stream_seq: int = 0
    seq: int = 0
    hash: bytes = GENESIS
    time_ms: int = 0
    signed: bool = False
    marks: Mapping[str, int] = field(default_factory=dict)

    def after(self, block: Block, stream_seq: int) -> Head:
        """The head once block is stored at stream_seq."""
        seq, chain_hash = self.seq, self.hash
        if block.entries:
            seq, chain_hash = block.entries[-1].seq, block.entries[-1].hash
        elif block.checkpoints:
            last = block.checkpoints[-1].checkpoint
            seq, chain_hash = last.seq, last.hash
        signed = any(c.checkpoint.seq == seq for c in block.checkpoints) or (
            not block.entries and self.signed and seq == self.seq
        )
        return Head(stream_seq, seq, chain_hash, block.head_time_ms, signed, dict(block.marks))


Signer = Callable[[int, bytes, int], SignedCheckpoint]


def chain(
    head: Head,
    fields: Sequence[audit_pb2.AuditEntry],
    sign: Signer,
    every: int,
    *,
    at_end_only: bool,
) -> tuple[list[audit_pb2.AuditEntry], list[SignedCheckpoint]]:
    """fields chained after head, and the checkpoints to sign with them: one at every
    multiple of every, or (at_end_only) one at the last entry if the run crossed one."""
    entries: list[audit_pb2.AuditEntry] = []
    checkpoints: list[SignedCheckpoint] = []
    seq, prev = head.seq, head.hash
    for f in fields:
        entry = audit_pb2.AuditEntry()
        entry.CopyFrom(f)
        seq += 1
        entry.seq, entry.prev_hash = seq, prev
        entry.hash = prev = entry_hash(prev, entry)
        entries.append(entry)
        if not at_end_only and seq % every == 0:
            checkpoints.append(sign(seq, prev, entry.time_ms))
    if at_end_only and entries and seq // every != head.seq // every:
        checkpoints.append(sign(seq, prev, entries[-1].time_ms))
    return entries, checkpoints


def encode(block: Block) -> bytes:
    """The message payload of block."""
    body = {
        "v": _VERSION,
        "id": block.id,
        "entries": [
            [
                e.seq,
                e.time_ms,
                e.kind,
                e.actor,
                e.partner,
                e.message_id,
                e.decision,
                e.detail_json,
                e.prev_hash.hex(),
                e.hash.hex(),
            ]
            for e in block.entries
        ],
        "checkpoints": [
            {
                "seq": c.checkpoint.seq,
                "hash": c.checkpoint.hash.hex(),
                "time_ms": c.checkpoint.time_ms,
                "signature": c.checkpoint.signature.hex(),
                "signer": base64.b64encode(c.signer).decode("ascii"),
            }
            for c in block.checkpoints
        ],
        "marks": dict(block.marks),
        "head_time_ms": block.head_time_ms,
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _entry(row: object) -> audit_pb2.AuditEntry:
    if not isinstance(row, list) or len(row) != 10:
        raise BlockError("an entry is not a list of ten fields")
    seq, time_ms, kind, actor, partner, message_id, decision, detail, prev, digest = row
    return audit_pb2.AuditEntry(
        seq=seq,
        time_ms=time_ms,
        kind=kind,
        actor=actor,
        partner=partner,
        message_id=message_id,
        decision=decision,
        detail_json=detail,
        prev_hash=bytes.fromhex(prev),
        hash=bytes.fromhex(digest),
    )


def _checkpoint(obj: object) -> SignedCheckpoint:
    if not isinstance(obj, dict):
        raise BlockError("a checkpoint is not an object")
    cp = audit_pb2.AuditCheckpoint(
        seq=obj["seq"],
        hash=bytes.fromhex(obj["hash"]),
        time_ms=obj["time_ms"],
        signature=bytes.fromhex(obj["signature"]),
    )
    return SignedCheckpoint(cp, base64.b64decode(obj.get("signer", ""), validate=True))


def decode(data: bytes) -> Block:
    """The block in a message payload; raises BlockError for anything else."""
    try:
        body = json.loads(data)
        if not isinstance(body, dict) or body.get("v") != _VERSION:
            raise BlockError("not a version 1 audit block")
        marks = body.get("marks", {})
        if not isinstance(marks, dict) or not all(isinstance(v, int) for v in marks.values()):
            raise BlockError("the drained marks are not a map of integers")
        return Block(
            id=str(body["id"]),
            entries=[_entry(r) for r in body.get("entries", [])],
            checkpoints=[_checkpoint(c) for c in body.get("checkpoints", [])],
            marks={str(k): int(v) for k, v in marks.items()},
            head_time_ms=int(body.get("head_time_ms", 0)),
        )
    except BlockError:
        raise
    except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError, binascii.Error too
        raise BlockError(f"not an audit block: {exc}") from None


def export_order(
    block: Block,
) -> list[audit_pb2.AuditEntry | audit_pb2.AuditCheckpoint]:
    """block's entries in seq order, each followed by the checkpoints taken at its seq
    (a checkpoint below the block's first entry comes first)."""
    out: list[audit_pb2.AuditEntry | audit_pb2.AuditCheckpoint] = []
    pending = sorted((c.checkpoint for c in block.checkpoints), key=lambda c: c.seq)
    i = 0
    for entry in block.entries:
        while i < len(pending) and pending[i].seq < entry.seq:
            out.append(pending[i])
            i += 1
        out.append(entry)
    out.extend(pending[i:])
    return out
