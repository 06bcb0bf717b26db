"""RefusalSummary: which refusals a partner can cause at will are recorded one by one.

See AuditLog.admit_refusal: the first ``threshold`` refusals of each source in an
interval are recorded one by one, the rest counted and written as one
``<kind>.summary`` entry per reason once the interval closes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from broker.audit.items import AuditItem


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
