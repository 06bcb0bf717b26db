"""Group commit over JetStream: one task per broker turns queued writes into atomic batches.

Each caller submits a job that plans its entries on the store's view (a ``Draft``: the
view plus what earlier jobs wrote that the view has not read yet). The task takes what
is queued, plans the jobs in order (a job that raises fails alone, leaving no entry; one
that would take the batch past its entry limit waits for the next batch with every job
after it, so no job overtakes an earlier one and a sender's writes keep their order),
sends them as ONE atomic batch pinned to the stream's last sequence (see batches), and
only once the cluster acknowledged it applies the entries to the view and answers the
callers. So a commit is durable (quorum, fsynced) and whole when its callers hear of it.

Pipelined: the task does not wait for a batch's acknowledgement before sending the next
(up to ``depth`` batches in flight). The next batch is planned on the view plus the
batches in flight and pinned to the sequence the last of them will end at. A pin on the
stream sequence alone could be met by another broker's batch of the same length, so
every batch ends with an entry on a subject only this writer writes (its mark), and a
batch sent behind another checks that the mark's last sequence is the one the batch
ahead ends at (``Nats-Expected-Last-Subject-Sequence``): it lands only right after the
batch it was planned on. Batches land in the order sent, or not at all: when one fails,
every batch behind it fails too. The task then waits for every batch in flight, reads
the stream up to its last sequence, answers the jobs of the batches that landed (each
entry names its batch) and plans the others again, in order, on the new state. A job
that depends on state the draft does not carry (a sweep, ``alone``) is planned only
with nothing in flight, and nothing is sent behind it until it lands.

When another broker committed first (the pin fails), the task reads up to the stream's
new last sequence and plans the same jobs again, on the new state: a message another
broker stored meanwhile is now a duplicate, a sequence it used is now taken. When the
cluster does not answer (a leader died mid-request), the task finds out from the stream
whether the batch is there before planning again, so a retry never stores anything
twice (a job remembers every batch it was sent in; one found later answers it).

A commit that the cluster does not confirm within GIVE_UP_S (no quorum, no leader for
that long) fails with StoreError. That is the one answer that does not settle the
outcome: a batch sent before giving up may still be stored once the cluster is back
(then the next writes see it, and a publisher's retry is refused as a duplicate).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from nats.aio.client import Client

from broker.jetstream import batches, codec
from broker.jetstream.batches import Entry
from broker.jetstream.view import StoreView
from broker.store.base import StoreError

GIVE_UP_S = 60.0  # how long one commit keeps trying through elections before it fails
REQUEST_TIMEOUT_S = 5.0
DEPTH = 4  # atomic batches in flight at once
PURGE_EVERY = 256  # batches between purges of this writer's older marks
H_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
_RETRY = (batches.WrongLastSequence, batches.NotStored, batches.OutcomeUnknown)


@dataclass
class Draft:
    """The view plus the uncommitted writes of the jobs planned before in this batch."""

    view: StoreView
    last: dict[str, int] = field(default_factory=dict)
    ids: set[tuple[str, str]] = field(default_factory=set)
    usage: dict[str, int] = field(default_factory=dict)
    bytes: int = 0

    def last_sequence(self, sender: str) -> int:
        return self.last.get(sender, self.view.last_sequence.get(sender, 0))

    def has(self, sender: str, message_id: str) -> bool:
        return (sender, message_id) in self.ids or (sender, message_id) in self.view.ids

    def used(self, sender: str) -> int:
        return self.view.usage.get(sender, 0) + self.usage.get(sender, 0)

    def total(self) -> int:
        return self.view.size + self.bytes

    def child(self) -> Draft:
        return Draft(self.view, dict(self.last), set(self.ids), dict(self.usage), self.bytes)


# plan(draft, first sequence, batch id) -> the job's entries, and what to answer once
# they are committed. It runs on the event loop and must not await.
Plan = Callable[[Draft, int, str], tuple[list[Entry], Callable[[], Any]]]


class Feed(Protocol):
    async def wait_for(self, seq: int, timeout: float) -> None: ...
    async def last_sequence(self) -> int: ...


@dataclass
class _Job:
    plan: Plan
    future: asyncio.Future[Any]
    alone: bool = False  # never share a batch, never pipelined
    started: float = field(default_factory=time.monotonic)
    tried: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)  # batch, answer


@dataclass
class _Flight:
    """One batch sent and not yet settled."""

    batch_id: str
    base: int  # the stream sequence it is pinned to
    entries: list[Entry]
    planned: list[tuple[_Job, Callable[[], Any]]]
    jobs: list[_Job]  # every job it carries, in order (the planned ones)
    delta: Draft  # what it writes, for planning the batches behind it
    task: asyncio.Task[int]
    t0: float
    alone: bool
    marked: bool  # ends with this writer's mark: a batch may be sent behind it

    @property
    def end(self) -> int:
        return self.base + len(self.entries)


class Committer:
    """The store's single writer task; see the module docstring."""

    def __init__(
        self,
        nc: Client,
        view: StoreView,
        feed: Feed,
        *,
        mark: str = "",
        purge: Callable[[str], Coroutine[Any, Any, None]] | None = None,
        depth: int = DEPTH,
    ) -> None:
        self._nc = nc
        self._view = view
        self._feed = feed
        self._mark = mark  # this writer's own subject ("": no marks, depth 1)
        self._purge = purge
        self.depth = depth if mark else 1
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._carry: list[_Job] = []
        self._flights: list[_Flight] = []
        self._wake = asyncio.Event()
        self._pressed = False
        self._closed = False
        self._stopping = False
        self.max_payload = nc.max_payload  # the largest entry the servers accept
        self.commits = 0  # batches committed by this store
        self.lost = 0  # attempts refused because another writer committed first (lost races)
        self.replanned = 0  # batches sent behind one that failed, planned again
        self.peak_in_flight = 0  # the most batches in flight at once
        self.on_commit: Callable[[float], None] | None = None
        self._task = asyncio.create_task(self._run(), name="jetstream-store-writer")

    async def submit(self, plan: Plan, *, alone: bool = False) -> Any:
        """Plan and commit; return what the plan's answer returns. Raises what the plan
        raised, StoreFull, StoreError."""
        if self._closed:
            raise RuntimeError("the message store is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(plan, future, alone))
        self._wake.set()
        return await future

    async def close(self) -> None:
        """Commit what is queued, then stop the task."""
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(None)
        self._wake.set()
        try:
            await asyncio.wait([self._task])
        finally:
            if not self._task.done():  # the caller stopped waiting (a bound): stop retrying
                self._task.cancel()

    async def _run(self) -> None:
        try:
            while not self._stopping or self._carry or self._flights:
                self._wake.clear()
                if self._flights and self._flights[0].task.done():
                    await self._settle()
                    continue
                if await self._send():
                    continue
                if self._stopping and not self._carry and not self._flights:
                    break
                await self._wake.wait()
        except asyncio.CancelledError:  # closed before the cluster confirmed: say so
            self._fail_all()
            raise
        except Exception as exc:  # a bug: no caller may wait forever
            self._fail_all(f"message store failed: {exc}")
            raise

    def _fail_all(self, why: str = "") -> None:
        """Answer every job not yet answered (a batch the cluster may or may not have
        stored is read back at the next open, never written twice)."""
        jobs = [j for f in self._flights for j in f.jobs] + self._carry
        for f in self._flights:
            f.task.cancel()
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is not None:
                jobs.append(job)
        err = StoreError(why or "message store closed before the cluster confirmed the write")
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(err)

    def _next_group(self) -> list[_Job]:
        """Carried jobs first, in order, up to one that must be alone (it goes by
        itself); then what is queued (up to one that must be alone)."""
        cut = next((i for i, j in enumerate(self._carry) if j.alone), len(self._carry))
        group, self._carry = self._carry[: max(cut, 1)], self._carry[max(cut, 1) :]
        while not (group and group[0].alone) and not self._stopping and not self._carry:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if job is None:
                self._stopping = True
            elif job.alone and group:
                self._carry.append(job)
            else:
                group.append(job)
        return group

    def _done_before(self, group: list[_Job]) -> list[_Job]:
        """Answer the jobs an earlier batch of theirs settled (found in the stream), and
        those past GIVE_UP_S; return the others."""
        left = []
        for job in group:
            found = next((a for b, a in job.tried if b in self._view.batches), None)
            if found is not None and not job.future.done():
                self._answer([(job, found)])
            elif time.monotonic() - job.started > GIVE_UP_S and not job.future.done():
                job.future.set_exception(
                    StoreError(
                        "message store failed: the cluster did not confirm the write within "
                        f"{GIVE_UP_S:.0f} s (no quorum, or no stream leader)"
                    )
                )
            elif not job.future.done():
                left.append(job)
        return left

    async def _send(self) -> bool:
        """Plan and send the next batch if there is room and work; return whether it did
        anything."""
        flights = self._flights
        if not self._carry and self._queue.empty():
            return False
        if flights and (len(flights) >= self.depth or flights[-1].alone or not flights[-1].marked):
            self._pressed = True  # writes wait for a batch in flight: mark the next ones
            return False
        group = self._next_group()
        if group and group[0].alone and flights:  # planned only on a settled view
            self._carry.insert(0, group[0])
            return False
        for f in flights:  # a batch the view read in part: wait for the rest of it
            if f.base < self._view.applied < f.end:
                await self._catch_up(f.end)
        group = self._done_before(group)
        if not group:
            return True
        unread = [f for f in flights if f.end > self._view.applied]
        base = unread[-1].end if unread else self._view.applied
        draft = Draft(self._view)
        for f in unread:
            draft.last.update(f.delta.last)
            draft.ids |= f.delta.ids
            for sender, used in f.delta.usage.items():
                draft.usage[sender] = draft.usage.get(sender, 0) + used
            draft.bytes += f.delta.bytes
        start = draft.child()
        batch_id = uuid.uuid4().hex
        entries, planned, draft = self._plan(group, draft, base, batch_id)
        if not entries and not unread:
            self._answer(planned)
            return True
        delta = Draft(self._view, draft.last, draft.ids - start.ids, {}, draft.bytes - start.bytes)
        for sender, used in draft.usage.items():
            delta.usage[sender] = used - start.usage.get(sender, 0)
        # A mark only under load (writes waited, or wait now): idle writes stay one batch
        # at a time and take no extra offset.
        marked = bool(self._mark) and bool(
            self._pressed or flights or self._carry or not self._queue.empty()
        )
        self._pressed = False
        if marked:
            headers = {codec.H_BATCH: batch_id}
            if unread:  # land right after the batch ahead, or not at all
                headers[H_SUBJECT_SEQ] = str(base)
            entries.append(Entry(self._mark, headers, b""))
        jobs = [job for job, _ in planned]
        for job, answer in planned:
            job.tried.append((batch_id, answer))
        task = asyncio.create_task(
            batches.publish(
                self._nc, entries, expected_last=base, batch_id=batch_id, timeout=REQUEST_TIMEOUT_S
            )
        )
        task.add_done_callback(lambda _: self._wake.set())
        alone = bool(jobs) and jobs[0].alone
        flights.append(
            _Flight(
                batch_id,
                base,
                entries,
                planned,
                jobs,
                delta,
                task,
                time.perf_counter(),
                alone,
                marked,
            )
        )
        self.peak_in_flight = max(self.peak_in_flight, len(flights))
        return True

    async def _settle(self) -> None:
        """The first batch in flight has its answer: apply and answer it, or (it failed)
        settle every batch in flight and plan the unsettled jobs again, in order."""
        f = self._flights[0]
        try:
            last = f.task.result()
        except Exception as exc:
            failure: BaseException | None = exc
        else:
            failure = None if last == f.end else batches.OutcomeUnknown("unexpected sequence")
        if failure is None and self._view.applied <= f.base:
            for i, e in enumerate(f.entries):
                self._view.apply(f.base + 1 + i, e.subject, e.headers, e.data)
        elif failure is None and self._view.applied < f.end:  # the feed read part of it
            await self._catch_up(f.end)
        if failure is None and self._view.applied >= f.end:
            self._flights.pop(0)
            self._landed(f)
            return
        # Every batch behind this one was pinned on it: wait for them all, read the stream
        # as far as the cluster went, then keep what landed, in order, and retry the rest.
        await asyncio.wait([g.task for g in self._flights])
        flights, self._flights = self._flights, []
        if isinstance(failure, batches.WrongLastSequence):
            self.lost += 1
            target = failure.last
        elif isinstance(failure, batches.NotStored):
            await asyncio.sleep(0.1)
            target = 0
        else:
            target = f.end
            with contextlib.suppress(Exception):
                target = await self._feed.last_sequence()
        for g in flights:
            with contextlib.suppress(Exception):
                target = max(target, g.task.result())
        if target > self._view.applied:
            await self._catch_up(target)
        retry: list[_Job] = []
        for g in flights:
            if g.batch_id in self._view.batches:
                self._landed(g)
                continue
            if g is f and failure is not None and not isinstance(failure, _RETRY):
                for job in g.jobs:  # refused by the cluster for what it holds: no retry
                    if not job.future.done():
                        job.future.set_exception(failure)
                continue
            if g is not f:
                self.replanned += 1
            retry += [j for j in g.jobs if not j.future.done()]
        self._carry[:0] = retry

    def _landed(self, f: _Flight) -> None:
        self.commits += 1
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - f.t0)
        self._answer(f.planned)
        if self._purge is not None and self.commits % PURGE_EVERY == 0:
            task = asyncio.create_task(self._purge(self._mark))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    def _plan(
        self, group: list[_Job], draft: Draft, base: int, batch_id: str
    ) -> tuple[list[Entry], list[tuple[_Job, Callable[[], Any]]], Draft]:
        entries: list[Entry] = []
        planned: list[tuple[_Job, Callable[[], Any]]] = []
        for k, job in enumerate(group):
            child = draft.child()
            try:
                mine, answer = job.plan(child, base + 1 + len(entries), batch_id)
            except Exception as exc:
                job.future.set_exception(exc)
                continue
            if len(entries) + len(mine) > batches.MAX_ENTRIES - 1:  # one for the mark
                if not entries:
                    job.future.set_exception(
                        StoreError(
                            f"message store failed: one write needs {len(mine)} entries, "
                            f"more than one atomic batch holds ({batches.MAX_ENTRIES - 1})"
                        )
                    )
                else:
                    # First in the next batch, and every job queued after it too: a later
                    # job must not overtake it (one sender's sequences would then be
                    # refused). Ahead of any job carried already: those came later still.
                    self._carry[:0] = group[k:]
                    break
                continue
            draft = child
            entries.extend(mine)
            planned.append((job, answer))
        return entries, planned, draft

    @staticmethod
    def _answer(planned: list[tuple[_Job, Callable[[], Any]]]) -> None:
        for job, answer in planned:
            if job.future.done():
                continue
            try:
                job.future.set_result(answer())
            except Exception as exc:
                job.future.set_exception(exc)

    async def _catch_up(self, last: int) -> None:
        with contextlib.suppress(TimeoutError):  # the next attempt finds out again
            await self._feed.wait_for(last, timeout=REQUEST_TIMEOUT_S * 2)
