"""The client SDK: the one path to the broker for the node daemon, the CLIs, tests and benchmarks.

``PartnerClient`` connects over mutual TLS, verifies the directory against the
coalition CA (it does not trust the broker for keys), chooses recipients, seals and
publishes with per-envelope results, and subscribes with acknowledgement.
``OperatorClient`` wraps the Admin service. gRPC errors are mapped at this edge to
``ClientError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc
from cryptography import x509

from coalition import envelope as env
from coalition.clock import wall_clock_ms
from coalition.directory import Directory, Peer
from coalition.labels import Label, Precedence, label_to_proto
from coalition.pki import OperatorCredentials, PartnerCredentials
from coalition.policy import releases_to_anyone
from coalition.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    audit_pb2,
    envelope_pb2,
    exchange_pb2,
    exchange_pb2_grpc,
    policy_pb2,
)

if TYPE_CHECKING:
    from coalition.v1.admin_pb2_grpc import AdminAsyncStub
    from coalition.v1.exchange_pb2_grpc import ExchangeAsyncStub

T = TypeVar("T")


class ClientError(Exception):
    """A call to the broker failed; ``status`` is the gRPC status, ``message`` says why."""

    def __init__(self, status: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status
        self.message = message


class NoRecipients(ClientError):
    """No partner is eligible for this label and topic right now; ``not_sealed_for`` says,
    for each partner named in REL TO, why it got no key (see PartnerClient.seal)."""

    def __init__(self, message: str, not_sealed_for: Mapping[str, str] | None = None) -> None:
        super().__init__(grpc.StatusCode.FAILED_PRECONDITION, message)
        self.not_sealed_for = dict(not_sealed_for or {})


class BrokerTlsError(ClientError):
    """The TLS handshake with the broker failed verification: retrying will not help.

    ``str()`` is the one sentence for a person (no status name, no gRPC detail)."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.message


# gRPC Core's words for a failed handshake (OpenSSL/BoringSSL reasons), and the sentence.
_TLS_FAILURES = (
    (
        ("unable to get local issuer certificate", "self signed certificate", "self-signed"),
        "the broker's certificate is not signed by this coalition's CA (pki/ca.crt); this "
        "identity and the broker come from different PKIs: use the ca.crt the broker's "
        "certificate was issued by, or re-issue the broker from this CA",
    ),
    (
        ("certificate is not yet valid",),
        "the broker's certificate is not yet valid by this computer's clock: this clock is "
        "probably behind (check the date and NTP), or the certificate was issued for a "
        "later date",
    ),
    (
        ("certificate has expired",),
        "the broker's certificate has expired by this computer's clock: renew it "
        "('coalition-keys issue-broker --force'), or check this clock if it is ahead",
    ),
    (
        ("hostname verification check failed",),
        "the broker's certificate does not name the address this client connects to "
        "(name mismatch): connect by a name it holds, or re-issue it with "
        "'coalition-keys issue-broker --host NAME --ip ADDR'",
    ),
    (
        ("certificate_verify_failed", "certificate verify failed"),
        "the broker's certificate failed verification against this coalition's CA (pki/ca.crt)",
    ),
)


def tls_failure(details: str) -> str | None:
    """The sentence for a gRPC UNAVAILABLE detail that is a failed TLS verification."""
    low = details.lower()
    for needles, sentence in _TLS_FAILURES:
        if any(n in low for n in needles):
            return sentence
    return None


# What grpcio's asyncio client reports when writing a request fails inside gRPC Core.
_CORE_WRITE_FAILED = "Internal error from Core"


def client_error(exc: grpc.aio.AioRpcError) -> ClientError:
    """The ClientError for a failed call (the one place that translates gRPC errors).

    grpcio's asyncio client turns a request write that loses the race with the broker
    ending the stream (shutting down, or a clean end) into INTERNAL "Internal error
    from Core", hiding the status the broker sent (grpc/grpc#36066). That is the stream
    going away, not a broker fault, so it is reported as UNAVAILABLE, which callers
    retry (a retried envelope that was in fact accepted is refused as a replay).
    """
    if (
        exc.code() == grpc.StatusCode.INTERNAL
        and exc.details() == _CORE_WRITE_FAILED
        and "SendMessageOperation" in (exc.debug_error_string() or "")
    ):
        return ClientError(
            grpc.StatusCode.UNAVAILABLE,
            "the broker ended the stream while a request was on its way; retry",
        )
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        sentence = tls_failure(exc.details() or "")
        if sentence is not None:
            return BrokerTlsError(sentence)
    return ClientError(exc.code(), exc.details() or exc.code().name)


@contextlib.asynccontextmanager
async def mapped_errors() -> AsyncIterator[None]:
    """Translate gRPC errors into ClientError (see client_error)."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise client_error(exc) from None


async def call(aw: Awaitable[T]) -> T:
    async with mapped_errors():
        return await aw


KEEPALIVE_MS = 30_000
# For tests only: a shorter keepalive interval (milliseconds).
KEEPALIVE_ENV = "COALITION_KEEPALIVE_TIME_MS"


def keepalive_ms() -> int:
    """The client's keepalive ping interval: KEEPALIVE_MS unless a test shortens it."""
    raw = os.environ.get(KEEPALIVE_ENV, "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else KEEPALIVE_MS


def secure_channel(target: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> grpc.aio.Channel:
    """A mutual-TLS channel to the broker."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )
    return grpc.aio.secure_channel(
        target,
        creds,
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
            # Pings keep an idle subscription's connection known alive (and NAT entries
            # fresh); the broker accepts them from min_ping_interval_ms (10 s) on.
            ("grpc.keepalive_time_ms", keepalive_ms()),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ],
    )


# -- sequence numbers ------------------------------------------------------------------------


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


# What a sender may say about a partner named in REL TO that got no key: only what it
# legitimately has (the directory it may see, the broker's Recipients answer for a label
# it may originate), never another partner's clearance, categories or topics.
NOT_LISTED = "not a listed partner: not admitted, unknown, or a group"
NO_KEY_BUNDLE = "no key bundle"
NOT_ELIGIBLE = "not eligible now"
KEYS_UNVERIFIED = "its keys do not verify"


def _not_sealed_for(
    label: Label, me: str, eligible: Sequence[str], chosen: Sequence[str], d: Directory
) -> dict[str, str]:
    """Each partner named in REL TO (but this one) that is not among chosen, and why."""
    out: dict[str, str] = {}
    for code in label.releasable_to or ():
        if code == me or code in chosen:
            continue
        peer = d.peers.get(code)
        if code in d.problems:
            out[code] = KEYS_UNVERIFIED
        elif peer is None:
            out[code] = NOT_LISTED
        elif peer.hpke_public is None:
            out[code] = NO_KEY_BUNDLE  # none registered, or none this sender may use
        elif code not in eligible:
            out[code] = NOT_ELIGIBLE  # the broker's word: policy, suspension, topic
    return out


# -- partner client --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sealed:
    envelope: envelope_pb2.Envelope
    message_id: str
    recipients: tuple[str, ...]
    sequence: int
    allocation: Allocation = field(default_factory=lambda: Allocation(0))
    # Partners named in REL TO that got no key, with why (see PartnerClient.seal).
    not_sealed_for: Mapping[str, str] = field(default_factory=dict)


class PartnerClient:
    """A partner's connection to the broker."""

    def __init__(
        self,
        creds: PartnerCredentials,
        target: str,
        *,
        sequencer: SequenceSource | None = None,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.creds = creds
        self.code = creds.code
        self.target = target
        self.clock = clock
        self.sequencer: SequenceSource = sequencer or Sequencer()
        self.ca_cert = x509.load_pem_x509_certificate(creds.ca_pem)
        self.channel = secure_channel(target, creds.ca_pem, creds.tls_cert_pem, creds.tls_key_pem)
        self.stub: ExchangeAsyncStub = exchange_pb2_grpc.ExchangeStub(self.channel)
        self._directory: Directory | None = None
        self._pub: _PublishStream | None = None

    async def __aenter__(self) -> PartnerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._pub is not None:
            await self._pub.close()
            self._pub = None
        await self.channel.close(None)

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the TLS channel is up (raises ClientError on timeout)."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except TimeoutError:
            raise ClientError(
                grpc.StatusCode.UNAVAILABLE, f"broker at {self.target} not reachable"
            ) from None

    # -- keys and directory ----------------------------------------------------------------
    async def register_keys(self) -> str:
        """Publish this node's current signed key bundle; returns its key id."""
        resp = await call(
            self.stub.RegisterKeys(exchange_pb2.RegisterKeysRequest(bundle=self.creds.bundle))
        )
        return resp.key_id

    async def directory(self, *, refresh: bool = False) -> Directory:
        """The verified directory (cached until refresh)."""
        if self._directory is None or refresh:
            resp = await call(self.stub.Directory(exchange_pb2.DirectoryRequest()))
            self._directory = Directory.verify(resp.entries, self.ca_cert, self.clock())
        return self._directory

    async def recipients(self, label: Label, topic: str) -> list[str]:
        """Partners the broker reports eligible for this label and topic now."""
        resp = await call(
            self.stub.Recipients(
                exchange_pb2.RecipientsRequest(label=label_to_proto(label), topic=topic)
            )
        )
        return list(resp.partners)

    # -- sealing and publishing --------------------------------------------------------------
    async def seal(
        self,
        payload: bytes,
        *,
        topic: str,
        label: Label,
        precedence: Precedence = Precedence.ROUTINE,
        content_type: str = env.INTEL_SUMMARY,
        recipients: Sequence[str] | None = None,
    ) -> Sealed:
        """Seal payload for the eligible recipients, each checked against the signed directory.

        Raises NoRecipients when nobody may receive it.
        """
        names = list(recipients) if recipients is not None else await self.recipients(label, topic)

        def usable(d: Directory, name: str) -> bool:
            # Releasability is the broker's word (Recipients): which groups a partner is
            # in is its standing, which the directory does not show, and a code in REL TO
            # may name a partner and a group at once. What the node checks itself is the
            # key: CA-certified signing key, bundle signed under it.
            peer = d.peers.get(name)
            return (
                releases_to_anyone(label)
                and peer is not None
                and peer.hpke_public is not None
                and name != self.code
            )

        directory = await self.directory()
        if not all(usable(directory, n) for n in names if n != self.code):
            # Keys or groups may have changed since the cached copy (policy changes,
            # key rotation): check again against a fresh directory before dropping anyone.
            directory = await self.directory(refresh=True)
        # Unknown, keyless, or not released to by the label: never wrap for it.
        chosen = [
            env.Recipient(name, peer.key_id, peer.hpke_public)
            for name in names
            if usable(directory, name) and (peer := directory.peers[name]).hpke_public is not None
        ]
        dropped = _not_sealed_for(label, self.code, names, [r.partner for r in chosen], directory)
        if not chosen:
            why = "; ".join(f"{p} ({r})" for p, r in dropped.items())
            raise NoRecipients(
                f"no eligible recipient for {label.human()} on {topic} right now"
                + (f": {why}" if why else ""),
                dropped,
            )
        alloc = self.sequencer.allocate([r.partner for r in chosen])
        seq = alloc.sequence
        chosen = [
            dataclasses.replace(r, sequence=alloc.per_recipient.get(r.partner, 0)) for r in chosen
        ]
        message_id = os.urandom(16).hex()
        envelope = env.seal(
            plaintext=payload,
            message_id=message_id,
            sender=self.code,
            signing_key=self.creds.signing_key,
            signing_key_id=self.creds.signing_key_id,
            sequence=seq,
            topic=topic,
            label=label_to_proto(label),
            precedence=int(precedence),
            content_type=content_type,
            recipients=chosen,
            created_ms=self.clock(),
        )
        return Sealed(envelope, message_id, tuple(r.partner for r in chosen), seq, alloc, dropped)

    def discard(self, sealed: Sealed) -> None:
        """Forget a sealed envelope the broker refused: its recipients' numbers are reused.

        Only for a definite refusal; after an ambiguous failure (the connection broke) the
        envelope may be stored, so its numbers must stay taken. A discarded envelope must
        not be published again (seal the payload anew): its numbers now belong to others.
        """
        self.sequencer.release(sealed.allocation)

    async def publish(
        self, envelopes: Sequence[envelope_pb2.Envelope]
    ) -> list[exchange_pb2.PublishResult]:
        """Publish envelopes in one request; one result each, once durable or refused."""
        if self._pub is None or self._pub.broken:
            self._pub = _PublishStream(self.stub)
        return await self._pub.send(envelopes)

    # -- subscribing and opening ---------------------------------------------------------------
    def subscribe(
        self,
        topics: Sequence[str],
        *,
        window: int = 256,
        on_expired: ExpiredHandler | None = None,
    ) -> Subscription:
        """A Subscribe stream; on_expired receives the broker's expiry notices (see
        Subscription)."""
        return Subscription(self.stub, topics, window, on_expired=on_expired)

    async def open(self, delivery: exchange_pb2.Delivery) -> env.Opened:
        """Verify and decrypt a delivery. Raises env.InvalidEnvelope."""
        directory = await self.directory()
        try:
            return env.open(
                delivery.envelope,
                recipient=self.code,
                keys=self.creds.hpke_keys,
                signer=directory.signer,
            )
        except env.InvalidEnvelope as exc:
            if exc.reason is not env.Failure.UNKNOWN_SENDER:
                raise
        # A sender (or signing key) newer than our copy of the directory: fetch it again.
        directory = await self.directory(refresh=True)
        return env.open(
            delivery.envelope,
            recipient=self.code,
            keys=self.creds.hpke_keys,
            signer=directory.signer,
        )


R = TypeVar("R")


class _QueueFeed(AsyncIterator[R]):
    """The requests of a streaming call, taken from a queue; None ends the stream.

    A plain async iterator rather than an async generator, so that gRPC may drop it
    at any point (broker gone, call cancelled) without "already running" errors.
    """

    def __init__(self, queue: asyncio.Queue[R | None]) -> None:
        self._queue = queue

    def __aiter__(self) -> _QueueFeed[R]:
        return self

    async def __anext__(self) -> R:
        req = await self._queue.get()
        if req is None:
            raise StopAsyncIteration
        return req


# Publish coalescing: sends waiting for the stream are merged into one request of at
# most this many envelopes / bytes (a single larger send still goes alone, whole).
PUBLISH_MERGE_MAX_ENVELOPES = 256
PUBLISH_MERGE_MAX_BYTES = 4 << 20
# Requests in flight on one stream before further sends wait (and merge): under load,
# batches grow instead of requests; when idle, a send leaves at once.
PUBLISH_MAX_INFLIGHT = 4


def merge_count(sends: Iterable[tuple[int, int]]) -> int:
    """How many waiting sends, from the first, go into one request.

    ``sends`` gives (envelopes, bytes) per send, in call order; it is read only as far
    as needed. The first send always goes (whole, whatever its size); the following
    ones while the request stays within PUBLISH_MERGE_MAX_ENVELOPES and _BYTES.
    """
    take, count, size = 0, 0, 0
    for n, b in sends:
        if take and (count + n > PUBLISH_MERGE_MAX_ENVELOPES or size + b > PUBLISH_MERGE_MAX_BYTES):
            break
        take, count, size = take + 1, count + n, size + b
    return take


class _PublishStream:
    """One Publish stream with several requests in flight, matched by batch id.

    Concurrent ``send`` calls are merged into one request while the stream is busy
    (``PUBLISH_MAX_INFLIGHT`` requests unanswered), in call order, so a sender's
    sequence order is kept; each caller gets back exactly its own results.
    """

    def __init__(self, stub: ExchangeAsyncStub) -> None:
        self._pending: list[tuple[Sequence[envelope_pb2.Envelope], _ResultFuture]] = []
        self._changed = asyncio.Event()
        self._closing = False
        self._waiting: dict[int, list[tuple[_ResultFuture, int]]] = {}
        self._next = 0
        self.broken = False
        self._call = stub.Publish(_PublishFeed(self))
        self._reader = asyncio.create_task(self._read())

    async def next_request(self) -> exchange_pb2.PublishRequest | None:
        """The next request for the stream: every waiting send that fits, merged."""
        while not self._pending or len(self._waiting) >= PUBLISH_MAX_INFLIGHT:
            if self._closing or self.broken:
                return None
            self._changed.clear()
            await self._changed.wait()
        take = merge_count(
            (len(envs), sum(e.ByteSize() for e in envs)) for envs, _ in self._pending
        )
        chosen, self._pending = self._pending[:take], self._pending[take:]
        self._next += 1
        self._waiting[self._next] = [(fut, len(envs)) for envs, fut in chosen]
        req = exchange_pb2.PublishRequest(batch_id=self._next)
        for envs, _ in chosen:
            req.envelopes.extend(envs)
        return req

    async def _read(self) -> None:
        err: ClientError | None = None
        try:
            async for resp in self._call:
                callers = self._waiting.pop(resp.batch_id, None)
                self._changed.set()
                if callers is None:
                    continue
                results = list(resp.results)
                if len(results) != sum(n for _, n in callers):
                    bad = ClientError(
                        grpc.StatusCode.INTERNAL,
                        f"broker answered {len(results)} results for "
                        f"{sum(n for _, n in callers)} envelopes",
                    )
                    for fut, _ in callers:
                        if not fut.done():
                            fut.set_exception(bad)
                    continue
                at = 0
                for fut, n in callers:
                    if not fut.done():
                        fut.set_result(results[at : at + n])
                    at += n
        except grpc.aio.AioRpcError as exc:
            err = client_error(exc)
        except asyncio.CancelledError:
            err = ClientError(grpc.StatusCode.CANCELLED, "publish stream closed")
        self.broken = True
        self._changed.set()
        err = err or ClientError(grpc.StatusCode.UNAVAILABLE, "publish stream ended")
        for callers in self._waiting.values():
            for fut, _ in callers:
                if not fut.done():
                    fut.set_exception(err)
        self._waiting.clear()
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()

    async def send(
        self, envelopes: Sequence[envelope_pb2.Envelope]
    ) -> list[exchange_pb2.PublishResult]:
        if self.broken:
            raise ClientError(grpc.StatusCode.UNAVAILABLE, "publish stream is closed")
        if not envelopes:
            return []
        fut: _ResultFuture = asyncio.get_running_loop().create_future()
        self._pending.append((envelopes, fut))
        self._changed.set()
        return await fut

    async def close(self) -> None:
        self._closing = True
        self._changed.set()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        self._call.cancel()


_ResultFuture = asyncio.Future[list[exchange_pb2.PublishResult]]


class _PublishFeed(AsyncIterator[exchange_pb2.PublishRequest]):
    """The request side of a Publish call: merged requests from its _PublishStream."""

    def __init__(self, stream: _PublishStream) -> None:
        self._stream = stream

    def __aiter__(self) -> _PublishFeed:
        return self

    async def __anext__(self) -> exchange_pb2.PublishRequest:
        req = await self._stream.next_request()
        if req is None:
            raise StopAsyncIteration
        return req


# How long an acknowledgement may wait for others to share its message.
ACK_LINGER_S = 0.002


ExpiredHandler = Callable[[Sequence[exchange_pb2.Expired]], Awaitable[None]]


class Subscription:
    """A Subscribe stream: iterate for deliveries, ``ack()`` each once it is safe.

    Expiry notices (messages the broker's retention removed before this partner had
    them) go to ``on_expired``, awaited while the deliveries wait, then acknowledged; so
    a handler that records them durably before returning loses none. Without a handler
    they are kept in ``expired`` unacknowledged (the broker sends them again next time).
    """

    def __init__(
        self,
        stub: ExchangeAsyncStub,
        topics: Sequence[str],
        window: int,
        *,
        on_expired: ExpiredHandler | None = None,
    ) -> None:
        self._queue: asyncio.Queue[exchange_pb2.SubscribeRequest | None] = asyncio.Queue()
        self._queue.put_nowait(
            exchange_pb2.SubscribeRequest(
                open=exchange_pb2.SubscribeOpen(topics=list(topics), window=window)
            )
        )
        self._call = stub.Subscribe(_QueueFeed(self._queue))
        self._gen: AsyncGenerator[exchange_pb2.Delivery, None] | None = None
        self.caught_up = asyncio.Event()
        self._acks: list[int] = []
        self._ack_flush: asyncio.TimerHandle | None = None
        # Set when the stream has ended (broker closed it, or after aclose()).
        self.ended = asyncio.Event()
        self.on_expired = on_expired
        self.expired: list[exchange_pb2.Expired] = []
        # Awaited in stream order with each caught_up status (after the deliveries before it).
        self.on_status: Callable[[bool], Awaitable[None]] | None = None

    def __aiter__(self) -> AsyncGenerator[exchange_pb2.Delivery, None]:
        self._gen = self._deliveries()
        return self._gen

    async def _deliveries(self) -> AsyncGenerator[exchange_pb2.Delivery, None]:
        # No context manager around the yields: closing this generator early (a caller's
        # break) must not run another generator's cleanup.
        try:
            async for resp in self._call:
                kind = resp.WhichOneof("kind")
                if kind == "status":
                    # caught_up=False: the stream fell behind again (a backlog follows,
                    # FLASH first); True: that backlog is out, live messages follow.
                    if resp.status.caught_up:
                        self.caught_up.set()
                    else:
                        self.caught_up.clear()
                    if self.on_status is not None:
                        await self.on_status(resp.status.caught_up)
                    continue
                if kind == "expired":
                    notices = list(resp.expired.expired)
                    if self.on_expired is None:
                        self.expired.extend(notices)
                    else:
                        await self.on_expired(notices)
                        await self.ack([n.offset for n in notices])
                    continue
                if kind == "batch":
                    for d in resp.batch.deliveries:
                        yield d
                elif kind == "delivery":
                    yield resp.delivery
        except grpc.aio.AioRpcError as exc:
            raise client_error(exc) from None
        finally:
            self.ended.set()

    async def ack(self, offsets: Sequence[int]) -> None:
        """Acknowledge deliveries; sent after a short linger so acks travel in batches."""
        self._acks.extend(offsets)
        if self._ack_flush is None:
            self._ack_flush = asyncio.get_running_loop().call_later(ACK_LINGER_S, self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_flush = None
        if self._acks:
            self._queue.put_nowait(
                exchange_pb2.SubscribeRequest(ack=exchange_pb2.Ack(offsets=self._acks))
            )
            self._acks = []

    async def aclose(self, timeout: float = 5.0) -> None:
        """Close gracefully: acknowledgements already queued reach the broker first.

        Deliveries still in flight are read and dropped; being unacknowledged, they
        will be delivered again on the next subscription.
        """
        if self._ack_flush is not None:
            self._ack_flush.cancel()
        self._flush_acks()
        self._queue.put_nowait(None)

        async def drain() -> None:
            if self._gen is not None and getattr(self._gen, "ag_running", False):
                # Another task is reading; it sees the end of the stream.
                await self.ended.wait()
                return
            # gRPC reports the final status only after every response was read.
            async for _ in self._call:
                pass

        try:
            await asyncio.wait_for(drain(), timeout)
        except (TimeoutError, grpc.aio.AioRpcError):
            self._call.cancel()
        self.ended.set()

    def close(self) -> None:
        """Cancel at once; unacknowledged deliveries will be delivered again."""
        self._queue.put_nowait(None)
        self._call.cancel()


# -- operator client -------------------------------------------------------------------------


class OperatorClient:
    """An operator's connection to the Admin service."""

    def __init__(self, creds: OperatorCredentials, target: str) -> None:
        self.name = creds.name
        self.channel = secure_channel(target, creds.ca_pem, creds.tls_cert_pem, creds.tls_key_pem)
        self.stub: AdminAsyncStub = admin_pb2_grpc.AdminStub(self.channel)

    async def __aenter__(self) -> OperatorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close(None)

    async def admit(
        self, partner: str, signing_cert_der: bytes, policy: policy_pb2.PartnerPolicy, reason: str
    ) -> admin_pb2.PolicyChangeResponse:
        return await call(
            self.stub.AdmitPartner(
                admin_pb2.AdmitPartnerRequest(
                    partner=partner, signing_cert=signing_cert_der, policy=policy, reason=reason
                )
            )
        )

    async def partners(self) -> list[admin_pb2.PartnerSummary]:
        return list((await call(self.stub.ListPartners(admin_pb2.ListPartnersRequest()))).partners)

    async def show(self, partner: str) -> admin_pb2.ShowPartnerResponse:
        return await call(self.stub.ShowPartner(admin_pb2.ShowPartnerRequest(partner=partner)))

    async def policy(self, partner: str) -> policy_pb2.PolicyVersion:
        return await call(self.stub.GetPolicy(admin_pb2.GetPolicyRequest(partner=partner)))

    async def set_policy(
        self, policy: policy_pb2.PartnerPolicy, reason: str, expected_version: int = 0
    ) -> admin_pb2.PolicyChangeResponse:
        return await call(
            self.stub.SetPolicy(
                admin_pb2.SetPolicyRequest(
                    policy=policy, reason=reason, expected_version=expected_version
                )
            )
        )

    async def approve(self, proposal_id: str, reason: str = "") -> admin_pb2.PolicyChangeResponse:
        return await call(
            self.stub.ApproveProposal(
                admin_pb2.DecideProposalRequest(proposal_id=proposal_id, reason=reason)
            )
        )

    async def reject(self, proposal_id: str, reason: str = "") -> admin_pb2.PolicyChangeResponse:
        return await call(
            self.stub.RejectProposal(
                admin_pb2.DecideProposalRequest(proposal_id=proposal_id, reason=reason)
            )
        )

    async def proposals(self, *, all: bool = False) -> list[policy_pb2.Proposal]:
        resp = await call(self.stub.ListProposals(admin_pb2.ListProposalsRequest(all=all)))
        return list(resp.proposals)

    async def history(self, partner: str) -> list[policy_pb2.PolicyVersion]:
        resp = await call(self.stub.PolicyHistory(admin_pb2.PolicyHistoryRequest(partner=partner)))
        return list(resp.versions)

    async def suspend(self, partner: str, reason: str) -> admin_pb2.PolicyChangeResponse:
        return await call(
            self.stub.Suspend(admin_pb2.StatusChangeRequest(partner=partner, reason=reason))
        )

    async def reinstate(self, partner: str, reason: str) -> admin_pb2.PolicyChangeResponse:
        return await call(
            self.stub.Reinstate(admin_pb2.StatusChangeRequest(partner=partner, reason=reason))
        )

    async def audit(self, **filters: Any) -> list[audit_pb2.AuditEntry]:
        out = []
        async with mapped_errors():
            async for e in self.stub.QueryAudit(admin_pb2.QueryAuditRequest(**filters)):
                out.append(e)
        return out

    async def verify_audit(self) -> admin_pb2.VerifyAuditResponse:
        return await call(self.stub.VerifyAudit(admin_pb2.VerifyAuditRequest()))

    async def export_audit(self) -> list[admin_pb2.AuditRecord]:
        out = []
        async with mapped_errors():
            async for r in self.stub.ExportAudit(admin_pb2.ExportAuditRequest()):
                out.append(r)
        return out

    async def stats(self) -> admin_pb2.StatsResponse:
        return await call(self.stub.Stats(admin_pb2.StatsRequest()))

    async def who_receives(self, label: Label, topic: str) -> admin_pb2.WhoReceivesResponse:
        return await call(
            self.stub.WhoReceives(
                admin_pb2.WhoReceivesRequest(label=label_to_proto(label), topic=topic)
            )
        )


__all__ = [
    "Allocation",
    "BrokerTlsError",
    "ClientError",
    "Directory",
    "NoRecipients",
    "OperatorClient",
    "PartnerClient",
    "Peer",
    "Sealed",
    "SequenceSource",
    "Sequencer",
    "Subscription",
]
