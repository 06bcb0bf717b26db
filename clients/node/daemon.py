"""The node daemon: connect, register keys, subscribe, store then acknowledge, reconnect.

Exactly-once into the inbox rests on two facts: a delivery is acknowledged only after
its row is committed, and the inbox refuses a second row for (sender, message_id). A
broker restart or a lost acknowledgement therefore costs a redelivery, never a loss
or a duplicate.

A failed connection is one of three kinds (``classify``): transient (the broker is
unreachable, shutting down, rate limiting, out of space: retried with jittered
exponential backoff up to 30 s), waiting for operators (suspended, not yet admitted,
or not known to the broker at all: retried from 1 s doubling to 5 min, registering
nothing meanwhile), or permanent (a certificate the broker does not accept, a key
bundle it refuses, not a partner at all, topics the policy does not permit: the
daemon stops with one sentence and exit status 1, since retrying cannot help).

A TLS handshake that fails verification is explained by the SDK (``BrokerTlsError``, one
sentence and a ``TlsReason``); the daemon logs that sentence with the reason
(``tls_reason``) and stops only for a broker certificate from another CA: a clock can be
corrected, and the broker re-issued for its address, while the node keeps retrying.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import os
import random
from collections.abc import Callable, Sequence

import grpc

from clients.node import parked
from clients.node.config import NodeConfig, load_trust
from clients.node.hook import HookRunner
from clients.node.inbox import GAP_BEHIND_S, GAP_GRACE_S, Expired, Inbox
from clients.node.logs import log
from clients.node.receive import Handled, Outcome, handle
from clients.node.status import State, write_state
from clients.sdk import BrokerTlsError, ClientError, PartnerClient, Subscription, TlsReason
from coalition.clock import wall_clock_ms
from coalition.identity import ms_to_datetime
from coalition.pki import PartnerCredentials
from coalition.v1 import directory_pb2, exchange_pb2

BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 30.0  # the default of [reconnect] max_backoff_s
# Suspended or not yet admitted: only an operator changes that, so ask rarely.
OPERATOR_BACKOFF_BASE_S = 1.0  # doubling up to [reconnect] operator_max_backoff_s
RATE_EVERY_S = 10.0
# How often messages held back for the clock are tried again, and the heartbeat written.
PARKED_RETRY_S = 30.0
HEARTBEAT_S = 10.0
EXIT_REFUSED = 1  # a permanent refusal: retrying cannot help
# For tests only: shift the node's clock by this many milliseconds (a slow or fast
# host clock), as the node sees certificates, key bundles and message times.
CLOCK_OFFSET_ENV = "COALITION_NODE_CLOCK_OFFSET_MS"


class Backoff:
    """Jittered exponential backoff: base, 2 base, 4 base ... capped, each times 0.5-1.0."""

    def __init__(
        self,
        base: float = BACKOFF_BASE_S,
        cap: float = BACKOFF_CAP_S,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.base, self.cap, self.rng = base, cap, rng
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * float(2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        # Jitter keeps many nodes from reconnecting in lockstep after a broker restart.
        return delay * (0.5 + self.rng() / 2)

    def reset(self) -> None:
        self.attempt = 0


class Kind(enum.Enum):
    """What a failed connection attempt calls for."""

    TRANSIENT = "transient"  # retry soon, with backoff
    OPERATOR = "operator"  # only an operator can lift it: retry rarely
    PERMANENT = "permanent"  # retrying cannot help: stop


_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,  # unreachable, shutting down, audit unavailable
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # rate limited, store full, too many connections
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


def classify(exc: ClientError) -> Kind:
    """Transient, waiting for operators, or permanent (see the module docstring)."""
    if isinstance(exc, BrokerTlsError):
        # A clock may be corrected and a broker re-issued for its address while the node
        # runs; a broker from another CA needs this node's ca.crt and identity replaced.
        return Kind.PERMANENT if exc.reason is TlsReason.OTHER_CA else Kind.TRANSIENT
    if exc.status in _TRANSIENT:
        return Kind.TRANSIENT
    text = exc.message.lower()
    if exc.status == grpc.StatusCode.PERMISSION_DENIED and (
        "suspended" in text or "not admitted" in text or "not yet admitted" in text
    ):
        return Kind.OPERATOR
    if exc.status == grpc.StatusCode.UNAUTHENTICATED and _UNKNOWN_PARTNER in text:
        # Not proposed by any operator yet: a node is often started before its admission.
        return Kind.OPERATOR
    # Revoked, expired or foreign certificates, unknown partners, refused key bundles,
    # identities that are not partners, topics the policy does not permit.
    return Kind.PERMANENT


_UNKNOWN_PARTNER = "not registered with this broker"


def describe(exc: ClientError, target: str, me: str) -> str:
    """One status sentence for a failed connection attempt."""
    if isinstance(exc, BrokerTlsError):
        return f"TLS handshake with broker {target} failed: {exc}"
    if exc.status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return f"broker {target} unreachable ({exc.message})"
    if exc.status == grpc.StatusCode.UNAUTHENTICATED and _UNKNOWN_PARTNER in exc.message:
        return f"broker {target} does not accept {me} yet (not admitted?): {exc.message}"
    if exc.status == grpc.StatusCode.UNAUTHENTICATED:
        return f"broker {target} does not accept {me}: {exc.message}"
    if exc.status == grpc.StatusCode.PERMISSION_DENIED:
        return f"broker {target} refused {me}: {exc.message}"
    return f"broker {target}: {exc.status.name}: {exc.message}"


def _iso(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _tls_reason(exc: ClientError) -> dict[str, str]:
    """The log field naming why a TLS handshake failed (the SDK's reason), if it did."""
    return {"tls_reason": exc.reason.value} if isinstance(exc, BrokerTlsError) else {}


def node_clock() -> Callable[[], int]:
    """The node's clock: the wall clock, shifted only when a test sets CLOCK_OFFSET_ENV."""
    offset = int(os.environ.get(CLOCK_OFFSET_ENV, "0") or 0)
    if not offset:
        return wall_clock_ms
    return lambda: wall_clock_ms() + offset


class Stop(Exception):
    """A permanent refusal: the daemon ends with this sentence and EXIT_REFUSED."""


class NodeDaemon:
    """Receives for one partner until ``stop`` is set."""

    def __init__(self, cfg: NodeConfig, creds: PartnerCredentials) -> None:
        self.cfg = cfg
        self.me = creds.code
        self.creds = creds
        self.clock = node_clock()
        self.client = PartnerClient(creds, cfg.broker, clock=self.clock, trust=load_trust(cfg))
        self.inbox = Inbox(cfg.inbox)
        self.hooks = HookRunner(cfg.hook, self.inbox) if cfg.hook is not None else None
        self.stop = asyncio.Event()
        self.backoff = Backoff(BACKOFF_BASE_S, cfg.max_backoff_s)
        self.operator_backoff = Backoff(OPERATOR_BACKOFF_BASE_S, cfg.operator_max_backoff_s)
        self.key_id = directory_pb2.KeyBundle.FromString(creds.bundle.bundle).key_id
        self.stored = 0
        self.registrations = 0
        self._handling = asyncio.Lock()
        self._behind = True  # until the stream says caught_up; holes are judged after
        self._fell_behind = False

    def _state(self, state: State, detail: str = "", retry_s: float | None = None) -> None:
        write_state(self.inbox, state, detail, retry_s, wall_clock_ms())

    async def run(self) -> int:
        """Serve until stop is set or the broker refuses for good; returns the exit status."""
        background = [
            asyncio.create_task(self._report_rate()),
            asyncio.create_task(self._heartbeat()),
        ]
        status = 0
        try:
            if self.hooks is not None:
                await self.hooks.resume()
            log.info(
                "connecting to %s as %s",
                self.cfg.broker,
                self.me,
                extra={"event": "connecting", "broker": self.cfg.broker, "partner": self.me},
            )
            self._state(State.CONNECTING)
            while not self.stop.is_set():
                try:
                    await self._session()
                except ClientError as exc:
                    if self.stop.is_set():
                        break
                    kind, sentence = classify(exc), describe(exc, self.cfg.broker, self.me)
                    if kind is Kind.PERMANENT:
                        log.error(
                            "%s; stopping: retrying cannot help until this is fixed",
                            sentence,
                            extra={
                                "event": "refused",
                                "broker": self.cfg.broker,
                                "partner": self.me,
                                "status": exc.status.name,
                                "kind": kind.value,
                                **_tls_reason(exc),
                            },
                        )
                        self._state(State.REFUSED, sentence)
                        status = EXIT_REFUSED
                        break
                    await self._wait_retry(kind, sentence, exc)
        finally:
            for t in background:
                t.cancel()
            await self.client.close()
            if status == 0:
                self._state(State.STOPPED)
            n, q = self.inbox.counts()
            self.inbox.close()
            log.info(
                "stopped; inbox holds %d messages, %d quarantined",
                n,
                q,
                extra={"event": "stopped", "messages": n, "quarantined": q},
            )
        return status

    async def _wait_retry(self, kind: Kind, sentence: str, exc: ClientError) -> None:
        if kind is Kind.OPERATOR:
            self.backoff.reset()
            delay = self.operator_backoff.next()
            suspended = "suspended" in exc.message.lower()
            state = State.SUSPENDED if suspended else State.NOT_ADMITTED
        else:
            self.operator_backoff.reset()
            delay = self.backoff.next()
            state = State.DISCONNECTED
        self._state(state, sentence, delay)
        log.warning(
            "%s, retrying in %s",
            sentence,
            _duration(delay),
            extra={
                "event": "retry",
                "broker": self.cfg.broker,
                "partner": self.me,
                "status": exc.status.name,
                "kind": kind.value,
                "retry_s": round(delay, 3),
                **_tls_reason(exc),
            },
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), delay)

    async def _register_if_changed(self) -> str:
        """Register our key bundle only when the broker does not hold our key already
        (each registration is an audit entry: a reconnecting node adds none).

        The Directory call comes first: it is refused to a suspended or pending partner,
        which therefore registers nothing while it waits."""
        directory = await self.client.directory(refresh=True)
        peer = directory.peers.get(self.me)
        if peer is not None and peer.hpke_public is not None and peer.key_id == self.key_id:
            return peer.key_id
        key_id = await self.client.register_keys()
        self.registrations += 1
        await self.client.directory(refresh=True)
        return key_id

    async def _session(self) -> None:
        key_id = await self._register_if_changed()
        sub = self.client.subscribe(
            self.cfg.topics, window=self.cfg.window, on_expired=self._expired
        )
        sub.on_status = self._status
        self._behind, self._fell_behind = True, False
        consumer = asyncio.create_task(self._consume(sub))
        watcher = asyncio.create_task(self._watch_caught_up(sub))
        judge = asyncio.create_task(self._judge_gaps())
        stopper = asyncio.create_task(self.stop.wait())
        retry = asyncio.create_task(self._retry_parked_loop())
        self.inbox.note("last_connected_ms", str(wall_clock_ms()))
        self.inbox.note("broker", self.cfg.broker)
        self._state(State.CONNECTED)
        self.backoff.reset()
        self.operator_backoff.reset()
        log.info(
            "connected to %s as %s (key %s); subscribed to %s",
            self.cfg.broker,
            self.me,
            key_id,
            ", ".join(self.cfg.topics),
            extra={
                "event": "connected",
                "broker": self.cfg.broker,
                "partner": self.me,
                "key_id": key_id,
                "topics": ",".join(self.cfg.topics),
            },
        )
        try:
            await asyncio.wait({consumer, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if consumer.done():
                consumer.result()  # raises the stream's ClientError
                raise ClientError(grpc.StatusCode.UNAVAILABLE, "the broker ended the stream")
            log.info("stopping: finishing the current message", extra={"event": "stopping"})
            async with self._handling:
                consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError, ClientError):
                await consumer
            await sub.aclose()
        finally:
            for t in (consumer, watcher, stopper, judge, retry):
                t.cancel()
            sub.close()

    async def _clock_problem(self, sender: str) -> str | None:
        """A sentence when sender's key fails only for time by the node's clock."""
        directory = await self.client.directory()
        problem = directory.problems.get(sender, "")
        if not any(p in problem for p in _TIME_PROBLEMS):
            return None
        return (
            f"{sender}'s signing certificate or key bundle is not valid by this node's clock "
            f"({problem}; node time {_iso(ms_to_datetime(self.clock()))}): the node's clock "
            "may be wrong; the message is held and tried again"
        )

    async def _handle(self, d: exchange_pb2.Delivery) -> Handled:
        return await handle(
            d,
            me=self.me,
            opener=self.client.open,
            inbox=self.inbox,
            now_ms=self.clock(),
            hook=self.hooks is not None,
            clock_problem=self._clock_problem,
        )

    async def _consume(self, sub: Subscription) -> None:
        async for d in sub:
            async with self._handling:
                h = await self._handle(d)
                # Only now, with the row committed (stored, quarantined, or held back for
                # the clock), may the broker forget it.
                await sub.ack([d.offset])
                self._report(h, d.offset, sub.caught_up.is_set())
                if h.entry is not None and self.hooks is not None:
                    await self.hooks.run(h.entry)

    async def _retry_parked_loop(self) -> None:
        while True:
            await self._retry_parked()
            await asyncio.sleep(PARKED_RETRY_S)

    async def _retry_parked(self) -> None:
        """Messages held back because of the clock: try them again."""
        held = parked.held(self.inbox.conn)
        if not held:
            return
        await self.client.directory(refresh=True)
        for row_id, d in held:
            async with self._handling:
                h = await self._handle(d)
                if h.outcome is Outcome.PARKED:
                    continue
                parked.release(self.inbox.conn, row_id)
                self._report(h, d.offset, True)
                if h.entry is not None and self.hooks is not None:
                    await self.hooks.run(h.entry)

    async def _expired(self, notices: Sequence[exchange_pb2.Expired]) -> None:
        """Record the broker's expiry notices (before they are acknowledged) and warn."""
        now = wall_clock_ms()
        async with self._handling:
            new = self.inbox.record_expired(
                [
                    Expired(
                        sender=n.sender[:64],
                        message_id=n.message_id[:64],
                        sequence=n.sequence,
                        recipient_sequence=n.recipient_sequence,
                        topic=n.topic[:256],
                        reason=n.reason[:64],
                        offset=n.offset,
                        stored_ms=n.stored_ms,
                        removed_ms=n.removed_ms,
                        noticed_ms=now,
                    )
                    for n in notices
                ]
            )
        for e in new:
            log.warning(e.describe())

    def _report(self, h: Handled, offset: int, live: bool) -> None:
        if h.outcome is Outcome.QUARANTINED:
            log.warning(
                "quarantined the delivery at offset %d: %s",
                offset,
                h.detail,
                extra={"event": "quarantined", "offset": offset, "reason": h.reason},
            )
        elif h.outcome is Outcome.PARKED:
            log.warning(
                "held back the delivery at offset %d: %s",
                offset,
                h.detail,
                extra={"event": "held_for_clock", "offset": offset, "reason": h.reason},
            )
        elif h.outcome is Outcome.DUPLICATE:
            log.debug("delivery at offset %d is already in the inbox", offset)
        elif h.entry is not None:
            self.stored += 1
            e = h.entry
            log.debug(
                "stored %s from %s (%s, %s)",
                e.message_id,
                e.sender,
                e.precedence,
                e.topic,
                extra={"event": "stored", "offset": offset, "sender": e.sender},
            )
            if h.gap == "filled":
                log.info("sequence %d from %s arrived late", e.recipient_sequence, e.sender)

    def _warn_gaps(self, opened_by_ms: int | None = None) -> None:
        for g in self.inbox.take_unreported_gaps(opened_by_ms=opened_by_ms):
            log.warning(g.describe())

    async def _status(self, caught_up: bool) -> None:
        """In stream order: caught up (again), every hole still open was not a matter of
        delivery order (a backlog comes FLASH first), so it is warned about now."""
        if not caught_up:
            log.info("fell behind: the broker is delivering a backlog again (FLASH first)")
            self._fell_behind = True
        elif self._fell_behind:
            log.info("caught up again: that backlog is delivered")
            self._fell_behind = False
        self._behind = not caught_up
        if caught_up:
            self._warn_gaps()

    async def _judge_gaps(self) -> None:
        """Warn about holes open longer than the grace period (while caught up) or than
        GAP_BEHIND_S (while a backlog is delivered)."""
        while True:
            await asyncio.sleep(1.0)
            wait_s = GAP_BEHIND_S if self._behind else GAP_GRACE_S
            self._warn_gaps(wall_clock_ms() - int(wait_s * 1000))

    async def _watch_caught_up(self, sub: Subscription) -> None:
        await sub.caught_up.wait()
        n, q = self.inbox.counts()
        log.info(
            "caught up: backlog delivered; inbox holds %d messages, %d quarantined",
            n,
            q,
            extra={"event": "caught_up", "messages": n, "quarantined": q},
        )

    async def _heartbeat(self) -> None:
        """Lets `coalition-node status` tell a running daemon from one that died."""
        while True:
            self.inbox.note("heartbeat_ms", str(wall_clock_ms()))
            await asyncio.sleep(HEARTBEAT_S)

    async def _report_rate(self) -> None:
        last = 0
        while True:
            await asyncio.sleep(RATE_EVERY_S)
            if self.stored != last:
                n = self.stored - last
                last = self.stored
                log.info(
                    "stored %d new messages in the last %g s (%.1f messages/s)",
                    n,
                    RATE_EVERY_S,
                    n / RATE_EVERY_S,
                    extra={"event": "rate", "stored": n, "every_s": RATE_EVERY_S},
                )


# What verify_signing_cert / verify_key_bundle say when only the time is wrong.
_TIME_PROBLEMS = ("is not valid before", "expired at", "is not valid yet", "has expired")


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min"
