"""Planning an append, and a write of records alone, on the store's state (a Draft).

The rules are SqliteMessageStore.append's (duplicate ids, strict per-sender sequence,
the per-sender quota, max_bytes), decided on the state as of the batch's pinned
sequence, so across brokers (see store and committer).

A write may name itself with a job id: a write one broker hands to the deployment's
writer (see writer) is named, so that the sender can commit it itself when the writer
does not answer. Its first entry then carries ``Coalition-Job: <id> <results>``, and a
write planned on a state that already holds that id stores nothing and is answered
from the stream (its results, its messages' offsets). Every commit is pinned to the
stream's last sequence, so whichever of the two commits lands second was planned on a
state that shows the first: a named write is stored at most once, whoever commits it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from broker.jetstream import codec
from broker.jetstream.batches import Entry
from broker.jetstream.committer import Draft, Plan
from broker.store.base import (
    AcceptanceRecords,
    Appended,
    NewMessage,
    Rejected,
    RejectReason,
    StoredMessage,
    StoreError,
    StoreFull,
    stored_message,
)
from broker.store.schema import mib

_CODES: dict[str, RejectReason] = {"d": "duplicate_id", "s": "sequence_not_increasing"}


def results_text(results: Sequence[Appended | Rejected]) -> str:
    """An append's results as the job header holds them: a (stored), d (duplicate id),
    s (sequence not increasing), q<used>/<limit> (quota), comma-separated."""
    out = []
    for r in results:
        if isinstance(r, Appended):
            out.append("a")
        elif r.reason == "quota_exceeded":
            out.append(f"q{r.used}/{r.limit}")
        else:
            out.append("d" if r.reason == "duplicate_id" else "s")
    return ",".join(out)


def results_from(first: int, text: str) -> list[Appended | Rejected]:
    """The results results_text wrote, for a write whose first entry is at first (its
    stored messages are its first entries, in order)."""
    out: list[Appended | Rejected] = []
    stored = 0
    for code in text.split(",") if text else ():
        if code == "a":
            out.append(Appended(first + stored))
            stored += 1
        elif code.startswith("q"):
            used, limit = code[1:].split("/")
            out.append(Rejected("quota_exceeded", int(used), int(limit)))
        else:
            out.append(Rejected(_CODES[code]))
    return out


def _named(entries: list[Entry], job: str, results: str) -> None:
    """Put the job header on the write's first entry."""
    if job and entries:
        first = entries[0]
        entries[0] = Entry(
            first.subject, {**first.headers, codec.H_JOB: f"{job} {results}"}, first.data
        )


class Expired(StoreError):
    """A forwarded write was not started before its deadline (its sender commits it)."""


def _check_deadline(deadline: float) -> None:
    if deadline and time.monotonic() > deadline:
        raise Expired("message store failed: a forwarded write waited too long")


class Planner:
    """Builds the plans of one store's appends and records (see the module docstring)."""

    def __init__(
        self,
        subjects: codec.Subjects,
        *,
        max_payload: int,
        max_bytes: int,
        sender_bytes: int,
        remember: Callable[[StoredMessage], None],
    ) -> None:
        self._subjects = subjects
        self._max_payload = max_payload
        self._limit = max_bytes
        self._quota = sender_bytes
        self._remember = remember

    def outbox(self, texts: Sequence[str], now_ms: int, batch_id: str) -> list[Entry]:
        return codec.outbox_entries(self._subjects.outbox, texts, now_ms, batch_id)

    def append(
        self,
        batch: Sequence[NewMessage],
        now_ms: int,
        records: AcceptanceRecords | None,
        extra: Sequence[str],
        *,
        job: str = "",
        deadline: float = 0.0,
    ) -> Plan:
        quota, limit, subjects = self._quota, self._limit, self._subjects
        # What does not depend on the batch: computed once, not at every attempt.
        metas = [codec.message_meta(m, now_ms) for m in batch]
        routes = [subjects.message(m) for m in batch]

        def plan(draft: Draft, first: int, batch_id: str) -> tuple[list[Entry], Any]:
            if job:
                _check_deadline(deadline)
                done = draft.done(job)
                if done is not None:  # stored already (by another broker): say what it did
                    found = results_from(*done)
                    return [], lambda: found
                draft.jobs.add(job)
            results: list[Appended | Rejected] = []
            entries: list[Entry] = []
            fresh: list[StoredMessage] = []
            before = draft.total()
            for m, meta, subject in zip(batch, metas, routes, strict=True):
                if draft.has(m.sender, m.message_id):
                    results.append(Rejected("duplicate_id"))
                    continue
                if m.sequence <= draft.last_sequence(m.sender):
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
                draft.last[m.sender] = m.sequence
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
            entries += self.outbox(texts, now_ms, batch_id)
            _named(entries, job, results_text(results))

            def answer() -> list[Appended | Rejected]:
                for s in fresh:
                    self._remember(s)
                return results

            return entries, answer

        return plan

    def record(
        self, texts: Sequence[str], now_ms: int, *, job: str = "", deadline: float = 0.0
    ) -> Plan:
        def plan(draft: Draft, first: int, batch_id: str) -> tuple[list[Entry], Any]:
            if job:
                _check_deadline(deadline)
                if draft.done(job) is not None:
                    return [], lambda: None
                draft.jobs.add(job)
            entries = self.outbox(texts, now_ms, batch_id)
            _named(entries, job, "")
            return entries, lambda: None

        return plan
