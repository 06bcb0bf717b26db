"""``SubscribeStream`` (alias ``Subscription``): the SDK's end of a Subscribe stream.

Not the broker's ``Subscription`` (broker/exchange/live.py), which is the server's end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import grpc

from clients.sdk.errors import client_error
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


# The name callers have used since the SDK was one module.
Subscription = SubscribeStream
