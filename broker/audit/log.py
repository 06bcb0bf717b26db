"""AuditLog: the broker's append-only, hash-chained audit log in its own SQLite file.

Every record() is durable on return (group commit, fsync). Each entry commits to the one
before it (see coalition.audit_chain for the exact encoding), and every ``checkpoint_every``
entries, and on close, the broker signs the chain head with its audit key.

Most decisions reach the log through an outbox (broker.audit.drainer): append_outbox
appends a source's rows with their own times and moves that source's drained mark (the
``drained`` table) in the same transaction, so a row is in the chain exactly once. Reads
(query, export, verify, count) first run ``before_read`` (the drainer's drain), so they see
every decision already committed to an outbox.

Callers must never put plaintext, keys, tokens or other secrets in ``detail``: entries are
shown to operators and exported. Record identifiers, labels, reasons and sizes instead.

Refusals a partner can cause at will (``publish.refused``, ``auth.refused``, ...) go through
``record_refusal`` / ``admit_refusal``: the first ``refusal_threshold`` of each partner in an
interval (all kinds together) are recorded one by one, the rest are counted (see
RefusalSummary) and written as one ``<kind>.summary`` entry per reason when the interval
closes, so a flood of refusals costs the disk a bounded number of entries per interval
however fast it arrives.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.audit.backend import AuditBackend, AuditError
from broker.audit.items import AuditItem, OutboxEntry, item_entry
from broker.audit.pages import entry_row, query_sql, read_page
from broker.audit.refusals import RefusalSummary
from broker.store.readers import ReaderPool
from broker.store.writer import GroupCommitWriter, WriterOwner, is_disk_full
from coalition.audit_chain import (
    GENESIS,
    ChainVerifier,
    VerifyResult,
    chained_hash,
    sign_checkpoint,
)
from coalition.clock import wall_clock_ms
from coalition.v1 import audit_pb2

__all__ = ["AuditBackend", "AuditError", "AuditLog", "VerifyResult"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY, time_ms INTEGER NOT NULL, kind TEXT NOT NULL,
    actor TEXT NOT NULL, partner TEXT NOT NULL, message_id TEXT NOT NULL,
    decision TEXT NOT NULL, detail_json TEXT NOT NULL,
    prev_hash BLOB NOT NULL, hash BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS entries_by_partner ON entries (partner, seq);
CREATE INDEX IF NOT EXISTS entries_by_kind ON entries (kind, seq);
CREATE INDEX IF NOT EXISTS entries_by_time ON entries (time_ms);
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY, seq INTEGER NOT NULL, hash BLOB NOT NULL,
    time_ms INTEGER NOT NULL, signature BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS checkpoints_by_seq ON checkpoints (seq, id);
-- Append-only through this schema. Not a security boundary (whoever can write the file can
-- drop these); the hash chain and signed checkpoints are what detect tampering.
CREATE TRIGGER IF NOT EXISTS entries_append_only_update BEFORE UPDATE ON entries
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_append_only_delete BEFORE DELETE ON entries
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
-- Per outbox source: the highest outbox id whose entry is in the chain (append_outbox).
CREATE TABLE IF NOT EXISTS drained (
    source TEXT PRIMARY KEY, through INTEGER NOT NULL) WITHOUT ROWID;
"""

# Every query is a constant with bound values, except query()'s WHERE made of fixed fragments.
_INSERT_ENTRY = (
    "INSERT INTO entries (seq, time_ms, kind, actor, partner, message_id, decision, detail_json,"
    " prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _map_error(exc: BaseException) -> Exception:
    if isinstance(exc, AuditError):
        return exc
    if is_disk_full(exc):
        return AuditError(f"audit log is full: the disk or database file is full ({exc})")
    return AuditError(f"audit log failed: {exc}")


def _head(conn: sqlite3.Connection) -> tuple[int, bytes, int]:
    row = conn.execute(
        "SELECT seq, hash, time_ms FROM entries ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    return (int(row[0]), bytes(row[1]), int(row[2])) if row else (0, GENESIS, 0)


def _chain(
    conn: sqlite3.Connection, rows: Sequence[OutboxEntry], seq: int, prev_hash: bytes
) -> list[tuple[int, int, str, str, str, str, str, str, bytes, bytes]]:
    """Insert rows as the entries after seq (whose hash is prev_hash), in one statement;
    their values (the columns of _INSERT_ENTRY: seq first, hash last)."""
    values = []
    for r in rows:
        seq += 1
        digest = chained_hash(prev_hash, seq, r.time_ms, r.tail)
        values.append(
            (
                seq,
                r.time_ms,
                r.kind,
                r.actor,
                r.partner,
                r.message_id,
                r.decision,
                r.detail_json,
                prev_hash,
                digest,
            )
        )
        prev_hash = digest
    conn.executemany(_INSERT_ENTRY, values)
    return values


class AuditLog(WriterOwner, AuditBackend):
    """Append-only hash-chained audit log; open with ``await AuditLog.open(...)``."""

    def __init__(
        self,
        writer: GroupCommitWriter,
        readers: ReaderPool,
        signing_key: Ed25519PrivateKey,
        checkpoint_every: int,
        refusals: RefusalSummary | None = None,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self._writer = writer
        self._readers = readers
        self._key = signing_key
        self._every = checkpoint_every
        self._init_front(refusals, clock)

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        signing_key: Ed25519PrivateKey,
        checkpoint_every: int = 500,
        *,
        refusal_threshold: int = 0,
        refusal_interval_ms: int = 60_000,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> AuditLog:
        """Open or create the log at path; raises AuditError, ValueError for checkpoint_every<1
        or a bad refusal threshold or interval (see RefusalSummary; clock times the summaries)."""
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        refusals = RefusalSummary(refusal_threshold, refusal_interval_ms)
        writer = await GroupCommitWriter.open(
            path, schema=_SCHEMA, name="audit-log", map_error=_map_error
        )
        try:
            readers = await ReaderPool.open(path, map_error=_map_error, size=2)
        except BaseException:
            await writer.close()
            raise
        return cls(writer, readers, signing_key, checkpoint_every, refusals, clock)

    async def record_many(self, items: Sequence[AuditItem], *, now_ms: int) -> list[int]:
        """Append several entries in one write job (one link each in the chain); their seqs.

        Same rules as record(); nothing is written if any item is invalid.
        """
        if not items:
            return []
        rows = [item_entry(item, 0, now_ms) for item in items]

        def job(conn: sqlite3.Connection) -> list[int]:
            seq, prev_hash, _ = _head(conn)
            values = _chain(conn, rows, seq, prev_hash)
            for v in values:
                if v[0] % self._every == 0:
                    self._insert_checkpoint(conn, v[0], v[9], now_ms)
            return [v[0] for v in values]

        return await self._writer.submit(job)

    async def append_outbox(self, source: str, rows: Sequence[OutboxEntry]) -> int:
        """Append outbox rows of source in id order, each at its own time, and move
        source's drained mark to the last id, in one transaction; return the mark. Rows
        at or below the mark are skipped (each row is appended once). One checkpoint is
        signed if the batch crossed a multiple of checkpoint_every. Raises AuditError."""
        ordered = sorted(rows, key=lambda r: r.id)

        def job(conn: sqlite3.Connection) -> int:
            found = conn.execute("SELECT through FROM drained WHERE source = ?", (source,))
            mark = int((found.fetchone() or (0,))[0])
            fresh = [r for r in ordered if r.id > mark]
            if not fresh:
                return mark
            first, prev_hash, _ = _head(conn)
            values = _chain(conn, fresh, first, prev_hash)
            seq, last_hash = values[-1][0], values[-1][9]
            if seq // self._every != first // self._every:
                self._insert_checkpoint(conn, seq, last_hash, fresh[-1].time_ms)
            conn.execute(
                "INSERT INTO drained (source, through) VALUES (?, ?)"
                " ON CONFLICT (source) DO UPDATE SET through = excluded.through",
                (source, fresh[-1].id),
            )
            return fresh[-1].id

        return await self._writer.submit(job)

    async def drained_through(self, source: str) -> int:
        """The highest outbox id of source whose entry is in the chain, 0 if none."""

        def read(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT through FROM drained WHERE source = ?", (source,))
            return int((row.fetchone() or (0,))[0])

        return await self._readers.run(read)

    async def checkpoint(self, now_ms: int) -> audit_pb2.AuditCheckpoint:
        """Sign the current head (seq 0 and zero hash when empty), store and return it."""

        def job(conn: sqlite3.Connection) -> audit_pb2.AuditCheckpoint:
            seq, chain_hash, _ = _head(conn)
            return self._insert_checkpoint(conn, seq, chain_hash, now_ms)

        return await self._writer.submit(job)

    def _insert_checkpoint(
        self, conn: sqlite3.Connection, seq: int, chain_hash: bytes, time_ms: int
    ) -> audit_pb2.AuditCheckpoint:
        cp = sign_checkpoint(seq, chain_hash, time_ms, self._key)
        conn.execute(
            "INSERT INTO checkpoints (seq, hash, time_ms, signature) VALUES (?, ?, ?, ?)",
            (cp.seq, cp.hash, cp.time_ms, cp.signature),
        )
        return cp

    async def query(
        self,
        *,
        partner: str = "",
        kind: str = "",
        since_ms: int = 0,
        until_ms: int = 0,
        limit: int = 0,
        tail: bool = False,
    ) -> list[audit_pb2.AuditEntry]:
        """Entries in seq order; kind is a prefix, since_ms inclusive, until_ms exclusive,
        0/"" means no filter; with tail, the newest `limit` entries (still in seq order)."""
        sql, args = query_sql(partner, kind, since_ms, until_ms, limit, tail)

        def read(conn: sqlite3.Connection) -> list[audit_pb2.AuditEntry]:
            return [entry_row(row) for row in conn.execute(sql, args)]

        drained = await self._catch_up()
        entries = await self._readers.run(read)
        if tail:
            entries.reverse()
        if not drained:
            entries += await self._unchained(partner, kind, since_ms, until_ms)
            if limit > 0:
                entries = entries[-limit:] if tail else entries[:limit]
        return entries

    async def export(self) -> AsyncIterator[audit_pb2.AuditEntry | audit_pb2.AuditCheckpoint]:
        """Every entry in seq order, each followed by the checkpoints taken at its seq."""
        await self._catch_up()
        after = -1
        while True:
            page = await self._readers.run(functools.partial(read_page, after=after))
            for record in page.records:
                yield record
            if page.done:
                return
            after = page.last_seq

    async def verify(self, public_key: Ed25519PublicKey) -> VerifyResult:
        """Recompute the chain and check every checkpoint; report the first break."""
        await self._catch_up()
        verifier = ChainVerifier(public_key)
        after = -1
        while True:
            page = await self._readers.run(functools.partial(read_page, after=after))
            verifier.feed(page.records)
            if page.done:
                return verifier.result()
            after = page.last_seq

    async def count(self) -> int:
        """Number of entries stored."""
        await self._catch_up()
        return await self._readers.run(
            lambda conn: int(conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
        )

    async def close(self, now_ms: int | None = None) -> None:
        """Checkpoint the head if it is not yet (at now_ms, default the last entry's time),
        then commit and close. Pending refusal summaries are written first (if the log
        cannot take them, their counts are logged at CRITICAL instead)."""
        await self.stop_summaries(now_ms)

        def job(conn: sqlite3.Connection) -> None:
            seq, chain_hash, time_ms = _head(conn)
            row = conn.execute("SELECT MAX(seq) FROM checkpoints").fetchone()
            if seq > 0 and (row[0] is None or int(row[0]) < seq):
                self._insert_checkpoint(
                    conn, seq, chain_hash, time_ms if now_ms is None else now_ms
                )

        try:
            await self._writer.submit(job)
        finally:
            await self._readers.close()
            await self._writer.close()
