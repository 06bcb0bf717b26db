"""Reading the audit log in pages: entries in seq order, each followed by its checkpoints."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from broker.audit.items import AuditItem
from coalition.v1 import audit_pb2

ENTRY_FIELDS = (
    "seq",
    "time_ms",
    "kind",
    "actor",
    "partner",
    "message_id",
    "decision",
    "detail_json",
    "prev_hash",
    "hash",
)
_SELECT_ENTRIES = (
    "SELECT seq, time_ms, kind, actor, partner, message_id, decision, detail_json, prev_hash, hash"
    " FROM entries"
)
_PAGE_OF_ENTRIES = _SELECT_ENTRIES + " WHERE seq > ? ORDER BY seq LIMIT ?"
_PAGE = 1000


def entry_row(row: tuple[Any, ...]) -> audit_pb2.AuditEntry:
    return audit_pb2.AuditEntry(**dict(zip(ENTRY_FIELDS, row, strict=True)))


def _checkpoint(row: tuple[Any, ...]) -> audit_pb2.AuditCheckpoint:
    seq, chain_hash, time_ms, signature = row
    return audit_pb2.AuditCheckpoint(
        seq=int(seq), hash=bytes(chain_hash), time_ms=int(time_ms), signature=bytes(signature)
    )


@dataclass(frozen=True)
class _Page:
    records: list[audit_pb2.AuditEntry | audit_pb2.AuditCheckpoint]
    last_seq: int
    done: bool


def read_page(conn: sqlite3.Connection, after: int) -> _Page:
    """Entries with seq > after (one page) merged with their checkpoints, in export order.

    after = -1 starts at the beginning (checkpoints at seq 0 included).
    """
    entries = [
        entry_row(row)
        for row in conn.execute(
            _PAGE_OF_ENTRIES,
            (after, _PAGE),
        )
    ]
    done = len(entries) < _PAGE
    upper = entries[-1].seq if entries and not done else 2**63 - 1
    checkpoints = [
        (int(row[0]), _checkpoint(row))
        for row in conn.execute(
            "SELECT seq, hash, time_ms, signature FROM checkpoints"
            " WHERE seq > ? AND seq <= ? ORDER BY seq, id",
            (after, upper),
        )
    ]
    records: list[audit_pb2.AuditEntry | audit_pb2.AuditCheckpoint] = []
    i = 0
    for entry in entries:
        # A checkpoint goes after the last entry at or below its seq.
        while i < len(checkpoints) and checkpoints[i][0] < entry.seq:
            records.append(checkpoints[i][1])
            i += 1
        records.append(entry)
    records.extend(cp for _, cp in checkpoints[i:])
    return _Page(records, entries[-1].seq if entries else after, done)


def _glob_prefix(prefix: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in prefix) + "*"


def query_sql(
    partner: str, kind: str, since_ms: int, until_ms: int, limit: int, tail: bool
) -> tuple[str, list[object]]:
    """The SELECT of AuditLog.query and its bound values (its WHERE is fixed fragments)."""
    where, args = ["1"], list[object]()
    if partner:
        where.append("partner = ?")
        args.append(partner)
    if kind:
        where.append("kind GLOB ?")
        args.append(_glob_prefix(kind))
    if since_ms:
        where.append("time_ms >= ?")
        args.append(since_ms)
    if until_ms:
        where.append("time_ms < ?")
        args.append(until_ms)
    sql = f"{_SELECT_ENTRIES} WHERE {' AND '.join(where)}"  # fixed fragments only
    sql += " ORDER BY seq DESC" if tail else " ORDER BY seq"
    if limit > 0:
        sql += " LIMIT ?"
        args.append(limit)

    return sql, args


def matches(item: AuditItem, time_ms: int, partner: str, kind: str, since: int, until: int) -> bool:
    """Whether an entry not yet in the chain passes query_sql's filters."""
    return (
        (not partner or item.partner == partner)
        and item.kind.startswith(kind)
        and time_ms >= since
        and (not until or time_ms < until)
    )
