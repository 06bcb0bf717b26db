"""Retention sweeps and notice bookkeeping for the JetStream store.

A sweep chooses its victims on the view and reads the cursors and the victims'
envelopes (to ask ``eligible`` who should be told), then commits ONE atomic batch: a
notice entry per (subscriber, offset), the notices' audit records, and a control entry
naming the removed messages (with their sender sequence, so the per-sender sequence
survives the removal). The batch is re-checked when it is planned on the state it is
pinned to: a victim another broker removed meanwhile is skipped with its notices, so
two brokers sweeping at once never record a notice twice. Only after the batch is
committed are the removed entries deleted from the stream; a crash in between leaves
them in the stream but removed from the state, and the next sweep deletes them. The
batch ends with a checkpoint of every sender's last sequence and the head, so a control
entry is itself deleted once what it removed is gone (see view.collected): the stream
keeps what the state needs, not the history of every sweep.

Acknowledged (dropped) and trimmed notices are control entries too, so every broker
forgets them; their notice entries are then deleted the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from broker.jetstream import codec, retention
from broker.jetstream.batches import Entry
from broker.jetstream.committer import Committer, Draft
from broker.jetstream.cursors import Cursors
from broker.jetstream.reading import Envelopes
from broker.jetstream.view import StoreView
from broker.store.base import Eligibility, Notice, NoticeRecords, Sweep


class Sweeper:
    """Retention and notices of one JetStreamMessageStore."""

    def __init__(
        self,
        view: StoreView,
        committer: Committer,
        cursors: Cursors,
        envelopes: Envelopes,
        subjects: codec.Subjects,
        *,
        max_age_ms: int,
        retention_bytes: int,
    ) -> None:
        self._view = view
        self._committer = committer
        self._cursors = cursors
        self._envelopes = envelopes
        self._subjects = subjects
        self._max_age_ms = max_age_ms
        self._retention_bytes = retention_bytes
        self._lock = asyncio.Lock()

    async def sweep(
        self, now_ms: int, eligible: Eligibility | None, records: NoticeRecords | None
    ) -> Sweep:
        """See MessageStore.sweep; one sweep at a time per store."""
        async with self._lock:
            victims = retention.victims(
                self._view,
                now_ms,
                max_age_ms=self._max_age_ms,
                retention_bytes=self._retention_bytes,
            )
            proposed: list[Notice] = []
            if eligible is not None and victims:
                proposed = await self._propose(victims, eligible, now_ms)
            if victims:
                sweep = await self._commit(victims, proposed, records, now_ms)
            else:
                sweep = Sweep(removed=0, by_reason={}, notices=[])
            await self.collect()
            return sweep

    async def _propose(
        self, victims: dict[int, str], eligible: Eligibility, now_ms: int
    ) -> list[Notice]:
        candidates = sorted(o for o, r in victims.items() if r != "label_expired")
        if not candidates:
            return []
        cursors = await self._cursors.all()
        out: list[Notice] = []
        for offset in candidates:
            who = retention.waiting(cursors, offset)
            if not who:
                continue
            m = await self._envelopes.get(offset)
            if m is not None:
                out += retention.notices_for(m, victims[offset], who, eligible, now_ms)
        if out:  # the cursors may have moved while the envelopes were read: ask again
            fresh = {s: await self._cursors.get(s) for s in {n.subscriber for n in out}}
            out = [
                n
                for n in out
                if (st := fresh[n.subscriber]) is not None
                and st.cursor < n.offset
                and n.offset not in st.settled
            ]
        return out

    async def _commit(
        self,
        victims: dict[int, str],
        proposed: list[Notice],
        records: NoticeRecords | None,
        now_ms: int,
    ) -> Sweep:
        subjects = self._subjects

        def plan(draft: Draft, first: int, batch_id: str) -> tuple[list[Entry], Any]:
            view = draft.view
            gone = {o: r for o, r in victims.items() if o in view.live}
            notices = [
                n
                for n in proposed
                if n.offset in gone and n.offset not in view.notices.get(n.subscriber, {})
            ]
            headers = codec.plain_headers(now_ms, batch_id)
            entries = [
                Entry(subjects.notice(n.subscriber), headers, codec.notice_payload(n))
                for n in notices
            ]
            if records is not None and notices:
                texts = records(notices)
                entries += codec.outbox_entries(subjects.outbox, texts, now_ms, batch_id)
            items = [
                [o, view.live[o].sender, view.live[o].sequence, view.live[o].size]
                for o in sorted(gone)
            ]
            if items:
                entries.append(
                    Entry(subjects.control, headers, codec.control_payload("removed", items=items))
                )
                # Every sender's last sequence and the head, so that older control
                # entries can be deleted once what they removed is gone (see view).
                last = dict(view.last_sequence)
                checkpoint = codec.control_payload("senders", last=last, head=view.head)
                entries.append(Entry(subjects.control, headers, checkpoint))
            by_reason: dict[str, int] = {}
            for reason in gone.values():
                by_reason[reason] = by_reason.get(reason, 0) + 1
            sweep = Sweep(removed=len(gone), by_reason=by_reason, notices=notices)
            return entries, lambda: sweep

        result: Sweep = await self._committer.submit(plan, alone=True)
        return result

    async def drop_notices(self, subscriber: str, offsets: Sequence[int]) -> int:
        """Forget the subscriber's acknowledged notices (for every broker); return how many."""
        wanted = sorted(set(offsets))
        if not wanted or subscriber not in self._view.notices:
            return 0
        dropped = await self._drop({subscriber: wanted})
        await self.collect()
        return dropped

    async def trim_notices(self, keep: int) -> int:
        """Forget each subscriber's oldest notices beyond keep; return how many."""
        excess = {
            s: sorted(held)[: len(held) - keep]
            for s, held in self._view.notices.items()
            if len(held) > keep
        }
        if not excess:
            return 0
        trimmed = await self._drop(excess)
        await self.collect()
        return trimmed

    async def _drop(self, wanted: dict[str, list[int]]) -> int:
        subjects = self._subjects

        def plan(draft: Draft, first: int, batch_id: str) -> tuple[list[Entry], Any]:
            entries = []
            count = 0
            for subscriber, offsets in sorted(wanted.items()):
                held = draft.view.notices.get(subscriber, {})
                present = [o for o in offsets if o in held]
                if not present:
                    continue
                count += len(present)
                payload = codec.control_payload("drop", subscriber=subscriber, offsets=present)
                entries.append(Entry(subjects.control, codec.plain_headers(0, batch_id), payload))
            return entries, lambda: count

        result: int = await self._committer.submit(plan)
        return result

    async def collect(self) -> None:
        """Delete from the stream the entries the state no longer holds (housekeeping):
        removed messages, dropped notices, then the control entries that removed them."""
        for _ in range(2):
            if self._view.garbage:
                self._view.collected(await self._envelopes.delete(set(self._view.garbage)))
