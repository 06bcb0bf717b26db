"""``SubscribeStream`` (alias ``Subscription``): the SDK's end of a Subscribe stream.

Not the broker's ``Subscription`` (broker/exchange/live.py), which is the server's end.

It asks for shared runs (``SubscribeOpen.shared_runs``): the broker then sends the byte
runs a delivery batch's envelopes repeat once per batch, and each envelope with them cut
out; ``rebuilt`` puts every envelope of the batch back together, within bounds
(``coalition.shared_runs``), before any of its deliveries is yielded, so callers see
deliveries exactly as a broker without shared runs sends them. A batch that does not
rebuild ends the stream with ``ClientError(INTERNAL)``, as a response that does not
parse does; nothing of it reaches the caller, and the broker delivers it again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.protobuf.message import DecodeError

from clients.sdk.channel import MAX_RECEIVE_BYTES
from clients.sdk.errors import ClientError, client_error
from coalition.shared_runs import Rebuilder, SharedRunsError
from coalition.v1 import exchange_pb2

if TYPE_CHECKING:
    from coalition.v1.exchange_pb2_grpc import ExchangeAsyncStub


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


# How long an acknowledgement may wait for others to share its message.
ACK_LINGER_S = 0.002


ExpiredHandler = Callable[[Sequence[exchange_pb2.Expired]], Awaitable[None]]


class SubscribeStream:
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
        shared_runs: bool = True,
    ) -> None:
        self._queue: asyncio.Queue[exchange_pb2.SubscribeRequest | None] = asyncio.Queue()
        self._queue.put_nowait(
            exchange_pb2.SubscribeRequest(
                open=exchange_pb2.SubscribeOpen(
                    topics=list(topics), window=window, shared_runs=shared_runs
                )
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
                    for d in rebuilt(resp.batch):
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


def rebuilt(batch: exchange_pb2.DeliveryBatch) -> Sequence[exchange_pb2.Delivery]:
    """batch's deliveries, each carrying its whole envelope: any sent with its shared
    runs cut out is rebuilt and parsed. All or nothing: raises ClientError(INTERNAL)
    if any does not rebuild or parse (references out of range or order, a table or a
    batch over its bounds, bytes that are not an envelope)."""
    deliveries = batch.deliveries
    if not batch.shared and not any(d.envelope_cut or d.shared_refs for d in deliveries):
        return deliveries
    try:
        # Within what one response can carry: a broker gains no memory by sharing.
        builder = Rebuilder(batch.shared, MAX_RECEIVE_BYTES)
        for d in deliveries:  # in place: on any failure none is yielded
            if not (d.envelope_cut or d.shared_refs):
                continue
            if d.HasField("envelope"):
                raise SharedRunsError("a delivery carries both its envelope and a cut one")
            d.envelope.ParseFromString(builder.rebuild(d.envelope_cut, d.shared_refs))
            d.ClearField("envelope_cut")
            d.ClearField("shared_refs")
    except (SharedRunsError, DecodeError) as exc:
        raise ClientError(
            grpc.StatusCode.INTERNAL,
            f"the broker sent a delivery batch whose envelopes do not rebuild from its "
            f"shared byte runs ({exc}); nothing of it was taken",
        ) from None
    return deliveries


# The name callers have used since the SDK was one module.
Subscription = SubscribeStream
