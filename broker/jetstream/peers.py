"""Brokers sharing one cluster: wake-ups across brokers and the partner-stream lease.

Wake-ups. A subscriber's delivery loop sleeps until something wakes it; a publish
through this broker wakes its own streams, but not another broker's. So after each
publish that stored messages, the broker sends one small core NATS message on the
deployment's ``wake`` subject with the highest offset it stored (a burst of publishes
coalesces into one), and every other broker, on receiving it, waits until its store has
read up to that offset (the JetStream store follows the stream on its own, a little
behind the commit; at most ``CATCH_UP_S``) and then wakes its streams: each reads what
is pending for it from the shared store. Core NATS delivers at most once (a wake-up
sent while a broker reconnects is lost), so each broker also looks at its store's head
every ``HEAD_POLL_S`` and wakes its streams when it moved: a lost wake-up delays a
delivery, never loses it.

The lease. Today a partner's new Subscribe stream supersedes its old one (``superseded``);
across brokers that holds too. A key per partner in the deployment's ``LEASES`` bucket
names the broker and the stream that serve it. Opening a stream writes the key (the
newest stream wins, wherever it is); every broker watches the bucket and ends its own
stream of that partner (``superseded``) when the key names another stream. The holder
renews its key every few seconds with compare-and-set on the key's revision: a failed
compare means another stream took it (``superseded`` even if the watch missed it), and a
holder that cannot renew for ``LEASE_TTL_S`` ends its streams ``cluster_unavailable``
rather than serve on a lease it cannot prove. The bucket's keys expire after
``LEASE_TTL_S`` without renewal, so a dead broker's leases disappear by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from broker.errors import BrokerError, Precondition, Unavailable
from broker.exchange.live import Subscription
from broker.jetstream.connect import ClusterSettings, placed

log = logging.getLogger("coalition.broker")

LEASE_TTL_S = 20.0
RENEW_EVERY_S = 4.0
HEAD_POLL_S = 0.5
CATCH_UP_S = 2.0  # longest wait for the store to read a woken-for offset
# NATS errors that mean "the cluster did not answer", as opposed to a refusal.
_UNREACHABLE = (nats.errors.Error, asyncio.TimeoutError, OSError)


@dataclass
class _Held:
    sub: Subscription
    token: str
    revision: int
    renewed: float


class Peers:
    """This broker's link to the other brokers of its deployment (see the module doc)."""

    def __init__(
        self,
        nc: Client,
        settings: ClusterSettings,
        kv: KeyValue,
        broker_id: str,
        wake: Callable[[], None],
        head: Callable[[], Awaitable[int]],
        wait_for_head: Callable[[int, float], Awaitable[bool]],
    ) -> None:
        self._nc = nc
        self._settings = settings
        self._kv = kv
        self.broker_id = broker_id
        self._wake = wake
        self._head = head
        self._wait_for_head = wait_for_head
        self._subject = settings.subject("wake")
        self._kick = asyncio.Event()
        self._stored = 0  # highest offset this broker stored, for the next wake-up
        self._arrived = asyncio.Event()
        self._want = 0  # highest offset another broker woke this one for
        self._held: dict[str, _Held] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_head = -1
        self.wakes_received = 0  # wake-ups from other brokers (tests count them)
        # Every partner's lease as the watch last saw it: holder and when seen.
        self._leases: dict[str, tuple[str, float]] = {}

    @classmethod
    async def open(
        cls,
        nc: Client,
        settings: ClusterSettings,
        name: str,
        wake: Callable[[], None],
        head: Callable[[], Awaitable[int]],
        wait_for_head: Callable[[int, float], Awaitable[bool]],
    ) -> Peers:
        """Create (or open) the lease bucket, subscribe to wake-ups, start the loops.

        wake wakes every local stream; head is the store's head offset; wait_for_head
        waits (bounded) until the store has read up to an offset."""
        js = nc.jetstream()
        config = KeyValueConfig(
            bucket=settings.name("LEASES"),
            history=1,
            ttl=LEASE_TTL_S,
            replicas=settings.replicas,
            storage=StorageType.FILE,
        )
        try:
            kv = await placed(lambda: js.create_key_value(config), f"bucket {config.bucket}")
        except nats.js.errors.BadRequestError as exc:  # exists (another broker made it)?
            try:
                kv = await js.key_value(config.bucket)
            except nats.js.errors.BucketNotFoundError:
                raise exc from None  # not there: the cluster refused to make it (say why)
        broker_id = f"{name}/{uuid.uuid4().hex[:12]}"
        peers = cls(nc, settings, kv, broker_id, wake, head, wait_for_head)
        await nc.subscribe(peers._subject, cb=peers._on_wake)
        watcher = await kv.watchall(include_history=False)
        jobs = (
            peers._send_wakes(),
            peers._take_wakes(),
            peers._poll_head(),
            peers._renew(),
            peers._watch(watcher),
        )
        for job in jobs:
            task = asyncio.create_task(job)
            peers._tasks.add(task)
        return peers

    # -- wake-ups ---------------------------------------------------------------------------
    def stored(self, offset: int) -> None:
        """This broker stored messages up to offset: wake the other brokers' streams."""
        self._stored = max(self._stored, offset)
        self._kick.set()

    async def _send_wakes(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            try:
                wake = {"broker": self.broker_id, "offset": self._stored}
                await self._nc.publish(self._subject, json.dumps(wake).encode())
            except _UNREACHABLE as exc:  # the head poll wakes them instead
                log.debug("wake-up not sent: %s", exc)

    async def _on_wake(self, msg: Msg) -> None:
        try:
            wake = json.loads(msg.data)
            sender, offset = str(wake["broker"]), int(wake["offset"])
        except (ValueError, TypeError, KeyError):
            sender, offset = "", 0  # not a broker's: wake all the same, it costs a read
        if sender == self.broker_id:
            return
        self.wakes_received += 1
        self._want = max(self._want, offset)
        self._arrived.set()

    async def _take_wakes(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            try:
                await self._wait_for_head(self._want, CATCH_UP_S)
            except Exception as exc:  # the store says why; wake them all the same
                log.debug("store not caught up: %s", exc)
            self._wake()

    async def _poll_head(self) -> None:
        while True:
            await asyncio.sleep(HEAD_POLL_S)
            try:
                head = await self._head()
            except Exception as exc:  # the store says why; tried again next second
                log.debug("head not read: %s", exc)
                continue
            if head != self._last_head:
                self._last_head = head
                self._wake()

    # -- the lease --------------------------------------------------------------------------
    async def claim(self, sub: Subscription) -> None:
        """Make this broker's sub the one stream serving its partner (the newest wins).

        Raises Unavailable when the cluster does not answer."""
        token = f"{self.broker_id}/{uuid.uuid4().hex[:8]}"
        value = json.dumps({"broker": self.broker_id, "stream": token}).encode()
        try:
            revision = await self._kv.put(sub.partner, value)
        except _UNREACHABLE as exc:
            raise _unavailable() from exc
        self._held[sub.partner] = _Held(sub, token, revision, time.monotonic())

    def release(self, sub: Subscription) -> None:
        """sub ended: give its partner's lease back if it still holds it."""
        held = self._held.get(sub.partner)
        if held is None or held.sub is not sub:
            return
        del self._held[sub.partner]
        task = asyncio.create_task(self._delete(sub.partner, held.revision))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def serving(self, partner: str | None = None) -> int:
        """Live streams of partner (of every partner when None) on any broker: leases
        written or renewed within LEASE_TTL_S, as the watch saw them."""
        fresh = time.monotonic() - LEASE_TTL_S
        if partner is not None:
            seen = self._leases.get(partner)
            return int(seen is not None and seen[1] > fresh)
        return sum(1 for _, at in self._leases.values() if at > fresh)

    def holder(self, partner: str) -> str | None:
        """The stream token this broker holds partner's lease with, if any."""
        held = self._held.get(partner)
        return held.token if held is not None else None

    async def _delete(self, partner: str, revision: int) -> None:
        # Only if nobody took it meanwhile; an expired or taken lease needs nothing.
        with contextlib.suppress(*_UNREACHABLE):
            await self._kv.delete(partner, last=revision)

    def _lose(self, held: _Held, err: BrokerError) -> None:
        if self._held.get(held.sub.partner) is held:
            del self._held[held.sub.partner]
        if held.sub.closed is None:
            held.sub.closed = err
        held.sub.wake.set()

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            for partner, held in list(self._held.items()):
                value = json.dumps({"broker": self.broker_id, "stream": held.token}).encode()
                try:
                    held.revision = await self._kv.update(partner, value, last=held.revision)
                    held.renewed = time.monotonic()
                except nats.js.errors.KeyWrongLastSequenceError:
                    self._lose(held, _superseded())
                except _UNREACHABLE as exc:
                    if time.monotonic() - held.renewed > LEASE_TTL_S:
                        log.warning(
                            "lease of %s not renewed for %.0f s: %s", partner, LEASE_TTL_S, exc
                        )
                        self._lose(held, _unavailable())

    async def _watch(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:
                continue  # caught up with the bucket's current keys
            value: dict[str, str] = {}
            if entry.operation is None:  # a put: a claim or a renewal
                try:
                    value = json.loads(entry.value or b"{}")
                except ValueError:
                    value = {}
                self._leases[entry.key] = (str(value.get("broker")), time.monotonic())
            else:  # given back or expired
                self._leases.pop(entry.key, None)
            held = self._held.get(entry.key)
            if held is None or entry.revision <= held.revision:
                continue
            if entry.operation is not None:  # deleted or expired after our revision
                continue  # our next renewal's compare says whether we still hold it
            if value.get("stream") != held.token:
                self._lose(held, _superseded())

    async def close(self) -> None:
        """Stop the loops and give back every lease held."""
        for task in list(self._tasks):
            task.cancel()
        for held in list(self._held.values()):
            with contextlib.suppress(*_UNREACHABLE):
                await self._kv.delete(held.sub.partner, last=held.revision)
        self._held.clear()


def _superseded() -> Precondition:
    return Precondition("superseded", "a newer subscription replaced this one")


def _unavailable() -> Unavailable:
    return Unavailable(
        "cluster_unavailable",
        "the broker cannot reach its cluster to serve this stream; reconnect (any broker)",
    )
