"""AuditLog: the broker's append-only, hash-chained audit log in its own SQLite file.

Every record() is durable on return (group commit, fsync). Each entry commits to the one
before it (see coalition.audit_chain for the exact encoding), and every ``checkpoint_every``
entries, and on close, the broker signs the chain head with its audit key.

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
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.store.readers import ReaderPool
from broker.store.writer import GroupCommitWriter, is_disk_full
from coalition.audit_chain import (
    GENESIS,
    ChainVerifier,
    VerifyResult,
    canonical_json,
    entry_hash,
    sign_checkpoint,
)
from coalition.clock import wall_clock_ms
from coalition.v1 import audit_pb2

__all__ = ["AuditError", "AuditItem", "AuditLog", "RefusalSummary", "VerifyResult"]

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
"""

# Every query is a constant with bound values, except query()'s WHERE made of fixed fragments.
_ENTRY_FIELDS = (
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
_INSERT_ENTRY = (
    "INSERT INTO entries (seq, time_ms, kind, actor, partner, message_id, decision, detail_json,"
    " prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_ENTRIES = (
    "SELECT seq, time_ms, kind, actor, partner, message_id, decision, detail_json, prev_hash, hash"
    " FROM entries"
)
_PAGE_OF_ENTRIES = _SELECT_ENTRIES + " WHERE seq > ? ORDER BY seq LIMIT ?"
_PAGE = 1000


class AuditError(Exception):
    """The audit log could not be written or read; str() says why."""


def _map_error(exc: BaseException) -> Exception:
    if isinstance(exc, AuditError):
        return exc
    if is_disk_full(exc):
        return AuditError(f"audit log is full: the disk or database file is full ({exc})")
    return AuditError(f"audit log failed: {exc}")


def _entry(row: tuple[Any, ...]) -> audit_pb2.AuditEntry:
    return audit_pb2.AuditEntry(**dict(zip(_ENTRY_FIELDS, row, strict=True)))


def _checkpoint(row: tuple[Any, ...]) -> audit_pb2.AuditCheckpoint:
    seq, chain_hash, time_ms, signature = row
    return audit_pb2.AuditCheckpoint(
        seq=int(seq), hash=bytes(chain_hash), time_ms=int(time_ms), signature=bytes(signature)
    )


@dataclass(frozen=True)
class AuditItem:
    """One entry to append (see AuditLog.record for the rules on detail)."""

    kind: str
    actor: str
    partner: str = ""
    message_id: str = ""
    decision: str = "allow"
    detail: Mapping[str, object] | None = None


def _fields(item: AuditItem, now_ms: int) -> audit_pb2.AuditEntry:
    if not item.kind:
        raise ValueError("audit entry needs a kind")
    try:
        detail_json = canonical_json(item.detail)
        detail_json.encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit detail is not plain JSON: {exc}") from exc
    return audit_pb2.AuditEntry(
        time_ms=now_ms,
        kind=item.kind,
        actor=item.actor,
        partner=item.partner,
        message_id=item.message_id,
        decision=item.decision,
        detail_json=detail_json,
    )


@dataclass
class _Tally:
    """Refusals of one kind, source and reason in one interval, beyond the threshold."""

    actor: str
    partner: str
    status: str
    example: str
    first_ms: int
    first_message_id: str
    last_ms: int = 0
    last_message_id: str = ""
    count: int = 0


# (kind, source, reason, interval index)
_TallyKey = tuple[str, str, str, int]


class RefusalSummary:
    """Which refusals to record one by one, and exact counts of the others.

    Pure bookkeeping: no I/O, the time is passed in. Intervals are aligned to multiples of
    interval_ms. Per source (who caused them, e.g. the partner), whatever the kind, the
    first ``threshold`` refusals of an interval are admitted (to be recorded one by one);
    the rest are tallied per kind and reason and, once their interval has closed, taken
    as summary entries. A threshold of 0 admits everything. Memory: one counter per
    source and one tally per (kind, source, reason) with refusals beyond the threshold.
    """

    def __init__(self, threshold: int, interval_ms: int) -> None:
        if threshold < 0:
            raise ValueError("refusal_audit_threshold must be 0 or more")
        if interval_ms < 1:
            raise ValueError("refusal_audit_interval_ms must be at least 1")
        self.threshold = threshold
        self.interval_ms = interval_ms
        self._admitted: dict[str, tuple[int, int]] = {}  # source -> (interval, count)
        self._tallies: dict[_TallyKey, _Tally] = {}

    @property
    def pending(self) -> int:
        """Refusals counted and not yet taken as summaries."""
        return sum(t.count for t in self._tallies.values())

    def next_due_ms(self) -> int | None:
        """When the earliest pending interval closes (None when nothing is pending)."""
        if not self._tallies:
            return None
        return (min(k[3] for k in self._tallies) + 1) * self.interval_ms

    def admit(self, item: AuditItem, source: str, now_ms: int) -> bool:
        """True: record item one by one. False: it was counted into its interval's summary."""
        if self.threshold == 0:
            return True
        window = now_ms // self.interval_ms
        at, count = self._admitted.get(source, (window, 0))
        if at != window:
            count = 0
        if count < self.threshold:
            self._admitted[source] = (window, count + 1)
            return True
        self._admitted[source] = (window, count)
        detail = item.detail or {}
        tally = self._tallies.get((item.kind, source, item.decision, window))
        if tally is None:
            tally = self._tallies[(item.kind, source, item.decision, window)] = _Tally(
                actor=item.actor,
                partner=item.partner,
                status=str(detail.get("status", "")),
                example=str(detail.get("reason", "")),
                first_ms=now_ms,
                first_message_id=item.message_id,
            )
        tally.count += 1
        tally.last_ms = now_ms
        tally.last_message_id = item.message_id
        return False

    def take_due(self, now_ms: int, *, final: bool = False) -> list[tuple[_TallyKey, _Tally]]:
        """The tallies of intervals that have closed by now_ms (all of them when final),
        removed from the pending ones; put them back with restore() if not written."""
        current = now_ms // self.interval_ms
        due = sorted((k for k in self._tallies if final or k[3] < current), key=lambda k: (k[3], k))
        out = [(k, self._tallies.pop(k)) for k in due]
        for source, (at, _) in list(self._admitted.items()):
            if at < current:
                del self._admitted[source]
        return out

    def restore(self, taken: Sequence[tuple[_TallyKey, _Tally]]) -> None:
        """Put back tallies that take_due returned but could not be written."""
        for key, tally in taken:
            have = self._tallies.get(key)
            if have is None:
                self._tallies[key] = tally
            else:  # counted again meanwhile (the clock went back): merge, keep it exact
                have.count += tally.count
                have.first_ms, have.first_message_id = tally.first_ms, tally.first_message_id

    def summary(self, key: _TallyKey, tally: _Tally) -> AuditItem:
        """The summary entry of one tally: ``<kind>.summary`` with the exact count."""
        kind, source, reason, window = key
        detail: dict[str, object] = {
            "count": tally.count,
            "reason_code": reason,
            "interval_start_ms": window * self.interval_ms,
            "interval_ms": self.interval_ms,
            "recorded_individually_up_to": self.threshold,
            "first_ms": tally.first_ms,
            "last_ms": tally.last_ms,
            "first_message_id": tally.first_message_id,
            "last_message_id": tally.last_message_id,
            "example": tally.example,
        }
        if tally.status:
            detail["status"] = tally.status
        return AuditItem(
            f"{kind}.summary", tally.actor or source, tally.partner, "", reason, detail
        )


def _head(conn: sqlite3.Connection) -> tuple[int, bytes, int]:
    row = conn.execute(
        "SELECT seq, hash, time_ms FROM entries ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    return (int(row[0]), bytes(row[1]), int(row[2])) if row else (0, GENESIS, 0)


def _glob_prefix(prefix: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in prefix) + "*"


@dataclass(frozen=True)
class _Page:
    records: list[audit_pb2.AuditEntry | audit_pb2.AuditCheckpoint]
    last_seq: int
    done: bool


class AuditLog:
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

    @property
    def commits(self) -> int:
        """Transactions committed since open (for tests and metrics)."""
        return self._writer.commits

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
        fields = [_fields(item, now_ms) for item in items]

        def job(conn: sqlite3.Connection) -> list[int]:
            seq, prev_hash, _ = _head(conn)
            out = []
            for f in fields:
                entry = audit_pb2.AuditEntry()
                entry.CopyFrom(f)
                entry.seq, entry.prev_hash = seq + 1, prev_hash
                entry.hash = entry_hash(prev_hash, entry)
                conn.execute(_INSERT_ENTRY, tuple(getattr(entry, f) for f in _ENTRY_FIELDS))
                if entry.seq % self._every == 0:
                    self._insert_checkpoint(conn, entry.seq, entry.hash, entry.time_ms)
                seq, prev_hash = entry.seq, entry.hash
                out.append(entry.seq)
            return out

        return await self._writer.submit(job)

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

        def read(conn: sqlite3.Connection) -> list[audit_pb2.AuditEntry]:
            return [_entry(row) for row in conn.execute(sql, args)]

        entries = await self._readers.run(read)
        return entries[::-1] if tail else entries

    async def export(self) -> AsyncIterator[audit_pb2.AuditEntry | audit_pb2.AuditCheckpoint]:
        """Every entry in seq order, each followed by the checkpoints taken at its seq."""
        after = -1
        while True:
            page = await self._readers.run(functools.partial(_read_page, after=after))
            for record in page.records:
                yield record
            if page.done:
                return
            after = page.last_seq

    async def verify(self, public_key: Ed25519PublicKey) -> VerifyResult:
        """Recompute the chain and check every checkpoint; report the first break."""
        verifier = ChainVerifier(public_key)
        after = -1
        while True:
            page = await self._readers.run(functools.partial(_read_page, after=after))
            verifier.feed(page.records)
            if page.done:
                return verifier.result()
            after = page.last_seq

    async def count(self) -> int:
        """Number of entries stored."""
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


def _read_page(conn: sqlite3.Connection, after: int) -> _Page:
    """Entries with seq > after (one page) merged with their checkpoints, in export order.

    after = -1 starts at the beginning (checkpoints at seq 0 included).
    """
    entries = [
        _entry(row)
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
