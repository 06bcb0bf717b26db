"""Sequence numbers: a sender's header sequence and each recipient's per-recipient numbers."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Allocation:
    """Numbers taken for one envelope: the header's sequence and each recipient's."""

    sequence: int
    per_recipient: Mapping[str, int] = field(default_factory=dict)


class SequenceSource(Protocol):
    """Where a sender's sequence numbers come from (in memory, or durable on a node)."""

    def next(self) -> int: ...

    def allocate(self, recipients: Sequence[str]) -> Allocation: ...

    def release(self, allocation: Allocation) -> None: ...


class Sequencer:
    """Per-sender sequence numbers, strictly increasing, in memory. The node keeps them durable.

    With ``per_recipient=True`` it also numbers each recipient's copies 1, 2, 3 ... for
    the recipient's gap detection; by default those stay 0 (untracked), because an
    in-memory counter restarts with the process.
    """

    def __init__(self, start: int = 0, *, per_recipient: bool = False) -> None:
        # Default start: time-based, so a fresh process never reuses a number.
        self.last = start or time.time_ns() // 1000
        self.per_recipient = per_recipient
        self.recipient_last: dict[str, int] = {}
        # Numbers given back by refused envelopes below the last: taken again first.
        self.recipient_free: dict[str, set[int]] = {}

    def next(self) -> int:
        self.last += 1
        return self.last

    def allocate(self, recipients: Sequence[str]) -> Allocation:
        """The next header sequence and, if tracked, the next number for each recipient."""
        per: dict[str, int] = {}
        if self.per_recipient:
            for r in recipients:
                free = self.recipient_free.get(r)
                if free:
                    per[r] = min(free)
                    free.discard(per[r])
                else:
                    per[r] = self.recipient_last.get(r, 0) + 1
                    self.recipient_last[r] = per[r]
        return Allocation(self.next(), per)

    def release(self, allocation: Allocation) -> None:
        """Give back the recipient numbers of an envelope the broker refused (never stored).

        The last number is simply taken back; one below it (later envelopes were sealed
        meanwhile, pipelined) goes to a free list that the next envelopes to that
        recipient take first, so the recipient's hole fills instead of looking withheld.
        """
        for r, n in allocation.per_recipient.items():
            free = self.recipient_free.setdefault(r, set())
            free.add(n)
            last = self.recipient_last.get(r, 0)
            while last in free:
                free.discard(last)
                last -= 1
            self.recipient_last[r] = last
