"""The Exchange servicer: protobuf in, a call on the exchange core, protobuf out.

The core answers with domain values (broker.exchange.outcomes) and raises domain errors;
this module turns them into PublishResult / SubscribeResponse messages and, through the
table in broker.grpc.status, into gRPC statuses. It also holds the Publish stream's
pipelining and its byte budget (PublishBudget), which exist because of how HTTP/2 streams
are read. The Admin servicer is in broker.grpc.admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from broker.auth import current_identity
from broker.errors import BrokerError, Exhausted, InvalidInput, MalformedRequest
from broker.exchange import (
    DeliveryBatch,
    ExchangeCore,
    PublishOutcome,
    Refused,
    StreamItem,
    StreamStatus,
)
from broker.grpc.deliveries import delivery_batch_bytes
from broker.grpc.status import abort, status_name
from broker.store.base import Notice
from coalition.v1 import exchange_pb2, exchange_pb2_grpc

log = logging.getLogger("coalition.broker")
Ctx = grpc.aio.ServicerContext[Any, Any]
# Publish requests of one stream being processed at once.
PUBLISH_PIPELINE_DEPTH = 32


class PublishBudget:
    """One partner's Publish streams: how many, and the request bytes they hold in flight.

    Before a stream reads its next request it reserves the largest request grpc lets
    through (``reserve``), and waits while that reservation would take the stream or
    the partner over its byte budget (a stream holding nothing may always read one
    request, so a lone stream never stalls); once the request is read, the reservation
    shrinks to its real size. So a client that writes faster than it reads its answers
    is held back by HTTP/2 flow control instead of filling the broker's memory.
    """

    def __init__(self) -> None:
        self.streams = 0
        self.used = 0
        self._waiters: set[asyncio.Future[None]] = set()

    def release(self, size: int) -> None:
        self.used -= size
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    async def reserve(self, own: list[int], size: int, stream_max: int, partner_max: int) -> None:
        """Wait for room for size more bytes, then take them (own[0]: the stream's bytes)."""
        while (own[0] and own[0] + size > stream_max) or (
            self.used and self.used + size > partner_max
        ):
            fut = asyncio.get_running_loop().create_future()
            self._waiters.add(fut)
            try:
                await fut
            finally:
                self._waiters.discard(fut)
        own[0] += size
        self.used += size


class ExchangeServicer(exchange_pb2_grpc.ExchangeServicer):
    """Every refusal is audited (kind ``<call>.refused``) before the error goes back."""

    def __init__(self, core: ExchangeCore) -> None:
        self.core = core
        self.budgets: dict[str, PublishBudget] = {}

    async def _refuse(self, ctx: Ctx, kind: str, partner: str, err: BrokerError) -> None:
        await self.core.refused(kind, partner, err)  # audited by the core
        await abort(ctx, err)

    async def Publish(
        self, request_iterator: AsyncIterator[exchange_pb2.PublishRequest], context: Ctx
    ) -> AsyncIterator[exchange_pb2.PublishResponse]:
        """Requests are processed as they arrive (pipelined); responses go back in order.

        Each request's task is started in arrival order and reaches the store's writer
        queue before its first wait, so a sender's order is kept, while waiting for one
        request's commit no longer holds up the next (group commit coalesces them).
        """
        partner = current_identity().name
        cfg = self.core.cfg
        budget = self.budgets.setdefault(partner, PublishBudget())
        if budget.streams >= cfg.max_publish_streams:
            await self._refuse(
                context,
                "publish.refused",
                partner,
                Exhausted(
                    "too_many_streams",
                    f"{partner} already has {budget.streams} Publish streams open; the "
                    f"limit is {cfg.max_publish_streams}",
                ),
            )
        budget.streams += 1
        own = [0]  # request bytes this stream holds in flight
        inflight: asyncio.Queue[
            tuple[exchange_pb2.PublishRequest, asyncio.Task[list[PublishOutcome]], int]
            | MalformedRequest
            | None
        ] = asyncio.Queue(maxsize=PUBLISH_PIPELINE_DEPTH)

        async def read() -> None:
            try:
                while True:
                    limit = cfg.receive_limit
                    await budget.reserve(
                        own, limit, cfg.max_publish_stream_bytes, cfg.max_publish_partner_bytes
                    )
                    req = await anext(request_iterator, None)
                    # The interceptor's ParsedStream knows the bytes it parsed; upb's
                    # ByteSize() would serialize the whole request again.
                    size = (
                        0
                        if req is None
                        else getattr(request_iterator, "last_size", 0) or req.ByteSize()
                    )
                    own[0] -= limit - size
                    budget.release(limit - size)
                    if req is None:
                        break
                    task = asyncio.ensure_future(self.core.publish(partner, req.envelopes))
                    await inflight.put((req, task, size))
                    if self.core.closing:
                        break
            except MalformedRequest as err:
                # Audited by the interceptor; the writer answers every earlier request
                # first, then ends the stream with it.
                await inflight.put(err)
            finally:
                await inflight.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await inflight.get()) is not None:
                if isinstance(item, MalformedRequest):
                    await abort(context, item)
                    return
                req, task, size = item
                batch_id = req.batch_id
                try:
                    results = [_publish_result(o) for o in await task]
                except BrokerError as err:
                    # Shutting down: refuse each envelope explicitly rather than drop it.
                    results = [_refused_result("", err) for _ in req.envelopes]
                del req, task, item  # the answer no longer needs the request's bytes
                yield exchange_pb2.PublishResponse(batch_id=batch_id, results=results)
                own[0] -= size
                budget.release(size)
                if self.core.closing and inflight.empty():
                    # End the stream cleanly (OK) rather than be cut off when the grace
                    # period ends, which clients may see as INTERNAL, not retryable.
                    return
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            budget.streams -= 1
            if own[0]:
                budget.release(own[0])
            if budget.streams == 0 and budget.used == 0:
                self.budgets.pop(partner, None)

    async def Subscribe(  # type: ignore[override]  # delivery batches go as bytes
        self, request_iterator: AsyncIterator[exchange_pb2.SubscribeRequest], context: Ctx
    ) -> AsyncIterator[exchange_pb2.SubscribeResponse | bytes]:
        partner = current_identity().name
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            return
        try:
            if first.WhichOneof("kind") != "open":
                raise InvalidInput("no_open", "the first message must be an open")
            sub = self.core.open_subscription(partner, list(first.open.topics), first.open.window)
        except BrokerError as err:
            await self._refuse(context, "subscribe.refused", partner, err)
            return

        async def read_acks() -> None:
            try:
                async for req in request_iterator:
                    if req.WhichOneof("kind") == "ack":
                        self.core.note_acks(sub, list(req.ack.offsets))
            except MalformedRequest as err:
                # Audited by the interceptor. Settle what was acknowledged before it,
                # then end the stream with the error rather than stop reading silently.
                await self.core.acknowledge(sub)
                sub.closed = err
                sub.wake.set()
                return
            await self.core.acknowledge(sub)  # settle the last ones before ending
            sub.finished = True  # the client half-closed after its last acknowledgement
            sub.wake.set()

        acks = asyncio.create_task(read_acks())
        try:
            async for item in self.core.deliveries(sub):
                yield _subscribe_response(item)
        except BrokerError as err:
            await abort(context, err)
        finally:
            self.core.close_subscription(sub)
            acks.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await acks

    async def Directory(
        self, request: exchange_pb2.DirectoryRequest, context: Ctx
    ) -> exchange_pb2.DirectoryResponse:
        partner = current_identity().name
        try:
            entries = self.core.directory(partner)
        except BrokerError as err:
            await self._refuse(context, "directory.refused", partner, err)
            raise
        return exchange_pb2.DirectoryResponse(entries=entries)

    async def RegisterKeys(
        self, request: exchange_pb2.RegisterKeysRequest, context: Ctx
    ) -> exchange_pb2.RegisterKeysResponse:
        partner = current_identity().name
        try:
            key_id = await self.core.register_keys(partner, request.bundle)
        except BrokerError as err:
            await self._refuse(context, "keys.refused", partner, err)
            raise
        return exchange_pb2.RegisterKeysResponse(key_id=key_id)

    async def Recipients(
        self, request: exchange_pb2.RecipientsRequest, context: Ctx
    ) -> exchange_pb2.RecipientsResponse:
        partner = current_identity().name
        try:
            names = self.core.recipients(partner, request.label, request.topic)
        except BrokerError as err:
            await self._refuse(context, "recipients.refused", partner, err)
            raise
        return exchange_pb2.RecipientsResponse(partners=names)


def _refused_result(message_id: str, err: BrokerError) -> exchange_pb2.PublishResult:
    return exchange_pb2.PublishResult(
        message_id=message_id,
        outcome=exchange_pb2.REFUSED,
        reason_code=err.code,
        reason=err.message,
        status=status_name(err),
    )


def _publish_result(o: PublishOutcome) -> exchange_pb2.PublishResult:
    if isinstance(o, Refused):
        return _refused_result(o.message_id, o.error)
    return exchange_pb2.PublishResult(
        message_id=o.message_id,
        outcome=exchange_pb2.ACCEPTED,
        sequence=o.sequence,
        offset=o.offset,
    )


def _subscribe_response(item: StreamItem) -> exchange_pb2.SubscribeResponse | bytes:
    """The wire form of one item of the delivery loop (a delivery batch already
    serialized, around its stored envelopes: broker.grpc.deliveries)."""
    if isinstance(item, DeliveryBatch):
        return delivery_batch_bytes(item)
    resp = exchange_pb2.SubscribeResponse()
    if isinstance(item, StreamStatus):
        resp.status.caught_up = item.caught_up
        resp.status.backlog = item.backlog
    else:
        resp.expired.expired.extend(_expired(n) for n in item.notices)
    return resp


def _expired(n: Notice) -> exchange_pb2.Expired:
    return exchange_pb2.Expired(
        offset=n.offset,
        sender=n.sender,
        message_id=n.message_id,
        sequence=n.sequence,
        recipient_sequence=n.recipient_sequence,
        topic=n.topic,
        reason=n.reason,
        stored_ms=n.stored_ms,
        removed_ms=n.removed_ms,
    )
