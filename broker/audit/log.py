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

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.audit.items import AuditItem, entry_fields
from broker.audit.pages import ENTRY_FIELDS, entry_row, matches, query_sql, read_page
from broker.audit.refusals import RefusalSummary
from broker.store.readers import ReaderPool
from broker.store.writer import GroupCommitWriter, WriterOwner, is_disk_full
from coalition.audit_chain import (
    GENESIS,
    ChainVerifier,
    VerifyResult,
    entry_hash,
    sign_checkpoint,
)
from coalition.clock import wall_clock_ms
from coalition.v1 import audit_pb2

__all__ = ["AuditError", "AuditLog", "VerifyResult"]

log = logging.getLogger("coalition.broker.audit")

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


class AuditError(Exception):
    """The audit log could not be written or read; str() says why."""


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


class AuditLog(WriterOwner):
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
        self._refusals = refusals or RefusalSummary(0, 1)
        self._clock = clock
        self._summarizer: asyncio.Task[None] | None = None
        # Run before every read so it sees what outboxes hold (set by the broker's wiring
        # to the drainer's drain). Its failure is logged; the read goes on.
        self.before_read: Callable[[], Awaitable[object]] | None = None
        # If before_read fails: the records it could not append, as (time, entry), which
        # query() then shows after the chain's entries with seq 0 and no hash.
        self.read_through: Callable[[], Awaitable[list[tuple[int, AuditItem]]]] | None = None

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

    async def record(
        self,
        *,
        kind: str,
        actor: str,
        partner: str = "",
        message_id: str = "",
        decision: str = "allow",
        detail: Mapping[str, object] | None = None,
        now_ms: int,
    ) -> int:
        """Append one entry, durable on return; return its seq.

        detail must be plain JSON and must never hold plaintext, keys or tokens.
        Raises ValueError for an empty kind or a detail that is not plain JSON; AuditError.
        """
        item = AuditItem(kind, actor, partner, message_id, decision, detail)
        return (await self.record_many([item], now_ms=now_ms))[0]

    async def record_many(self, items: Sequence[AuditItem], *, now_ms: int) -> list[int]:
        """Append several entries in one write job (one link each in the chain); their seqs.

        Same rules as record(); nothing is written if any item is invalid.
        """
        if not items:
            return []
        fields = [entry_fields(item, now_ms) for item in items]

        def job(conn: sqlite3.Connection) -> list[int]:
            seq, prev_hash, _ = _head(conn)
            out = []
            for f in fields:
                seq, prev_hash = seq + 1, self._append(conn, f, seq + 1, prev_hash)
                if seq % self._every == 0:
                    self._insert_checkpoint(conn, seq, prev_hash, f.time_ms)
                out.append(seq)
            return out

        return await self._writer.submit(job)

    async def append_outbox(
        self, source: str, rows: Sequence[tuple[int, audit_pb2.AuditEntry]]
    ) -> int:
        """Append (outbox id, entry) rows of source in id order, each at its own time,
        and move source's drained mark to the last id, in one transaction; return the
        mark. Rows at or below the mark are skipped (each row is appended once). One
        checkpoint is signed if the batch crossed a multiple of checkpoint_every.
        Raises AuditError."""
        decoded = sorted(rows, key=lambda r: r[0])

        def job(conn: sqlite3.Connection) -> int:
            found = conn.execute("SELECT through FROM drained WHERE source = ?", (source,))
            mark = int((found.fetchone() or (0,))[0])
            fresh = [(i, f) for i, f in decoded if i > mark]
            if not fresh:
                return mark
            seq, prev_hash, _ = _head(conn)
            first = seq
            for _, f in fresh:
                prev_hash = self._append(conn, f, seq + 1, prev_hash)
                seq += 1
            if seq // self._every != first // self._every:
                self._insert_checkpoint(conn, seq, prev_hash, fresh[-1][1].time_ms)
            conn.execute(
                "INSERT INTO drained (source, through) VALUES (?, ?)"
                " ON CONFLICT (source) DO UPDATE SET through = excluded.through",
                (source, fresh[-1][0]),
            )
            return fresh[-1][0]

        return await self._writer.submit(job)

    async def drained_through(self, source: str) -> int:
        """The highest outbox id of source whose entry is in the chain, 0 if none."""

        def read(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT through FROM drained WHERE source = ?", (source,))
            return int((row.fetchone() or (0,))[0])

        return await self._readers.run(read)

    def _append(
        self, conn: sqlite3.Connection, fields: audit_pb2.AuditEntry, seq: int, prev: bytes
    ) -> bytes:
        """Insert fields as entry seq after prev (the previous hash); return its hash."""
        entry = audit_pb2.AuditEntry()
        entry.CopyFrom(fields)
        entry.seq, entry.prev_hash = seq, prev
        entry.hash = entry_hash(prev, entry)
        conn.execute(_INSERT_ENTRY, tuple(getattr(entry, f) for f in ENTRY_FIELDS))
        return entry.hash

    async def _catch_up(self) -> bool:
        """Run before_read; False if it failed (reads answer with what the chain holds)."""
        if self.before_read is None:
            return True
        try:
            await self.before_read()
        except Exception as exc:
            log.error("audit outbox not drained before a read: %s", exc)
            return False
        return True

    async def _unchained(
        self, partner: str, kind: str, since_ms: int, until_ms: int
    ) -> list[audit_pb2.AuditEntry]:
        """read_through's records that match query()'s filters, as entries with seq 0."""
        if self.read_through is None:
            return []
        try:
            waiting = await self.read_through()
        except Exception as exc:
            log.error("audit outbox not readable: %s", exc)
            return []
        return [
            entry_fields(item, t)
            for t, item in waiting
            if matches(item, t, partner, kind, since_ms, until_ms)
        ]

    # -- refusals a partner can cause at will -------------------------------------------
    def admit_refusal(self, item: AuditItem, now_ms: int, source: str = "") -> bool:
        """Whether to record this refusal entry one by one (True), or count it into its
        interval's summary (False; written once the interval closes, or at close()).

        source is who the threshold counts against (default: the entry's partner, else
        its actor). A caller that gets True must record the item itself.
        """
        if self._refusals.admit(item, source or item.partner or item.actor, now_ms):
            return True
        if self._summarizer is None or self._summarizer.done():
            self._summarizer = asyncio.get_running_loop().create_task(self._summarize())
        return False

    async def record_refusal(self, item: AuditItem, *, now_ms: int, source: str = "") -> bool:
        """Record a refusal entry, or count it (see admit_refusal); True if written now.

        Raises AuditError (only when it writes) and ValueError like record().
        """
        if not self.admit_refusal(item, now_ms, source):
            return False
        await self.record_many([item], now_ms=now_ms)
        return True

    async def flush_refusals(self, now_ms: int, *, final: bool = False) -> int:
        """Write the summaries of intervals closed by now_ms (every pending one when final);
        how many entries. Raises AuditError, and then keeps the counts for the next try."""
        taken = self._refusals.take_due(now_ms, final=final)
        if not taken:
            return 0
        items = [self._refusals.summary(k, t) for k, t in taken]
        try:
            await self.record_many(items, now_ms=now_ms)
        except BaseException:
            self._refusals.restore(taken)
            raise
        for item in items:
            log.info(
                "refusals summarised",
                extra={
                    "kind": item.kind,
                    "partner": item.partner or item.actor,
                    "reason": item.decision,
                    "count": (item.detail or {}).get("count"),
                },
            )
        return len(items)

    async def _summarize(self) -> None:
        """Write each interval's summaries once it has closed, while any are pending."""
        while (due := self._refusals.next_due_ms()) is not None:
            await asyncio.sleep(max(due - self._clock(), 0) / 1000 + 0.05)
            try:
                await self.flush_refusals(self._clock())
            except AuditError as exc:
                log.critical("refusal summaries not written yet (kept, retried): %s", exc)
                await asyncio.sleep(1)
            except RuntimeError:  # closed
                return

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
        if self._summarizer is not None:
            self._summarizer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._summarizer
        at = self._clock() if now_ms is None else now_ms
        try:
            await self.flush_refusals(at, final=True)
        except (AuditError, RuntimeError) as exc:
            lost = self._refusals.take_due(at, final=True)
            log.critical(
                "refusal summaries not written: %s (counts: %s)",
                exc,
                "; ".join(f"{k[0]} {k[1]} {k[2]}={t.count}" for k, t in lost),
            )

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
