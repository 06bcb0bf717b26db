"""Group commit over JetStream: one task per broker turns queued writes into atomic batches.

Each caller submits a job that plans its entries on the store's view (a ``Draft``: the
view plus what earlier jobs of the same batch wrote). The task takes what is queued,
plans the jobs in order (a job that raises fails alone, leaving no entry; one that would
take the batch past its entry limit waits for the next batch with every job after it, so
no job overtakes an earlier one and a sender's writes keep their order), sends them
as ONE atomic batch pinned to the view's last sequence (see batches), and only once the
cluster acknowledged it applies the entries to the view and answers the callers. So a
commit is durable (quorum, fsynced) and whole when its callers hear of it.

When another broker committed first (the pin fails), the task waits until its view has
read up to the stream's new last sequence and plans the same jobs again, on the new
state: a message another broker stored meanwhile is now a duplicate, a sequence it
used is now taken. When the cluster does not answer (a leader died mid-request), the
task finds out from the stream whether the batch is there (each entry names its batch)
before planning again, so a retry never stores anything twice.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from nats.aio.client import Client

from broker.jetstream import batches
from broker.jetstream.batches import Entry
from broker.jetstream.view import StoreView
from broker.store.base import StoreError

GIVE_UP_S = 60.0  # how long one commit keeps trying through elections before it fails
REQUEST_TIMEOUT_S = 5.0


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
    alone: bool = False  # never share a batch


class Committer:
    """The store's single writer task; see the module docstring."""

    def __init__(self, nc: Client, view: StoreView, feed: Feed) -> None:
        self._nc = nc
        self._view = view
        self._feed = feed
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._carry: list[_Job] = []
        self._task = asyncio.create_task(self._run(), name="jetstream-store-writer")
        self._closed = False
        self._stopping = False
        self.max_payload = nc.max_payload  # the largest entry the servers accept
        self.commits = 0  # batches committed by this store
        self.lost = 0  # attempts refused because another writer committed first (lost races)
        self.on_commit: Callable[[float], None] | None = None

    async def submit(self, plan: Plan, *, alone: bool = False) -> Any:
        """Plan and commit; return what the plan's answer returns. Raises what the plan
        raised, StoreFull, StoreError."""
        if self._closed:
            raise RuntimeError("the message store is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(plan, future, alone))
        return await future

    async def close(self) -> None:
        """Commit what is queued, then stop the task."""
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(None)
        try:
            await asyncio.wait([self._task])
        finally:
            if not self._task.done():  # the caller stopped waiting (a bound): stop retrying
                self._task.cancel()

    async def _run(self) -> None:
        while not self._stopping or self._carry:
            # Carried jobs first, in order, up to one that must be alone (it goes by itself).
            cut = next((i for i, j in enumerate(self._carry) if j.alone), len(self._carry))
            group, self._carry = self._carry[: max(cut, 1)], self._carry[max(cut, 1) :]
            if not group:
                job = await self._queue.get()
                if job is None:
                    break
                group = [job]
            self._gather(group)
            try:
                await self._commit(group)
            except Exception as exc:  # the task must outlive any one commit
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(StoreError(f"message store failed: {exc}"))
            except asyncio.CancelledError:  # closed before the cluster confirmed: say so
                self._fail_all(group)
                raise

    def _fail_all(self, group: list[_Job]) -> None:
        """Answer every job not yet answered (a batch the cluster may or may not have
        stored is read back at the next open, never written twice)."""
        jobs = [*group, *self._carry]
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is not None:
                jobs.append(job)
        err = StoreError("message store closed before the cluster confirmed the write")
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(err)

    def _gather(self, group: list[_Job]) -> None:
        """Add the jobs queued meanwhile to group (up to one that must be alone)."""
        while group and not group[0].alone and not self._stopping and not self._carry:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if job is None:
                self._stopping = True
            elif job.alone:
                self._carry.append(job)
            else:
                group.append(job)

    async def _commit(self, group: list[_Job]) -> None:
        attempts: list[tuple[str, list[tuple[_Job, Callable[[], Any]]]]] = []
        started = time.monotonic()
        while True:
            stored = [p for b, p in attempts if b in self._view.batches]
            if stored:  # an earlier attempt was stored after all: its jobs are done
                self.commits += 1
                self._answer(stored[0])
                attempts.clear()  # jobs gathered since are planned again, on top of it
            group = [j for j in group if not j.future.done() and j not in self._carry]
            if not group:
                return
            if attempts or stored:
                self._gather(group)  # while this batch waited, more queued: take them too
            if time.monotonic() - started > GIVE_UP_S:
                err = StoreError(
                    "message store failed: the cluster did not confirm the write within "
                    f"{GIVE_UP_S:.0f} s (no quorum, or no stream leader)"
                )
                for job in group:
                    job.future.set_exception(err)
                return
            base = self._view.applied
            batch_id = uuid.uuid4().hex
            entries, planned = self._plan(group, base, batch_id)
            if not entries:
                self._answer(planned)
                return
            attempts.append((batch_id, planned))
            t0 = time.perf_counter()
            try:
                last = await batches.publish(
                    self._nc,
                    entries,
                    expected_last=base,
                    batch_id=batch_id,
                    timeout=REQUEST_TIMEOUT_S,
                )
            except batches.WrongLastSequence as moved:
                self.lost += 1
                await self._catch_up(moved.last)
                continue
            except batches.NotStored:
                attempts.pop()
                await asyncio.sleep(0.1)
                continue
            except batches.OutcomeUnknown:
                with contextlib.suppress(Exception):
                    await self._catch_up(await self._feed.last_sequence())
                continue
            except Exception as exc:
                for job, _ in planned:
                    job.future.set_exception(exc)
                return
            if last != base + len(entries):
                # Never trust one answer during an election: read the stream.
                await self._catch_up(last)
                continue
            for i, e in enumerate(entries):
                self._view.apply(base + 1 + i, e.subject, e.headers, e.data)
            self.commits += 1
            if self.on_commit is not None:
                self.on_commit(time.perf_counter() - t0)
            self._answer(planned)
            return

    def _plan(
        self, group: list[_Job], base: int, batch_id: str
    ) -> tuple[list[Entry], list[tuple[_Job, Callable[[], Any]]]]:
        draft = Draft(self._view)
        entries: list[Entry] = []
        planned: list[tuple[_Job, Callable[[], Any]]] = []
        for k, job in enumerate(group):
            child = draft.child()
            try:
                mine, answer = job.plan(child, base + 1 + len(entries), batch_id)
            except Exception as exc:
                job.future.set_exception(exc)
                continue
            if len(entries) + len(mine) > batches.MAX_ENTRIES:
                if not entries:
                    job.future.set_exception(
                        StoreError(
                            f"message store failed: one write needs {len(mine)} entries, "
                            f"more than one atomic batch holds ({batches.MAX_ENTRIES})"
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
        return entries, planned

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
