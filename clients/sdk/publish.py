"""The Publish stream: concurrent sends merged into requests, several in flight.

Results are matched back to each caller by batch id.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import TYPE_CHECKING

import grpc

from clients.sdk.errors import ClientError, client_error
from coalition.v1 import envelope_pb2, exchange_pb2

if TYPE_CHECKING:
    from coalition.v1.exchange_pb2_grpc import ExchangeAsyncStub


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
