"""The JetStream message store's state, rebuilt from its stream: what one broker knows.

Every change to the store is an entry in one stream (see codec), so the state is a pure
function of the stream read in order: ``StoreView.apply`` folds one entry in. A view
that has applied every entry up to sequence S (``applied``) is exactly the store as of
S, whichever broker wrote those entries. Entries deleted before this view read them
(retention, acknowledged notices, drained outbox rows) lose nothing: their removal was
first written as a later control entry, which carries what the state still needs (the
removed message's sender sequence, so the strict per-sender sequence survives).

The view holds no envelopes (the store reads them from the stream when it needs them),
only what decisions and reads need: per message its sender, id, sequence, precedence,
size and times; per sender its last sequence and stored bytes; the outbox rows; the
notices. No I/O here: the store feeds entries in and asks questions.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from broker.jetstream import codec
from broker.store.base import PRECEDENCES, Notice, OutboxRow, StoredMessage

_BATCHES_KEPT = 4096  # recent commits remembered by id (to settle an unknown outcome)


@dataclass(frozen=True)
class Meta:
    """What the view keeps of one stored message."""

    sender: str
    message_id: str
    sequence: int
    precedence: int
    size: int
    stored_ms: int
    expiry_ms: int


def _remove_sorted(values: list[int], value: int) -> None:
    i = bisect.bisect_left(values, value)
    if i < len(values) and values[i] == value:
        del values[i]


@dataclass
class StoreView:
    """The store as of stream sequence ``applied``; see the module docstring."""

    subjects: codec.Subjects
    applied: int = 0
    head: int = 0
    size: int = 0  # stored envelope bytes
    live: dict[int, Meta] = field(default_factory=dict)
    offsets: list[int] = field(default_factory=list)
    by_precedence: dict[int, list[int]] = field(
        default_factory=lambda: {p: [] for p in PRECEDENCES}
    )
    ids: dict[tuple[str, str], int] = field(default_factory=dict)
    last_sequence: dict[str, int] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)
    outbox: dict[int, list[OutboxRow]] = field(default_factory=dict)  # by entry
    outbox_ids: list[int] = field(default_factory=list)  # the entries, in order
    outbox_last: list[int] = field(default_factory=list)  # each entry's last row id
    notices: dict[str, dict[int, tuple[Notice, int]]] = field(default_factory=dict)
    garbage: set[int] = field(default_factory=set)  # entries read, then logically removed
    forgot: int = 0  # the entry of the latest "outbox forgotten through" mark
    # Control entries that removed entries this view read (maybe still in the stream);
    # one is deleted once they are, and once a checkpoint of every sender's last
    # sequence and the head (``checkpoint``, the latest) follows it.
    pending_control: dict[int, set[int]] = field(default_factory=dict)
    checkpoint: int = 0
    batches: OrderedDict[str, int] = field(default_factory=OrderedDict)

    # -- folding entries in ----------------------------------------------------------------

    def apply(
        self, seq: int, subject: str, headers: Mapping[str, str], data: bytes
    ) -> StoredMessage | None:
        """Fold in the entry at seq (ignored if already applied); return it if a message."""
        if seq <= self.applied:
            return None
        self.applied = seq
        batch = headers.get(codec.H_BATCH)
        if batch and batch not in self.batches:
            self.batches[batch] = seq
            if len(self.batches) > _BATCHES_KEPT:
                self.batches.popitem(last=False)
        kind = self.subjects.kind(subject)
        try:
            if kind == "msg":
                m = codec.message_from(seq, headers, data)
                self._add_message(m)
                return m
            if kind == "out":
                at = int(headers[codec.H_STORED])
                packed, records = codec.records_from(headers, data)
                ids = [codec.row_id(seq, i) for i in range(len(records))] if packed else [seq]
                self.outbox[seq] = [OutboxRow(i, at, r) for i, r in zip(ids, records, strict=True)]
                self.outbox_ids.append(seq)
                self.outbox_last.append(ids[-1])
            elif kind == "notice":
                n = codec.notice_from(data)
                mine = self.notices.setdefault(n.subscriber, {})
                if n.offset in mine:
                    self.garbage.add(seq)  # one notice per (subscriber, offset)
                else:
                    mine[n.offset] = (n, seq)
            elif kind == "ctl":
                self._control(seq, codec.control_from(data))
        except (KeyError, ValueError, TypeError):
            pass  # not an entry a store wrote: skipped, as every view skips it
        return None

    def _add_message(self, m: StoredMessage) -> None:
        meta = Meta(
            m.sender,
            m.message_id,
            m.sequence,
            m.precedence,
            len(m.envelope),
            m.stored_ms,
            m.expiry_ms,
        )
        self.live[m.offset] = meta
        self.offsets.append(m.offset)
        self.by_precedence.setdefault(m.precedence, []).append(m.offset)
        self.ids[(m.sender, m.message_id)] = m.offset
        self.last_sequence[m.sender] = max(self.last_sequence.get(m.sender, 0), m.sequence)
        self.usage[m.sender] = self.usage.get(m.sender, 0) + meta.size
        self.size += meta.size
        self.head = max(self.head, m.offset)

    def _control(self, seq: int, op: Mapping[str, object]) -> None:
        if op.get("op") == "removed":
            pending = self.pending_control.setdefault(seq, set())
            for offset, sender, sequence, _size in op["items"]:  # type: ignore[attr-defined]
                if self._remove_message(int(offset), str(sender), int(sequence)):
                    pending.add(int(offset))
        elif op.get("op") == "senders":
            for sender, sequence in op["last"].items():  # type: ignore[attr-defined]
                last = max(self.last_sequence.get(str(sender), 0), int(sequence))
                self.last_sequence[str(sender)] = last
            self.head = max(self.head, int(op["head"]))  # type: ignore[call-overload]
            if self.checkpoint:
                self.garbage.add(self.checkpoint)  # the newer checkpoint covers the older
            self.checkpoint = seq
        elif op.get("op") == "forgot":
            self.forget_outbox(int(op["through"]))  # type: ignore[call-overload]
            if self.forgot:
                self.garbage.add(self.forgot)  # the newer mark covers the older one
            self.forgot = seq
        elif op.get("op") == "drop":
            pending = self.pending_control.setdefault(seq, set())
            mine = self.notices.get(str(op["subscriber"]), {})
            for offset in op["offsets"]:  # type: ignore[attr-defined]
                held = mine.pop(int(offset), None)
                if held is not None:
                    self.garbage.add(held[1])
                    pending.add(held[1])
            if not mine:
                self.notices.pop(str(op["subscriber"]), None)

    def _remove_message(self, offset: int, sender: str, sequence: int) -> bool:
        """Remove the message; return whether this view had read it (so it may still be
        in the stream)."""
        self.head = max(self.head, offset)
        self.last_sequence[sender] = max(self.last_sequence.get(sender, 0), sequence)
        meta = self.live.pop(offset, None)
        if meta is None:
            return False  # removed before this view read it, or removed twice
        self.garbage.add(offset)
        _remove_sorted(self.offsets, offset)
        _remove_sorted(self.by_precedence[meta.precedence], offset)
        self.ids.pop((meta.sender, meta.message_id), None)
        self.size -= meta.size
        left = self.usage.get(meta.sender, 0) - meta.size
        if left > 0:
            self.usage[meta.sender] = left
        else:
            self.usage.pop(meta.sender, None)
        return True

    def collected(self, gone: set[int]) -> None:
        """These entries are deleted from the stream: a control entry whose removals are
        all gone, and that a later senders checkpoint covers, is garbage in turn."""
        self.garbage -= gone
        for seq in list(self.pending_control):
            pending = self.pending_control[seq]
            pending -= gone
            if seq in gone:
                del self.pending_control[seq]
            elif not pending and seq < self.checkpoint:
                self.garbage.add(seq)

    def forget_outbox(self, through: int) -> int:
        """The audit log holds every outbox row up to id through: drop them from the view;
        return the last entry dropped whole (0 if none)."""
        cut = bisect.bisect_right(self.outbox_last, through)
        gone = self.outbox_ids[cut - 1] if cut else 0
        for i in self.outbox_ids[:cut]:
            del self.outbox[i]
        del self.outbox_ids[:cut]
        del self.outbox_last[:cut]
        if self.outbox_ids:  # the next entry may be drained in part
            first = self.outbox_ids[0]
            self.outbox[first] = [r for r in self.outbox[first] if r.id > through]
        return gone

    # -- questions -------------------------------------------------------------------------

    def read_outbox(self, after: int, limit: int) -> list[OutboxRow]:
        """Up to limit rows with id above after, in id order."""
        out: list[OutboxRow] = []
        for i in self.outbox_ids[bisect.bisect_right(self.outbox_last, after) :]:
            out += [r for r in self.outbox[i] if r.id > after]
            if len(out) >= limit:
                break
        return out[:limit]

    def pending(
        self, cursor: int, settled: Collection[int], limit: int, skip: Collection[int]
    ) -> list[int]:
        """Unsettled live offsets above cursor, not in skip: FLASH first, then oldest."""
        chosen: list[int] = []
        for precedence in PRECEDENCES:
            offsets = self.by_precedence.get(precedence, [])
            for o in offsets[bisect.bisect_right(offsets, cursor) :]:
                if len(chosen) >= limit:
                    return chosen
                if o not in settled and o not in skip:
                    chosen.append(o)
        return chosen

    def first_unsettled(self, cursor: int, settled: Collection[int]) -> int | None:
        for o in self.offsets[bisect.bisect_right(self.offsets, cursor) :]:
            if o not in settled:
                return o
        return None

    def backlog(self, cursor: int, settled: Iterable[int]) -> int:
        above = len(self.offsets) - bisect.bisect_right(self.offsets, cursor)
        return above - sum(1 for o in settled if o > cursor and o in self.live)
