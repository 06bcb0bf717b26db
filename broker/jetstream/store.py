"""JetStreamMessageStore: the MessageStore on a NATS JetStream cluster (R3, fsync always).

Layout (see codec): one stream ``<prefix>_MESSAGES`` holds the messages, the audit
outbox, the expiry notices and the control entries of retention; a key-value bucket
``<prefix>_CURSORS`` holds each subscriber's cursor (see cursors). An offset is the
message's stream sequence, so offsets are increasing and never reused but not
contiguous: outbox, notice and control entries take sequences too.

Every write goes through one Committer (group commit): the writes queued together
become ONE atomic batch (ADR-50) pinned to the stream's last sequence with
``Nats-Expected-Last-Sequence``. That gives the interface's guarantees across brokers,
not just within one:

- a commit carries its audit records: an append's messages and its outbox records (and
  a sweep's removals, notices and records) are entries of the same atomic batch, so the
  cluster stores both or neither;
- offsets are known before the commit (the batch lands right after the pinned
  sequence), so acceptance records can name them;
- strict per-sender sequence, duplicate ids, the per-sender quota and max_bytes are
  checked on the store's state as of the pinned sequence: if another broker committed
  in between, the pin fails, this broker reads what it wrote and decides again. So two
  brokers appending for one sender at once never both win a sequence, and the quota and
  max_bytes are exact across brokers, not only within one. The cost: brokers that write
  at the same moment serialize (the loser re-plans, one round trip later).

``Nats-Msg-Id`` is not set: the pin already makes a retry after a lost acknowledgement
safe (the retry is pinned to the same sequence, so at most one of them is stored, and
each entry names its batch, so the writer finds out which), and JetStream's time-bounded
de-duplication would refuse a whole batch for an id whose earlier message retention has
already removed, which this store accepts (as the SQLite store does).

Reads are answered from the view (see view): the state folded from the stream, kept
current by an ordered consumer (see feed); envelopes are read from the stream by
sequence (the leader answers), with a bounded cache of recent ones.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Collection, Sequence
from typing import Any

from nats.aio.client import Client
from nats.js.api import StorageType, StreamConfig

from broker.jetstream import codec
from broker.jetstream.batches import Entry
from broker.jetstream.committer import Committer, Draft
from broker.jetstream.connect import ClusterSettings
from broker.jetstream.cursors import Cursors
from broker.jetstream.feed import Feed
from broker.jetstream.reading import Envelopes, ensure_stream
from broker.jetstream.sweeper import Sweeper
from broker.jetstream.view import StoreView
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
    StoreError,
    StoreFull,
    StoreStats,
    Sweep,
    stored_message,
)
from broker.store.schema import mib
from coalition.labels import valid_precedence


class JetStreamMessageStore:
    """MessageStore on JetStream; open with ``await JetStreamMessageStore.open(nc, ...)``.

    The caller owns the NATS connection (close() leaves it open).
    """

    def __init__(
        self,
        settings: ClusterSettings,
        view: StoreView,
        feed: Feed,
        committer: Committer,
        cursors: Cursors,
        envelopes: Envelopes,
        *,
        max_bytes: int,
        retention_bytes: int,
        max_age_ms: int,
        sender_bytes: int,
    ) -> None:
        self._subjects = codec.Subjects(settings)
        self._view = view
        self._feed = feed
        self._committer = committer
        self._cursors = cursors
        self._envelopes = envelopes
        self._max_bytes = max_bytes
        self._sender_bytes = sender_bytes
        self._max_payload = committer.max_payload
        self._sweeper = Sweeper(
            view,
            committer,
            cursors,
            envelopes,
            self._subjects,
            max_age_ms=max_age_ms,
            retention_bytes=retention_bytes,
        )

    @classmethod
    async def open(
        cls,
        nc: Client,
        settings: ClusterSettings,
        *,
        max_bytes: int,
        retention_bytes: int = 0,
        max_age_ms: int = 0,
        sender_bytes: int = 0,
    ) -> JetStreamMessageStore:
        """Open the deployment's store (creating its stream and bucket if missing) and
        read it whole; max_bytes is the hard limit, 0 disables a retention rule.

        sender_bytes is each sender's quota (0 = none), below max_bytes. Raises
        StoreError if the cluster cannot hold the store, ValueError for such a quota.
        """
        if sender_bytes < 0 or (sender_bytes and sender_bytes >= max_bytes):
            raise ValueError(
                f"the per-sender quota ({sender_bytes} bytes) must be below the store's "
                f"limit ({max_bytes} bytes), so one sender alone cannot fill the store"
            )
        js = nc.jetstream(timeout=10)
        subjects = codec.Subjects(settings)
        stream = settings.name("MESSAGES")
        await ensure_stream(
            js,
            StreamConfig(
                name=stream,
                subjects=[subjects.all],
                num_replicas=settings.replicas,
                storage=StorageType.FILE,
                allow_atomic=True,
                allow_direct=False,
                deny_delete=False,
                deny_purge=False,
            ),
        )
        cursors = await Cursors.open(js, settings)
        view = StoreView(subjects)
        envelopes = Envelopes(js, stream, view)
        feed = Feed(js, stream, subjects.all, view, envelopes.remember)
        await feed.start()
        committer = Committer(nc, view, feed)
        return cls(
            settings,
            view,
            feed,
            committer,
            cursors,
            envelopes,
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
        """Store messages in one atomic batch, durable on return; one result per message.

        The same rules as SqliteMessageStore.append, decided on the state as of the
        batch's pinned sequence (so across brokers too); raises StoreFull (nothing
        written) past max_bytes, StoreError when the cluster cannot commit, ValueError
        for a malformed message. The batch also holds records(the stored messages), then
        also, as outbox entries.
        """
        for m in messages:
            if not valid_precedence(m.precedence):
                raise ValueError(f"message {m.message_id}: precedence {m.precedence} not in 1..4")
            if hashlib.sha256(m.envelope).digest() != m.digest:
                raise ValueError(f"message {m.message_id}: digest is not SHA-256 of the envelope")
        if not messages and not also:
            return []
        batch, extra = tuple(messages), tuple(also)
        quota, limit, subjects = self._sender_bytes, self._max_bytes, self._subjects
        # What does not depend on the batch: computed once, not at every attempt.
        metas = [codec.message_meta(m, now_ms) for m in batch]
        routes = [subjects.message(m) for m in batch]

        def plan(draft: Draft, first: int, batch_id: str) -> tuple[list[Entry], Any]:
            results: list[Appended | Rejected] = []
            entries: list[Entry] = []
            fresh: list[StoredMessage] = []
            before = draft.total()
            for m, meta, subject in zip(batch, metas, routes, strict=True):
                if draft.has(m.sender, m.message_id):
                    results.append(Rejected("duplicate_id"))
                    continue
                if m.sequence <= draft.last_sequence(m.sender) and not m.forwarded:
                    results.append(Rejected("sequence_not_increasing"))
                    continue
                used = draft.used(m.sender)
                if quota and used + len(m.envelope) > quota:
                    results.append(Rejected("quota_exceeded", used, quota))
                    continue
                offset = first + len(entries)
                headers = {codec.H_MESSAGE: meta, codec.H_BATCH: batch_id}
                if codec.entry_bytes(headers, m.envelope) > self._max_payload:
                    raise StoreError(
                        f"message {m.message_id}: {len(m.envelope)} bytes do not fit in one "
                        f"NATS message (the servers' max_payload is {self._max_payload})"
                    )
                draft.ids.add((m.sender, m.message_id))
                draft.last[m.sender] = max(m.sequence, draft.last_sequence(m.sender))
                draft.usage[m.sender] = draft.usage.get(m.sender, 0) + len(m.envelope)
                draft.bytes += len(m.envelope)
                entries.append(Entry(subject, headers, m.envelope))
                fresh.append(stored_message(m, offset, now_ms))
                results.append(Appended(offset))
            if draft.total() > limit:
                raise StoreFull(
                    f"message store is full ({mib(before)} of {mib(limit)}, "
                    f"this batch needs {mib(draft.total() - before)} more); refusing new messages"
                )
            texts = [*(records(fresh) if records is not None and fresh else ()), *extra]
            entries += self._outbox_entries(texts, now_ms, batch_id)

            def answer() -> list[Appended | Rejected]:
                for s in fresh:
                    self._envelopes.remember(s)
                return results

            return entries, answer

        result: list[Appended | Rejected] = await self._committer.submit(plan)
        return result

    def _outbox_entries(self, texts: Sequence[str], now_ms: int, batch_id: str) -> list[Entry]:
        return codec.outbox_entries(self._subjects.outbox, texts, now_ms, batch_id)

    async def record(self, records: Sequence[str], now_ms: int) -> None:
        """Write audit records alone into the outbox, durable on return (sharing a batch
        with whatever else is queued); raises StoreFull, StoreError."""
        if not records:
            return
        texts = tuple(records)

        def plan(draft: Draft, first: int, batch_id: str) -> tuple[list[Entry], Any]:
            return self._outbox_entries(texts, now_ms, batch_id), lambda: None

        await self._committer.submit(plan)

    async def read_outbox(self, after: int, limit: int) -> list[OutboxRow]:
        """Up to limit outbox rows with id above after, oldest first (ids: codec.row_id)."""
        return self._view.read_outbox(after, limit)

    async def forget_outbox(self, through: int) -> None:
        """The audit log holds every row up to through: forget them and delete them from
        the stream (a purge of the outbox subject; a batch of its own only when the rows
        reach the stream's last entry)."""
        gone = self._view.forget_outbox(through)  # the last entry it forgot whole
        if gone >= self._view.applied:
            # The stream's last entry is never deleted (see feed): when rows to forget
            # reach it, a mark that every view applies takes its place.
            mark = codec.control_payload("forgot", through=through)

            def plan(draft: Draft, first: int, batch_id: str) -> tuple[list[Entry], Any]:
                headers = codec.plain_headers(0, batch_id)
                return [Entry(self._subjects.control, headers, mark)], lambda: None

            await self._committer.submit(plan)
        await self._envelopes.purge_outbox(self._subjects.outbox, gone)

    async def ensure_cursor(self, subscriber: str, at_offset: int) -> int:
        """Create subscriber's cursor at at_offset unless it exists; return the cursor."""
        return await self._cursors.ensure(subscriber, at_offset)

    async def settle(self, subscriber: str, offsets: Sequence[int]) -> int:
        """Mark offsets done for subscriber; advance and return its cursor (over the
        contiguous prefix of settled or removed offsets). Raises StoreError if no cursor.

        A compare-and-set on the subscriber's key: settles through two brokers at once
        both land."""
        wanted = tuple(offsets)
        while True:
            state = await self._cursors.require(subscriber)
            head = self._view.head
            marks = state.settled | {o for o in wanted if state.cursor < o <= head}
            first = self._view.first_unsettled(state.cursor, marks)
            cursor = max(state.cursor, first - 1 if first is not None else head)
            keep = frozenset(o for o in marks if o > cursor)
            if await self._cursors.change(state, subscriber, cursor, keep):
                return cursor

    async def enforce_retention(self, now_ms: int) -> int:
        """Sweep without notices; return how many messages were removed."""
        return (await self.sweep(now_ms)).removed

    async def sweep(
        self,
        now_ms: int,
        eligible: Eligibility | None = None,
        records: NoticeRecords | None = None,
    ) -> Sweep:
        """Retention by age, label expiry and size, with notices; see Sweeper."""
        return await self._sweeper.sweep(now_ms, eligible, records)

    async def trim_notices(self, keep: int) -> int:
        """Forget each subscriber's oldest notices beyond keep; return how many."""
        return await self._sweeper.trim_notices(keep)

    async def drop_notices(self, subscriber: str, offsets: Sequence[int]) -> int:
        """Forget the subscriber's acknowledged notices; return how many there were."""
        return await self._sweeper.drop_notices(subscriber, offsets)

    # -- reads -------------------------------------------------------------------------------

    async def last_sequence(self, sender: str) -> int:
        """Highest sequence ever stored for sender (kept after retention), 0 if none."""
        return self._view.last_sequence.get(sender, 0)

    async def has_message(self, sender: str, message_id: str) -> bool:
        """Whether (sender, message_id) is currently stored."""
        return (sender, message_id) in self._view.ids

    async def get(self, offset: int) -> StoredMessage | None:
        """The message at offset, None if never stored or removed by retention."""
        if offset > self._view.applied:
            last = await self._feed.last_sequence()
            if offset <= last:
                await self._feed.wait_for(last, timeout=30)
        if offset not in self._view.live:
            return None
        return await self._envelopes.get(offset)

    async def head(self) -> int:
        """Highest offset ever assigned, 0 if none."""
        return self._view.head

    async def wait_for_head(self, offset: int, timeout: float) -> bool:
        """Wait until this store has read the stream up to a message at offset (written
        through any broker), at most timeout seconds; return whether it has."""
        return await self._feed.wait_for_head(lambda: self._view.head, offset, timeout)

    async def cursor(self, subscriber: str) -> int | None:
        """Subscriber's durable cursor, None if it has none."""
        state = await self._cursors.get(subscriber)
        return state.cursor if state is not None else None

    async def pending(
        self, subscriber: str, limit: int, exclude: Collection[int] = ()
    ) -> list[StoredMessage]:
        """pending_and_head without the head."""
        return (await self.pending_and_head(subscriber, limit, exclude))[0]

    async def pending_and_head(
        self, subscriber: str, limit: int, exclude: Collection[int] = ()
    ) -> tuple[list[StoredMessage], int]:
        """Unsettled messages above the cursor (not in exclude), FLASH first then oldest,
        and the head, both as of one position of the view. Raises StoreError if no cursor."""
        state = await self._cursors.require(subscriber)
        chosen = self._view.pending(state.cursor, state.settled, limit, frozenset(exclude))
        head = self._view.head
        got = await self._envelopes.get_many(chosen)
        return [m for m in got if m is not None], head

    async def backlog_count(self, subscriber: str) -> int:
        """Unsettled messages above subscriber's cursor; raises StoreError if no cursor."""
        state = await self._cursors.require(subscriber)
        return self._view.backlog(state.cursor, state.settled)

    async def usage(self) -> dict[str, int]:
        """Stored envelope bytes per sender (senders holding none are left out)."""
        return {s: b for s, b in sorted(self._view.usage.items()) if b > 0}

    async def notices(self, subscriber: str, limit: int, *, after: int = 0) -> list[Notice]:
        """Subscriber's notices not yet acknowledged above offset after, by offset."""
        held = self._view.notices.get(subscriber, {})
        return [held[o][0] for o in sorted(o for o in held if o > after)[:limit]]

    async def notice_subscribers(self) -> set[str]:
        """Subscribers holding notices they have not acknowledged."""
        return {s for s, held in self._view.notices.items() if held}

    async def stats(self) -> StoreStats:
        """Message count, envelope bytes, head offset, stream bytes and batches committed."""
        return StoreStats(
            messages=len(self._view.live),
            bytes=self._view.size,
            head=self._view.head,
            file_bytes=await self._envelopes.stream_bytes(),
            commits=self._committer.commits,
        )

    @property
    def commits(self) -> int:
        """Atomic batches this store committed since open (for tests and metrics)."""
        return self._committer.commits

    def time_commits(self, hook: Any) -> None:
        """Call hook with each commit's duration in seconds (None: stop)."""
        self._committer.on_commit = hook

    async def verify_integrity(self) -> list[int]:
        """Offsets whose envelope, read back from the cluster, no longer hashes to its
        recorded digest."""
        bad = []
        offsets = sorted(self._view.live)
        for i in range(0, len(offsets), 64):
            part = offsets[i : i + 64]
            for o, m in zip(part, await self._envelopes.get_many(part, cached=False), strict=True):
                if m is not None and hashlib.sha256(m.envelope).digest() != m.digest:
                    bad.append(o)
        return bad

    async def close(self) -> None:
        """Commit what is queued and stop reading the stream (the connection stays open)."""
        try:
            await self._committer.close()
        finally:
            await self._feed.stop()
        await asyncio.sleep(0)
