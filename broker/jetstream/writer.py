"""One writer per deployment: brokers hand their appends and records to the broker
holding the writer lease, which commits everyone's writes in its own batches.

Why. Every commit on the messages stream is pinned to the stream's last sequence (see
batches). Two brokers committing at the same moment race: the loser's pin fails, it
reads the winner's batch and plans again. With one writer the stream takes the writes
of every broker in one queue, and batches them together, without lost races.

The lease. A key ``writer`` in the deployment's ``LEASES`` bucket (see peers: keys
expire after ``LEASE_TTL_S`` without renewal) names the core NATS subject its holder
serves forwarded writes on. A broker creates the key when there is none (the first
broker to start, or the next one after the holder stopped: it deletes its key, or it
died and the key expired); the holder renews it every ``RENEW_EVERY_S`` with
compare-and-set on its revision, and stops being the holder when a compare fails.

Forwarding. A broker that does not hold the lease sends each append (its messages, the
name of its records function, its other records) and each write of records alone as
one core NATS request to the holder, and waits for the answer (the results and the
stream sequence the holder had reached): it then waits until its own view has read that
far, so it reads its own writes. The holder's committer plans a forwarded write exactly
as its own, on its view, pinned: the rules (sequence, duplicate ids, quotas, the
store's size) are the same. Only the contention changes.

Safety does not rest on the lease. Every commit, the holder's and any other broker's,
stays pinned to the stream's last sequence, so two brokers that both believe they hold
the lease (a handover) only race as before. A forwarded write carries an id (see
appends), so when its answer does not come (no broker serves the subject, the request
times out, the holder says it waited too long) the sender commits the same write
itself, under the same id: whichever commit lands second finds the id in the stream and
stores nothing. A dead holder costs one unanswered request (its subscription is gone,
so the cluster answers "no responders" at once; a frozen one, ``FORWARD_TIMEOUT_S``).

Order. One broker's writes go out in the order they were made, all forwarded or all
local: a write that must take the other way (too large for one request, its holder
gone) waits until every write in flight the first way has its answer, so a later
write of one sender never overtakes an earlier one.

Not forwarded: retention sweeps, notice trims, the outbox's forgotten marks (rare, and
decided on state only the deciding broker holds: its cursors read); they are committed
where they are decided, pinned as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue

from broker.jetstream.connect import ClusterSettings
from broker.jetstream.peers import LEASE_TTL_S, RENEW_EVERY_S, WRITER_KEY, lease_bucket

log = logging.getLogger("coalition.broker")

KEY = WRITER_KEY  # partner codes are upper case, so no partner's lease takes this key
FORWARD_TIMEOUT_S = 10.0  # the longest a broker waits for the holder's answer
START_WITHIN_S = 5.0  # a forwarded write the holder has not started by then, it refuses
_UNANSWERED = (nats.errors.Error, asyncio.TimeoutError, OSError)

Serve = Callable[[bytes, float], Awaitable[bytes]]


class _Lanes:
    """One broker's writes either all forwarded or all local at a time (see Order)."""

    def __init__(self) -> None:
        self.forwarding = False
        self.busy = 0
        self.waiting = 0
        self.idle = asyncio.Event()
        self.idle.set()

    @contextlib.asynccontextmanager
    async def use(self, forwarding: bool) -> AsyncIterator[None]:
        if self.busy and (self.forwarding != forwarding or self.waiting):
            # Switching ways, or behind a write that is: wait until nothing is in flight
            # (a write of the same way must not overtake one waiting before it).
            self.waiting += 1
            try:
                while self.busy:
                    await self.idle.wait()
            finally:
                self.waiting -= 1
        self.forwarding = forwarding
        self.busy += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.busy -= 1
            if not self.busy:
                self.idle.set()


class Writer:
    """This broker's side of the writer lease (see the module docstring)."""

    def __init__(self, nc: Client, settings: ClusterSettings, kv: KeyValue, serve: Serve) -> None:
        self._nc = nc
        self._kv = kv
        self._serve = serve
        self.subject = settings.subject("writer", uuid.uuid4().hex)
        self._value = json.dumps({"subject": self.subject}).encode()
        self._revision = 0  # of the lease key, while this broker holds it
        self._renewed = 0.0
        self._holder = ""  # the subject of the broker holding the lease, if another
        # A holder's subject nobody answered on, and when: not forwarded to again until
        # the key names another, or for LEASE_TTL_S (a holder that was only frozen).
        self._dead = ""
        self._dead_at = 0.0
        self._kick = asyncio.Event()
        self._lanes = _Lanes()
        self._sub: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.forwarded = 0  # writes this broker handed to the holder, answered
        self.fell_back = 0  # forwarded writes this broker committed itself after all
        self.served = 0  # writes of other brokers this broker committed

    @classmethod
    async def open(cls, nc: Client, settings: ClusterSettings, serve: Serve) -> Writer:
        """Serve forwarded writes (serve(request, deadline) -> answer) and take the lease
        if nobody holds it."""
        writer = cls(nc, settings, await lease_bucket(nc, settings), serve)
        writer._sub = await nc.subscribe(writer.subject, cb=writer._on_request)
        await writer._refresh()
        task = asyncio.create_task(writer._hold(), name="jetstream-writer-lease")
        writer._tasks.add(task)
        return writer

    @property
    def holds(self) -> bool:
        """Whether this broker holds the lease (as of its last renewal)."""
        return self._revision != 0

    def target(self) -> str:
        """The subject to forward writes to, or "" to commit them here."""
        return "" if self.holds else self._holder

    def lane(self, forwarding: bool) -> contextlib.AbstractAsyncContextManager[None]:
        return self._lanes.use(forwarding)

    async def forward(self, target: str, request: bytes) -> bytes | None:
        """The holder's answer to request, or None when it gave none (commit it here)."""
        try:
            reply = await self._nc.request(target, request, timeout=FORWARD_TIMEOUT_S)
        except nats.errors.NoRespondersError:
            log.info("the writer lease's holder is gone; writing directly")
            self._lost_holder(target)
            return None
        except _UNANSWERED as exc:
            log.warning("the writer lease's holder did not answer (%s); writing directly", exc)
            self._lost_holder(target)
            return None
        if reply.data.startswith(b'{"expired"'):  # not started in time: commit it here
            self.fell_back += 1
            return None
        self.forwarded += 1
        return reply.data

    def _lost_holder(self, target: str) -> None:
        self.fell_back += 1
        if self._holder == target:
            self._dead, self._dead_at, self._holder = target, time.monotonic(), ""
            self._kick.set()

    async def _on_request(self, msg: Msg) -> None:
        # The request's job goes into the committer's queue before the next request is
        # read (the task's first step does not wait), so requests keep their order.
        task = asyncio.create_task(self._answer(msg, time.monotonic() + START_WITHIN_S))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg, deadline: float) -> None:
        answer = await self._serve(msg.data, deadline)
        self.served += 1
        with contextlib.suppress(*_UNANSWERED):  # the sender commits it itself
            await msg.respond(answer)

    async def _hold(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), RENEW_EVERY_S)
            self._kick.clear()
            await self._refresh()

    async def _refresh(self) -> None:
        try:
            if self._revision:
                self._revision = await self._kv.update(KEY, self._value, last=self._revision)
                self._renewed = time.monotonic()
                return
            try:
                self._revision = await self._kv.create(KEY, self._value)
                self._renewed = time.monotonic()
                self._holder = ""
                log.info("this broker holds the writer lease")
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                pass  # someone holds it
            entry = await self._kv.get(KEY)
            holder = str(json.loads(entry.value or b"{}").get("subject", ""))
            if holder != self._dead or time.monotonic() - self._dead_at > LEASE_TTL_S:
                self._dead = ""
                self._holder = holder
        except nats.js.errors.KeyWrongLastSequenceError:  # another broker took it
            self._revision, self._holder = 0, ""
            self._kick.set()
        except nats.js.errors.KeyNotFoundError:  # given back or expired meanwhile
            self._holder = ""
            self._kick.set()
        except (*_UNANSWERED, ValueError) as exc:
            log.debug("writer lease not refreshed: %s", exc)
            if self._revision and time.monotonic() - self._renewed > LEASE_TTL_S:
                self._revision = 0  # cannot prove it: forward again once a holder shows

    async def close(self) -> None:
        """Stop serving, give the lease back; writes made after this are committed here."""
        for task in list(self._tasks):
            if task.get_name() == "jetstream-writer-lease":
                task.cancel()
        if self._sub is not None:
            with contextlib.suppress(*_UNANSWERED):
                await self._sub.unsubscribe()
        served = [t for t in self._tasks if not t.done()]
        if served:  # answer what was taken: the committer still commits it
            await asyncio.wait(served, timeout=FORWARD_TIMEOUT_S)
        if self._revision:
            with contextlib.suppress(*_UNANSWERED, nats.js.errors.KeyWrongLastSequenceError):
                await self._kv.delete(KEY, last=self._revision)
        self._revision, self._holder = 0, ""
