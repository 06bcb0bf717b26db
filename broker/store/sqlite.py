"""SqliteMessageStore: the embedded MessageStore (one SQLite file, WAL, fsync on commit).

Writes (append, record, settle, cursors, retention) go through one GroupCommitWriter, so
concurrent callers share one transaction and one fsync; each write that makes a decision
writes its audit records into the outbox table in that same transaction (see
MessageStore). Reads use a small pool of read-only connections in worker threads. Offsets
are assigned from a counter kept in the database, so they are contiguous and never
reused, even after retention removed every message. The schema is in schema, retention
planning in sweeping, the outbox's SQL in outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
from collections.abc import Collection, Sequence
from pathlib import Path

from broker.store import outbox, sweeping
from broker.store.base import (
    AcceptanceRecords,
    Appended,
    Eligibility,
    NewMessage,
    Notice,
    NoticeRecords,
    OutboxRow,
    Rejected,
    StoredMessage,
    StoreStats,
    Sweep,
)
from broker.store.messages import append_messages, pending_and_head, settle_offsets
from broker.store.readers import ReaderPool
from broker.store.schema import (
    BACKLOG,
    GET,
    SCHEMA,
    cursor_of,
    map_error,
    migrate,
    state,
    stored,
)
from broker.store.sweeping import NOTICE_COLUMNS, notice
from broker.store.writer import GroupCommitWriter, WriterOwner
from coalition.labels import valid_precedence


class SqliteMessageStore(WriterOwner):
    """MessageStore on one SQLite file; open with ``await SqliteMessageStore.open(...)``."""

    def __init__(
        self,
        path: Path,
        writer: GroupCommitWriter,
        readers: ReaderPool,
        *,
        max_bytes: int,
        retention_bytes: int,
        max_age_ms: int,
        sender_bytes: int = 0,
    ) -> None:
        self._path = path
        self._writer = writer
        self._readers = readers
        self._max_bytes = max_bytes
        self._retention_bytes = retention_bytes
        self._max_age_ms = max_age_ms
        self._sender_bytes = sender_bytes
        self._sweeping = asyncio.Lock()

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        max_bytes: int,
        retention_bytes: int = 0,
        max_age_ms: int = 0,
        sender_bytes: int = 0,
    ) -> SqliteMessageStore:
        """Open or create the store; max_bytes is the hard limit, 0 disables a retention rule.

        sender_bytes is each sender's quota of stored envelope bytes (0 = none); it must be
        below max_bytes, so one sender alone can never fill the store. Raises StoreError if
        the file cannot be opened as a store, ValueError for such a quota.
        """
        if sender_bytes < 0 or (sender_bytes and sender_bytes >= max_bytes):
            raise ValueError(
                f"the per-sender quota ({sender_bytes} bytes) must be below the store's "
                f"limit ({max_bytes} bytes), so one sender alone cannot fill the store"
            )
        writer = await GroupCommitWriter.open(
            path, schema=SCHEMA, name="message-store", map_error=map_error
        )
        try:
            await writer.submit(migrate)
            readers = await ReaderPool.open(path, map_error=map_error)
        except BaseException:
            await writer.close()
            raise
        return cls(
            Path(path),
            writer,
            readers,
            max_bytes=max_bytes,
            retention_bytes=retention_bytes,
            max_age_ms=max_age_ms,
            sender_bytes=sender_bytes,
        )

    # -- writes ------------------------------------------------------------------------------

    async def append(
        self,
        messages: Sequence[NewMessage],
        now_ms: int,
        *,
        records: AcceptanceRecords | None = None,
        also: Sequence[str] = (),
    ) -> list[Appended | Rejected]:
        """Store messages in one transaction, durable on return; one result per message.

        (sender, message_id) must be new and each sequence above the sender's last one, also
        within the batch. A message that would take its sender past its quota
        (sender_bytes) is Rejected("quota_exceeded") alone. Raises StoreFull (nothing
        written) when the batch would take the store past max_bytes or the disk is full;
        ValueError for a malformed message.
        In the same transaction, the outbox gets records(the messages stored), then also.
        """
        for m in messages:
            if not valid_precedence(m.precedence):
                raise ValueError(f"message {m.message_id}: precedence {m.precedence} not in 1..4")
            if hashlib.sha256(m.envelope).digest() != m.digest:
                raise ValueError(f"message {m.message_id}: digest is not SHA-256 of the envelope")
        if not messages and not also:
            return []
        batch, extra = tuple(messages), tuple(also)

        def job(conn: sqlite3.Connection) -> list[Appended | Rejected]:
            return append_messages(
                conn,
                batch,
                now_ms,
                max_bytes=self._max_bytes,
                quota=self._sender_bytes,
                records=records,
                also=extra,
            )

        return await self._writer.submit(job)

    async def record(self, records: Sequence[str], now_ms: int) -> None:
        """Write audit records alone into the outbox, durable on return (group-committed
        with whatever else is queued); raises StoreFull, StoreError."""
        if records:
            rows = tuple(records)
            await self._writer.submit(lambda conn: outbox.insert_records(conn, rows, now_ms))

    async def read_outbox(self, after: int, limit: int) -> list[OutboxRow]:
        """Up to limit outbox rows with id above after, oldest first (for the drainer)."""
        return await self._readers.run(lambda conn: outbox.read(conn, after, limit))

    async def forget_outbox(self, through: int) -> None:
        """The audit log holds every row up to through: delete them in the next write
        transaction (no commit of its own; close() runs it if none comes)."""
        self._writer.ride(lambda conn: outbox.forget(conn, through))

    async def ensure_cursor(self, subscriber: str, at_offset: int) -> int:
        """Create subscriber's cursor at at_offset unless it exists; return the cursor."""

        def job(conn: sqlite3.Connection) -> int:
            conn.execute(
                "INSERT OR IGNORE INTO cursors (subscriber, cursor) VALUES (?, ?)",
                (subscriber, at_offset),
            )
            return cursor_of(conn, subscriber)

        return await self._writer.submit(job)

    async def settle(self, subscriber: str, offsets: Sequence[int]) -> int:
        """Mark offsets done for subscriber (acked or skipped); advance and return its cursor.

        The cursor moves over the contiguous prefix of settled (or removed) offsets, the marks
        below it are pruned; committed with the next write (submit_with_next), durable on
        return. Raises StoreError if subscriber has no cursor."""
        wanted = tuple(offsets)
        return await self._writer.submit_with_next(
            lambda conn: settle_offsets(conn, subscriber, wanted)
        )

    async def enforce_retention(self, now_ms: int) -> int:
        """Remove messages stored before now - max_age_ms, expired ones, then, while the
        store holds more than retention_bytes, the oldest of the senders above their fair
        share (see sweep); return how many were removed."""
        return (await self.sweep(now_ms)).removed

    async def sweep(
        self,
        now_ms: int,
        eligible: Eligibility | None = None,
        records: NoticeRecords | None = None,
    ) -> Sweep:
        """Retention: by age, by label expiry, then by size; one sweep at a time.

        By size, only senders holding more than their fair share lose messages, oldest
        first: the share is the level L at which every sender keeping min(its bytes, L)
        fits in retention_bytes (fair_level). So one sender's volume never evicts another
        sender that holds no more than an equal share.

        With eligible, each removed message (by age or size) that a subscriber with a
        cursor had not settled (acknowledged or skipped) gets a Notice for every such
        subscriber that eligible(message) names; label expiry records none (an expired
        label is delivered to nobody). Notices start unaudited.

        The victims and candidate notices are chosen on a read snapshot (eligible parses
        envelopes, which must not hold up the writer); one write transaction then removes
        them and records the notices of the subscribers that still had not settled them,
        with their audit records.
        """
        async with self._sweeping:
            victims, proposed = await self._readers.run(
                lambda conn: sweeping.plan(
                    conn,
                    now_ms,
                    eligible,
                    max_age_ms=self._max_age_ms,
                    retention_bytes=self._retention_bytes,
                )
            )
            return await self._writer.submit(
                lambda conn: sweeping.apply(conn, victims, proposed, records, now_ms)
            )

    async def trim_notices(self, keep: int) -> int:
        """Forget each subscriber's oldest notices beyond keep; return how many.

        Bounds what one subscriber's absence costs the store; the expiries stay in the
        audit log.
        """

        def job(conn: sqlite3.Connection) -> int:
            removed = 0
            over = conn.execute(
                "SELECT subscriber, COUNT(*) FROM notices WHERE audited = 1"
                " GROUP BY subscriber HAVING COUNT(*) > ?",
                (keep,),
            ).fetchall()
            for subscriber, count in over:
                cur = conn.execute(
                    "DELETE FROM notices WHERE subscriber = ? AND audited = 1 AND msg_offset IN"
                    " (SELECT msg_offset FROM notices WHERE subscriber = ? AND audited = 1"
                    " ORDER BY msg_offset LIMIT ?)",
                    (subscriber, subscriber, int(count) - keep),
                )
                removed += cur.rowcount
            return removed

        return await self._writer.submit(job)

    async def drop_notices(self, subscriber: str, offsets: Sequence[int]) -> int:
        """Forget the subscriber's acknowledged notices; return how many there were."""
        wanted = tuple(offsets)

        def job(conn: sqlite3.Connection) -> int:
            cur = conn.executemany(
                "DELETE FROM notices WHERE subscriber = ? AND msg_offset = ? AND audited = 1",
                ((subscriber, o) for o in wanted),
            )
            return int(cur.rowcount)

        return await self._writer.submit(job)

    # -- reads -------------------------------------------------------------------------------

    async def last_sequence(self, sender: str) -> int:
        """Highest sequence ever stored for sender (kept after retention), 0 if none."""

        def read(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT last_sequence FROM senders WHERE sender = ?", (sender,)
            ).fetchone()
            return int(row[0]) if row else 0

        return await self._readers.run(read)

    async def has_message(self, sender: str, message_id: str) -> bool:
        """Whether (sender, message_id) is currently stored."""

        def read(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM messages WHERE sender = ? AND message_id = ?", (sender, message_id)
            ).fetchone()
            return row is not None

        return await self._readers.run(read)

    async def get(self, offset: int) -> StoredMessage | None:
        """The message at offset, None if never stored or removed by retention."""

        def read(conn: sqlite3.Connection) -> StoredMessage | None:
            row = conn.execute(GET, (offset,)).fetchone()
            return stored(row) if row else None

        return await self._readers.run(read)

    async def head(self) -> int:
        """Highest offset ever assigned, 0 if none."""
        return await self._readers.run(lambda conn: state(conn)[0])

    async def cursor(self, subscriber: str) -> int | None:
        """Subscriber's durable cursor, None if it has none."""

        def read(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(
                "SELECT cursor FROM cursors WHERE subscriber = ?", (subscriber,)
            ).fetchone()
            return int(row[0]) if row else None

        return await self._readers.run(read)

    async def pending(
        self, subscriber: str, limit: int, exclude: Collection[int] = ()
    ) -> list[StoredMessage]:
        """Up to limit unsettled messages above the cursor, FLASH first, then by offset.

        Offsets in exclude (e.g. in flight to the subscriber) are skipped without reading
        their envelopes. One index range scan per precedence level, offsets only, then
        one read of the chosen rows. Raises StoreError if no cursor.
        """
        return (await self.pending_and_head(subscriber, limit, exclude))[0]

    async def pending_and_head(
        self, subscriber: str, limit: int, exclude: Collection[int] = ()
    ) -> tuple[list[StoredMessage], int]:
        """pending(), and the head offset of the same snapshot. Raises StoreError if no cursor."""
        skip = frozenset(exclude)

        return await self._readers.run(lambda conn: pending_and_head(conn, subscriber, limit, skip))

    async def backlog_count(self, subscriber: str) -> int:
        """Unsettled messages above subscriber's cursor; raises StoreError if no cursor."""

        def read(conn: sqlite3.Connection) -> int:
            row = conn.execute(BACKLOG, (cursor_of(conn, subscriber), subscriber)).fetchone()
            return int(row[0])

        return await self._readers.run(read)

    async def usage(self) -> dict[str, int]:
        """Stored envelope bytes per sender (senders holding none are left out)."""

        def read(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute("SELECT sender, bytes FROM usage WHERE bytes > 0 ORDER BY sender")
            return {str(s): int(b) for s, b in rows}

        return await self._readers.run(read)

    async def notices(self, subscriber: str, limit: int, *, after: int = 0) -> list[Notice]:
        """Subscriber's notices not yet acknowledged above offset after, by offset."""

        def read(conn: sqlite3.Connection) -> list[Notice]:
            rows = conn.execute(
                f"SELECT {NOTICE_COLUMNS} FROM notices WHERE subscriber = ? AND msg_offset > ?"
                " AND audited = 1 ORDER BY msg_offset LIMIT ?",
                (subscriber, after, limit),
            )
            return [notice(r) for r in rows]

        return await self._readers.run(read)

    async def notice_subscribers(self) -> set[str]:
        """Subscribers holding notices they have not acknowledged."""

        def read(conn: sqlite3.Connection) -> set[str]:
            rows = conn.execute("SELECT DISTINCT subscriber FROM notices WHERE audited = 1")
            return {str(s) for (s,) in rows}

        return await self._readers.run(read)

    async def stats(self) -> StoreStats:
        """Message count, envelope bytes, head offset, file size and commit count."""

        def read(conn: sqlite3.Connection) -> tuple[int, int, int, int]:
            file_bytes = 0
            for suffix in ("", "-wal"):
                with contextlib.suppress(FileNotFoundError):
                    file_bytes += os.stat(f"{self._path}{suffix}").st_size
            return (*state(conn), file_bytes)

        head, messages, size, file_bytes = await self._readers.run(read)
        return StoreStats(
            messages=messages,
            bytes=size,
            head=head,
            file_bytes=file_bytes,
            commits=self._writer.commits,
        )

    async def verify_integrity(self) -> list[int]:
        """Offsets whose envelope bytes no longer hash to their recorded digest."""

        def read(conn: sqlite3.Connection) -> list[int]:
            return [
                int(offset)
                for offset, envelope, digest in conn.execute(
                    "SELECT msg_offset, envelope, digest FROM messages ORDER BY msg_offset"
                )
                if hashlib.sha256(envelope).digest() != digest
            ]

        return await self._readers.run(read)

    async def close(self) -> None:
        """Commit pending writes, checkpoint the WAL and close every connection."""
        await self._readers.close()
        await self._writer.close()
