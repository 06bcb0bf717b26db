"""SqliteMessageStore: the embedded MessageStore (one SQLite file, WAL, fsync on commit).

Writes (append, settle, cursors, retention) go through one GroupCommitWriter, so concurrent
callers share one transaction and one fsync. Reads use a small pool of read-only connections
in worker threads. Offsets are assigned from a counter kept in the database, so they are
contiguous and never reused, even after retention removed every message.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import sqlite3
from collections.abc import Collection, Sequence
from pathlib import Path

from broker.store.base import (
    PRECEDENCES,
    Appended,
    Eligibility,
    ExpiryReason,
    NewMessage,
    Notice,
    Rejected,
    StoredMessage,
    StoreError,
    StoreFull,
    StoreStats,
    Sweep,
)
from broker.store.readers import ReaderPool
from broker.store.writer import GroupCommitWriter, is_disk_full
from coalition.labels import valid_precedence

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    head INTEGER NOT NULL, messages INTEGER NOT NULL, bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO state (id, head, messages, bytes) VALUES (1, 0, 0, 0);
CREATE TABLE IF NOT EXISTS messages (
    msg_offset INTEGER PRIMARY KEY, stored_ms INTEGER NOT NULL,
    message_id TEXT NOT NULL, sender TEXT NOT NULL, sequence INTEGER NOT NULL,
    topic TEXT NOT NULL, precedence INTEGER NOT NULL, classification INTEGER NOT NULL,
    label BLOB NOT NULL, created_ms INTEGER NOT NULL, expiry_ms INTEGER NOT NULL,
    envelope BLOB NOT NULL, digest BLOB NOT NULL, size INTEGER NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_id ON messages (sender, message_id);
CREATE INDEX IF NOT EXISTS messages_by_precedence ON messages (precedence, msg_offset);
CREATE INDEX IF NOT EXISTS messages_by_time ON messages (stored_ms);
CREATE INDEX IF NOT EXISTS messages_by_expiry ON messages (expiry_ms) WHERE expiry_ms > 0;
CREATE TABLE IF NOT EXISTS senders (
    sender TEXT PRIMARY KEY, last_sequence INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cursors (
    subscriber TEXT PRIMARY KEY, cursor INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS settled (
    subscriber TEXT NOT NULL, msg_offset INTEGER NOT NULL,
    PRIMARY KEY (subscriber, msg_offset)) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS message_added AFTER INSERT ON messages BEGIN
    UPDATE state SET messages = messages + 1, bytes = bytes + new.size WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS message_removed AFTER DELETE ON messages BEGIN
    UPDATE state SET messages = messages - 1, bytes = bytes - old.size WHERE id = 1; END;
CREATE TABLE IF NOT EXISTS usage (
    sender TEXT PRIMARY KEY, bytes INTEGER NOT NULL, messages INTEGER NOT NULL) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS usage_added AFTER INSERT ON messages BEGIN
    INSERT INTO usage (sender, bytes, messages) VALUES (new.sender, new.size, 1)
    ON CONFLICT (sender) DO UPDATE SET bytes = bytes + new.size, messages = messages + 1; END;
CREATE TRIGGER IF NOT EXISTS usage_removed AFTER DELETE ON messages BEGIN
    UPDATE usage SET bytes = bytes - old.size, messages = messages - 1
    WHERE sender = old.sender; END;
CREATE TABLE IF NOT EXISTS notices (
    subscriber TEXT NOT NULL, msg_offset INTEGER NOT NULL, sender TEXT NOT NULL,
    message_id TEXT NOT NULL, sequence INTEGER NOT NULL, recipient_sequence INTEGER NOT NULL,
    topic TEXT NOT NULL, reason TEXT NOT NULL, stored_ms INTEGER NOT NULL,
    removed_ms INTEGER NOT NULL, audited INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (subscriber, msg_offset)) WITHOUT ROWID;
"""
# usage: stored bytes per sender, kept by the triggers in the same transaction as the
# messages, for the per-sender quota and retention's fair shares.
# notices: messages retention removed before an eligible subscriber had them, kept until
# that subscriber acknowledges the notice. audited = 1 once the audit log holds the
# expiry; only then is a notice sent.
# state.audited (added by _migrate): every message at or below this offset has its
# publish.accepted audit entry durable. The entry is written after the store commit, so a
# crash (or an audit failure) between the two would otherwise leave a stored message with
# no record of its acceptance; the broker records the missing ones from what is above it.
# A column of the row every append already rewrites: keeping it costs no extra page.

# Columns in StoredMessage field order. Every query below is a constant; values are bound.
_INSERT = (
    "INSERT INTO messages (msg_offset, stored_ms, message_id, sender, sequence, topic,"
    " precedence, classification, label, created_ms, expiry_ms, envelope, digest, size)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_GET = (
    "SELECT msg_offset, stored_ms, message_id, sender, sequence, topic, precedence,"
    " classification, label, created_ms, expiry_ms, envelope, digest"
    " FROM messages WHERE msg_offset = ?"
)
_PENDING_AT_PRECEDENCE = (
    "SELECT msg_offset"
    " FROM messages m INDEXED BY messages_by_precedence"
    " WHERE m.precedence = ? AND m.msg_offset > ? AND NOT EXISTS"
    " (SELECT 1 FROM settled s WHERE s.subscriber = ? AND s.msg_offset = m.msg_offset)"
    " ORDER BY m.msg_offset LIMIT ?"
)
_ROWS_BY_OFFSET = (
    "SELECT msg_offset, stored_ms, message_id, sender, sequence, topic, precedence,"
    " classification, label, created_ms, expiry_ms, envelope, digest"
    " FROM messages WHERE msg_offset IN ({})"
)
_UNAUDITED = (
    "SELECT msg_offset, stored_ms, message_id, sender, sequence, topic, precedence,"
    " classification, label, created_ms, expiry_ms, envelope, digest"
    " FROM messages WHERE msg_offset > (SELECT audited FROM state)"
    " ORDER BY msg_offset LIMIT ?"
)
_FIRST_UNSETTLED = (
    "SELECT m.msg_offset FROM messages m WHERE m.msg_offset > ? AND NOT EXISTS"
    " (SELECT 1 FROM settled s WHERE s.subscriber = ? AND s.msg_offset = m.msg_offset)"
    " ORDER BY m.msg_offset LIMIT 1"
)
_BACKLOG = (
    "SELECT COUNT(*) FROM messages m WHERE m.msg_offset > ? AND NOT EXISTS"
    " (SELECT 1 FROM settled s WHERE s.subscriber = ? AND s.msg_offset = m.msg_offset)"
)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _map_error(exc: BaseException) -> Exception:
    if isinstance(exc, StoreError):
        return exc
    if is_disk_full(exc):
        return StoreFull(
            f"message store is full: the disk or database file is full ({exc}); "
            "refusing new messages"
        )
    return StoreError(f"message store failed: {exc}")


def _stored(row: tuple[object, ...]) -> StoredMessage:
    return StoredMessage(*row)  # type: ignore[arg-type]  # columns are in field order


def _cursor_of(conn: sqlite3.Connection, subscriber: str) -> int:
    row = conn.execute("SELECT cursor FROM cursors WHERE subscriber = ?", (subscriber,)).fetchone()
    if row is None:
        raise StoreError(f"subscriber {subscriber!r} has no cursor; call ensure_cursor first")
    return int(row[0])


def _state(conn: sqlite3.Connection) -> tuple[int, int, int]:
    head, messages, size = conn.execute("SELECT head, messages, bytes FROM state").fetchone()
    return int(head), int(messages), int(size)


def _migrate(conn: sqlite3.Connection) -> None:
    if "audited" not in {row[1] for row in conn.execute("PRAGMA table_info(state)")}:
        # New, or from before the column: what it holds was audited when it was stored,
        # as far as anyone can tell now.
        conn.execute("ALTER TABLE state ADD COLUMN audited INTEGER NOT NULL DEFAULT 0")
        conn.execute("UPDATE state SET audited = head")
    (counted,) = conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM usage").fetchone()
    if int(counted) != _state(conn)[2]:
        # A store from before per-sender usage: count it once.
        conn.execute("DELETE FROM usage")
        conn.execute(
            "INSERT INTO usage (sender, bytes, messages)"
            " SELECT sender, SUM(size), COUNT(*) FROM messages GROUP BY sender"
        )


def fair_level(usage: Collection[int], target: int) -> int:
    """The largest level L with sum(min(u, L) for u in usage) <= target (max-min fairness).

    Retention by size trims each sender above L down to L and leaves the others alone:
    a sender holding no more than an equal share of what remains is never trimmed
    because of another's volume. Returns max(usage) when everything fits.
    """
    ordered = sorted(usage)
    remaining = target
    for i, u in enumerate(ordered):
        share = remaining // (len(ordered) - i)
        if u > share:
            return share
        remaining -= u
    return ordered[-1] if ordered else 0


_NOTICE_COLUMNS = (
    "subscriber, msg_offset, sender, message_id, sequence, recipient_sequence, topic, reason,"
    " stored_ms, removed_ms"
)


def _notice(row: tuple[object, ...]) -> Notice:
    return Notice(*row)  # type: ignore[arg-type]  # columns are in field order


def _waiting(conn: sqlite3.Connection, low: int, high: int) -> dict[str, tuple[int, set[int]]]:
    """Subscribers whose cursor is below high, with their settled offsets in low..high."""
    out: dict[str, tuple[int, set[int]]] = {}
    for subscriber, cursor in conn.execute(
        "SELECT subscriber, cursor FROM cursors WHERE cursor < ?", (high,)
    ).fetchall():
        settled = {
            int(o)
            for (o,) in conn.execute(
                "SELECT msg_offset FROM settled"
                " WHERE subscriber = ? AND msg_offset BETWEEN ? AND ?",
                (subscriber, low, high),
            )
        }
        out[str(subscriber)] = (int(cursor), settled)
    return out


def _still_waiting(conn: sqlite3.Connection, proposed: list[Notice]) -> list[Notice]:
    """The proposed notices whose subscriber still has not settled the message."""
    if not proposed:
        return []
    offsets = [n.offset for n in proposed]
    waiting = _waiting(conn, min(offsets), max(offsets))
    out = []
    for n in proposed:
        state = waiting.get(n.subscriber)
        if state is not None and state[0] < n.offset and n.offset not in state[1]:
            out.append(n)
    return out


_MARK = "UPDATE state SET audited = MAX(audited, ?)"


class SqliteMessageStore:
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
            path, schema=_SCHEMA, name="message-store", map_error=_map_error
        )
        try:
            await writer.submit(_migrate)
            readers = await ReaderPool.open(path, map_error=_map_error)
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

    @property
    def commits(self) -> int:
        """Transactions committed since open (for tests and metrics)."""
        return self._writer.commits

    # -- writes ------------------------------------------------------------------------------

    async def append(
        self, messages: Sequence[NewMessage], now_ms: int, *, audited_through: int = 0
    ) -> list[Appended | Rejected]:
        """Store messages in one transaction, durable on return; one result per message.

        (sender, message_id) must be new and each sequence above the sender's last one, also
        within the batch. A message that would take its sender past its quota
        (sender_bytes) is Rejected("quota_exceeded") alone. Raises StoreFull (nothing
        written) when the batch would take the store past max_bytes or the disk is full;
        ValueError for a malformed message.
        In the same transaction, mark_audited(audited_through): the broker's bookkeeping
        rides along with the next append instead of costing a commit of its own.
        """
        for m in messages:
            if not valid_precedence(m.precedence):
                raise ValueError(f"message {m.message_id}: precedence {m.precedence} not in 1..4")
            if hashlib.sha256(m.envelope).digest() != m.digest:
                raise ValueError(f"message {m.message_id}: digest is not SHA-256 of the envelope")
        if not messages:
            return []
        batch = tuple(messages)

        def job(conn: sqlite3.Connection) -> list[Appended | Rejected]:
            head, _, size = _state(conn)
            results: list[Appended | Rejected] = []
            last: dict[str, int] = {}
            used: dict[str, int] = {}
            quota = self._sender_bytes
            added = 0
            for m in batch:
                if m.sender not in last:
                    row = conn.execute(
                        "SELECT last_sequence FROM senders WHERE sender = ?", (m.sender,)
                    ).fetchone()
                    last[m.sender] = int(row[0]) if row else 0
                    if quota:
                        row = conn.execute(
                            "SELECT bytes FROM usage WHERE sender = ?", (m.sender,)
                        ).fetchone()
                        used[m.sender] = int(row[0]) if row else 0
                duplicate = conn.execute(
                    "SELECT 1 FROM messages WHERE sender = ? AND message_id = ?",
                    (m.sender, m.message_id),
                ).fetchone()
                if duplicate:
                    results.append(Rejected("duplicate_id"))
                    continue
                if m.sequence <= last[m.sender]:
                    results.append(Rejected("sequence_not_increasing"))
                    continue
                if quota and used[m.sender] + len(m.envelope) > quota:
                    results.append(Rejected("quota_exceeded", used[m.sender], quota))
                    continue
                if quota:
                    used[m.sender] += len(m.envelope)
                head += 1
                conn.execute(
                    _INSERT,
                    (
                        head,
                        now_ms,
                        m.message_id,
                        m.sender,
                        m.sequence,
                        m.topic,
                        m.precedence,
                        m.classification,
                        m.label,
                        m.created_ms,
                        m.expiry_ms,
                        m.envelope,
                        m.digest,
                        len(m.envelope),
                    ),
                )
                last[m.sender] = m.sequence
                added += len(m.envelope)
                results.append(Appended(head))
            if size + added > self._max_bytes:
                raise StoreFull(
                    f"message store is full ({_mib(size)} of {_mib(self._max_bytes)}, "
                    f"this batch needs {_mib(added)} more); refusing new messages"
                )
            conn.executemany(
                "INSERT INTO senders (sender, last_sequence) VALUES (?, ?) "
                "ON CONFLICT (sender) DO UPDATE SET last_sequence = excluded.last_sequence",
                last.items(),
            )
            conn.execute(
                "UPDATE state SET head = ?, audited = MAX(audited, ?)", (head, audited_through)
            )
            return results

        return await self._writer.submit(job)

    async def ensure_cursor(self, subscriber: str, at_offset: int) -> int:
        """Create subscriber's cursor at at_offset unless it exists; return the cursor."""

        def job(conn: sqlite3.Connection) -> int:
            conn.execute(
                "INSERT OR IGNORE INTO cursors (subscriber, cursor) VALUES (?, ?)",
                (subscriber, at_offset),
            )
            return _cursor_of(conn, subscriber)

        return await self._writer.submit(job)

    async def settle(self, subscriber: str, offsets: Sequence[int]) -> int:
        """Mark offsets done for subscriber (acked or skipped); advance and return its cursor.

        The cursor moves over the contiguous prefix of settled (or removed) offsets, and the
        settled marks below it are pruned. Raises StoreError if subscriber has no cursor.
        """
        wanted = tuple(offsets)

        def job(conn: sqlite3.Connection) -> int:
            cursor = _cursor_of(conn, subscriber)
            head = _state(conn)[0]
            conn.executemany(
                "INSERT OR IGNORE INTO settled (subscriber, msg_offset) VALUES (?, ?)",
                ((subscriber, o) for o in wanted if cursor < o <= head),
            )
            row = conn.execute(
                _FIRST_UNSETTLED,
                (cursor, subscriber),
            ).fetchone()
            new_cursor = max(cursor, int(row[0]) - 1 if row else head)
            if new_cursor != cursor:
                conn.execute(
                    "UPDATE cursors SET cursor = ? WHERE subscriber = ?", (new_cursor, subscriber)
                )
                conn.execute(
                    "DELETE FROM settled WHERE subscriber = ? AND msg_offset <= ?",
                    (subscriber, new_cursor),
                )
            return new_cursor

        return await self._writer.submit(job)

    async def unaudited(self, limit: int = 10_000) -> list[StoredMessage]:
        """Up to limit stored messages above the audited mark (mark_audited), oldest first."""
        return await self._readers.run(
            lambda conn: [_stored(row) for row in conn.execute(_UNAUDITED, (limit,))]
        )

    async def audited_through(self) -> int:
        """The audited mark: messages at or below it have their acceptance entries."""
        return await self._readers.run(
            lambda conn: int(conn.execute("SELECT audited FROM state").fetchone()[0])
        )

    async def mark_audited(self, through: int) -> None:
        """Record that the acceptance entries of every message up to through are durable
        in the audit log (the mark never moves back)."""
        await self._writer.submit(lambda conn: conn.execute(_MARK, (through,)))

    async def enforce_retention(self, now_ms: int) -> int:
        """Remove messages stored before now - max_age_ms, expired ones, then, while the
        store holds more than retention_bytes, the oldest of the senders above their fair
        share (see sweep); return how many were removed."""
        return (await self.sweep(now_ms)).removed

    async def sweep(self, now_ms: int, eligible: Eligibility | None = None) -> Sweep:
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
        them and records the notices of the subscribers that still had not settled them.
        """
        async with self._sweeping:
            victims, proposed = await self._readers.run(
                lambda conn: self._plan(conn, now_ms, eligible)
            )

            def job(conn: sqlite3.Connection) -> Sweep:
                notices = _still_waiting(conn, proposed)
                cur = conn.executemany(
                    "DELETE FROM messages WHERE msg_offset = ?", ((o,) for o in sorted(victims))
                )
                conn.executemany(
                    f"INSERT OR IGNORE INTO notices ({_NOTICE_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (dataclasses.astuple(n) for n in notices),
                )
                by_reason: dict[str, int] = {}
                for reason in victims.values():
                    by_reason[reason] = by_reason.get(reason, 0) + 1
                return Sweep(removed=int(cur.rowcount), by_reason=by_reason, notices=notices)

            return await self._writer.submit(job)

    def _plan(
        self, conn: sqlite3.Connection, now_ms: int, eligible: Eligibility | None
    ) -> tuple[dict[int, str], list[Notice]]:
        """What a sweep removes (offset -> reason) and the notices it would record."""
        victims: dict[int, str] = {}
        if self._max_age_ms > 0:
            for (offset,) in conn.execute(
                "SELECT msg_offset FROM messages WHERE stored_ms < ?",
                (now_ms - self._max_age_ms,),
            ):
                victims[int(offset)] = "retention_age"
        for (offset,) in conn.execute(
            "SELECT msg_offset FROM messages WHERE expiry_ms > 0 AND expiry_ms <= ?", (now_ms,)
        ):
            victims.setdefault(int(offset), "label_expired")
        if self._retention_bytes > 0:
            self._size_victims(conn, victims)
        notices: list[Notice] = []
        if eligible is not None:
            notices = self._notices_for(conn, victims, eligible, now_ms)
        return victims, notices

    def _size_victims(self, conn: sqlite3.Connection, victims: dict[int, str]) -> None:
        """Add to victims what retention by size removes, after what is already in it."""
        gone: dict[str, int] = {}
        if victims:
            sql = "SELECT sender, size FROM messages WHERE msg_offset IN ({})"
            chosen = sorted(victims)
            for i in range(0, len(chosen), 500):
                part = chosen[i : i + 500]
                for sender, size in conn.execute(sql.format(",".join("?" * len(part))), part):
                    gone[sender] = gone.get(sender, 0) + int(size)
        usage = {
            str(sender): int(size) - gone.get(str(sender), 0)
            for sender, size in conn.execute("SELECT sender, bytes FROM usage WHERE bytes > 0")
        }
        if sum(usage.values()) <= self._retention_bytes:
            return
        level = fair_level(list(usage.values()), self._retention_bytes)
        over = {s: u - level for s, u in usage.items() if u > level}
        # Oldest first among the senders above the level, until each is down to it.
        marks = ",".join("?" * len(over))
        rows = conn.execute(
            f"SELECT msg_offset, sender, size FROM messages WHERE sender IN ({marks})"
            " ORDER BY msg_offset",
            list(over),
        )
        for offset, sender, size in rows:
            if offset in victims or over.get(sender, 0) <= 0:
                continue
            victims[int(offset)] = "retention_size"
            over[sender] -= int(size)
            if all(v <= 0 for v in over.values()):
                break

    def _notices_for(
        self,
        conn: sqlite3.Connection,
        victims: dict[int, str],
        eligible: Eligibility,
        now_ms: int,
    ) -> list[Notice]:
        """Notices for the subscribers that had not settled a removed message and may
        have received it (eligible), label expiry aside."""
        candidates = sorted(o for o, r in victims.items() if r != "label_expired")
        if not candidates:
            return []
        waiting = _waiting(conn, candidates[0], candidates[-1])
        out: list[Notice] = []
        for offset in candidates:
            who = {
                s
                for s, (cursor, settled) in waiting.items()
                if cursor < offset and offset not in settled
            }
            if not who:
                continue
            m = _stored(conn.execute(_GET, (offset,)).fetchone())
            expiry: ExpiryReason = (
                "retention_age" if victims[offset] == "retention_age" else "retention_size"
            )
            for subscriber, recipient_sequence in sorted(eligible(m).items()):
                if subscriber in who and subscriber != m.sender:
                    out.append(
                        Notice(
                            subscriber=subscriber,
                            offset=offset,
                            sender=m.sender,
                            message_id=m.message_id,
                            sequence=m.sequence,
                            recipient_sequence=recipient_sequence,
                            topic=m.topic,
                            reason=expiry,
                            stored_ms=m.stored_ms,
                            removed_ms=now_ms,
                        )
                    )
        return out

    async def mark_notices_audited(self, notices: Sequence[Notice]) -> None:
        """Their expiry entries are in the audit log: they may be sent now."""
        keys = [(n.subscriber, n.offset) for n in notices]
        if not keys:
            return

        def job(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE notices SET audited = 1 WHERE subscriber = ? AND msg_offset = ?", keys
            )

        await self._writer.submit(job)

    async def trim_notices(self, keep: int) -> int:
        """Forget each subscriber's oldest audited notices beyond keep; return how many.

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
            row = conn.execute(_GET, (offset,)).fetchone()
            return _stored(row) if row else None

        return await self._readers.run(read)

    async def head(self) -> int:
        """Highest offset ever assigned, 0 if none."""
        return await self._readers.run(lambda conn: _state(conn)[0])

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

        def read(conn: sqlite3.Connection) -> tuple[list[StoredMessage], int]:
            cursor = _cursor_of(conn, subscriber)
            head = _state(conn)[0]
            chosen: list[int] = []
            for precedence in PRECEDENCES:
                if len(chosen) >= limit:
                    break
                rows = conn.execute(
                    _PENDING_AT_PRECEDENCE,
                    (precedence, cursor, subscriber, limit - len(chosen) + len(skip)),
                )
                chosen.extend(o for (o,) in rows if o not in skip)
            chosen = chosen[:limit]
            if not chosen:
                return [], head
            sql = _ROWS_BY_OFFSET.format(",".join("?" * len(chosen)))
            by_offset = {row[0]: _stored(row) for row in conn.execute(sql, chosen)}
            return [by_offset[o] for o in chosen if o in by_offset], head

        return await self._readers.run(read)

    async def backlog_count(self, subscriber: str) -> int:
        """Unsettled messages above subscriber's cursor; raises StoreError if no cursor."""

        def read(conn: sqlite3.Connection) -> int:
            cursor = _cursor_of(conn, subscriber)
            row = conn.execute(
                _BACKLOG,
                (cursor, subscriber),
            ).fetchone()
            return int(row[0])

        return await self._readers.run(read)

    async def usage(self) -> dict[str, int]:
        """Stored envelope bytes per sender (senders holding none are left out)."""

        def read(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute("SELECT sender, bytes FROM usage WHERE bytes > 0 ORDER BY sender")
            return {str(s): int(b) for s, b in rows}

        return await self._readers.run(read)

    async def notices(
        self, subscriber: str, limit: int, *, after: int = 0, audited: bool = True
    ) -> list[Notice]:
        """Subscriber's notices not yet acknowledged above offset after, by offset
        (only audited ones if so)."""

        def read(conn: sqlite3.Connection) -> list[Notice]:
            rows = conn.execute(
                f"SELECT {_NOTICE_COLUMNS} FROM notices WHERE subscriber = ? AND msg_offset > ?"
                " AND audited >= ? ORDER BY msg_offset LIMIT ?",
                (subscriber, after, int(audited), limit),
            )
            return [_notice(r) for r in rows]

        return await self._readers.run(read)

    async def unaudited_notices(self, limit: int = 10_000) -> list[Notice]:
        """Notices whose expiry entries are not in the audit log yet, oldest removal first."""

        def read(conn: sqlite3.Connection) -> list[Notice]:
            rows = conn.execute(
                f"SELECT {_NOTICE_COLUMNS} FROM notices WHERE audited = 0"
                " ORDER BY removed_ms, subscriber, msg_offset LIMIT ?",
                (limit,),
            )
            return [_notice(r) for r in rows]

        return await self._readers.run(read)

    async def notice_subscribers(self) -> set[str]:
        """Subscribers holding audited notices they have not acknowledged."""

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
            return (*_state(conn), file_bytes)

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
