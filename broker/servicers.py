"""Thin gRPC servicers: protobuf in, a call on the core, protobuf out.

Domain errors become gRPC statuses here, through the table in broker.errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import grpc

from broker.admin import AdminCore
from broker.audit import AuditError
from broker.auth import MalformedRequest, current_identity
from broker.errors import BrokerError, Exhausted, InvalidInput
from broker.exchange import (
    DeliveryBatch,
    ExchangeCore,
    PublishOutcome,
    Refused,
    StreamItem,
    StreamStatus,
)
from broker.store.base import Notice
from coalition.policy import PartnerStatus
from coalition.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    audit_pb2,
    exchange_pb2,
    exchange_pb2_grpc,
    policy_pb2,
)

log = logging.getLogger("coalition.broker")
Ctx = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")
# Publish requests of one stream being processed at once.
PUBLISH_PIPELINE_DEPTH = 32


async def _abort(ctx: Ctx, err: BrokerError) -> None:
    await ctx.abort(err.status, err.message)


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
        await _abort(ctx, err)

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
                    size = req.ByteSize() if req is not None else 0
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
                    await _abort(context, item)
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

    async def Subscribe(
        self, request_iterator: AsyncIterator[exchange_pb2.SubscribeRequest], context: Ctx
    ) -> AsyncIterator[exchange_pb2.SubscribeResponse]:
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
            await _abort(context, err)
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
        status=err.status.name,
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


def _subscribe_response(item: StreamItem) -> exchange_pb2.SubscribeResponse:
    """The wire form of one item of the delivery loop."""
    resp = exchange_pb2.SubscribeResponse()
    if isinstance(item, DeliveryBatch):
        out = resp.batch  # filled in place: SubscribeResponse(batch=out) copies it all
        for m, h in zip(item.messages, item.headers, strict=True):
            # add() + copy into place: appending a built Delivery to the repeated field
            # costs more (upb copies the whole message again); the stored envelope bytes
            # are merged in, not parsed into a separate message first.
            d = out.deliveries.add(offset=m.offset, topic=h.topic, precedence=h.precedence)
            d.envelope.MergeFromString(m.envelope)
            d.label.CopyFrom(h.label)
    elif isinstance(item, StreamStatus):
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


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """Every refusal is audited with the operator and the action."""

    def __init__(self, core: AdminCore) -> None:
        self.core = core

    async def _guard(self, ctx: Ctx, action: str, partner: str, coro: Awaitable[T]) -> T:
        try:
            return await coro
        except BrokerError as err:
            try:
                await self.core.refused(
                    current_identity().name, action, err.code, err.message, partner
                )
            except AuditError as exc:  # disk full: the operator still gets the refusal
                log.critical("admin.refused not audited: %s", exc)
            await _abort(ctx, err)
            raise  # abort() raises; this keeps the type checker informed

    def _op(self) -> str:
        return current_identity().name

    async def AdmitPartner(
        self, request: admin_pb2.AdmitPartnerRequest, context: Ctx
    ) -> admin_pb2.PolicyChangeResponse:
        return await self._guard(
            context,
            "admit",
            request.partner,
            self.core.admit(
                self._op(), request.partner, request.signing_cert, request.policy, request.reason
            ),
        )

    async def ListPartners(
        self, request: admin_pb2.ListPartnersRequest, context: Ctx
    ) -> admin_pb2.ListPartnersResponse:
        return admin_pb2.ListPartnersResponse(
            partners=[self.core.summary(r.code) for r in self.core.registry.all()]
        )

    async def ShowPartner(
        self, request: admin_pb2.ShowPartnerRequest, context: Ctx
    ) -> admin_pb2.ShowPartnerResponse:
        async def run() -> admin_pb2.ShowPartnerResponse:
            summary = self.core.summary(request.partner)
            history = await self.core.registry.history(request.partner)
            entry = self.core.ex.directory_entry(request.partner)
            return admin_pb2.ShowPartnerResponse(
                summary=summary, policy=history[-1], directory=entry
            )

        return await self._guard(context, "show", request.partner, run())

    async def GetPolicy(
        self, request: admin_pb2.GetPolicyRequest, context: Ctx
    ) -> policy_pb2.PolicyVersion:
        async def run() -> policy_pb2.PolicyVersion:
            self.core.ex.partner_record(request.partner)
            return (await self.core.registry.history(request.partner))[-1]

        return await self._guard(context, "policy.get", request.partner, run())

    async def SetPolicy(
        self, request: admin_pb2.SetPolicyRequest, context: Ctx
    ) -> admin_pb2.PolicyChangeResponse:
        return await self._guard(
            context,
            "policy.set",
            request.policy.partner,
            self.core.set_policy(
                self._op(), request.policy, request.reason, request.expected_version
            ),
        )

    async def ApproveProposal(
        self, request: admin_pb2.DecideProposalRequest, context: Ctx
    ) -> admin_pb2.PolicyChangeResponse:
        return await self._guard(
            context,
            "proposal.approve",
            "",
            self.core.decide_proposal(
                self._op(), request.proposal_id, approve=True, reason=request.reason
            ),
        )

    async def RejectProposal(
        self, request: admin_pb2.DecideProposalRequest, context: Ctx
    ) -> admin_pb2.PolicyChangeResponse:
        return await self._guard(
            context,
            "proposal.reject",
            "",
            self.core.decide_proposal(
                self._op(), request.proposal_id, approve=False, reason=request.reason
            ),
        )

    async def ListProposals(
        self, request: admin_pb2.ListProposalsRequest, context: Ctx
    ) -> admin_pb2.ListProposalsResponse:
        return admin_pb2.ListProposalsResponse(
            proposals=await self.core.registry.proposals(include_decided=request.all)
        )

    async def PolicyHistory(
        self, request: admin_pb2.PolicyHistoryRequest, context: Ctx
    ) -> admin_pb2.PolicyHistoryResponse:
        async def run() -> admin_pb2.PolicyHistoryResponse:
            self.core.ex.partner_record(request.partner)
            return admin_pb2.PolicyHistoryResponse(
                versions=await self.core.registry.history(request.partner)
            )

        return await self._guard(context, "policy.history", request.partner, run())

    async def Suspend(
        self, request: admin_pb2.StatusChangeRequest, context: Ctx
    ) -> admin_pb2.PolicyChangeResponse:
        return await self._guard(
            context,
            "suspend",
            request.partner,
            self.core.set_status(
                self._op(), request.partner, PartnerStatus.SUSPENDED, request.reason
            ),
        )

    async def Reinstate(
        self, request: admin_pb2.StatusChangeRequest, context: Ctx
    ) -> admin_pb2.PolicyChangeResponse:
        return await self._guard(
            context,
            "reinstate",
            request.partner,
            self.core.set_status(self._op(), request.partner, PartnerStatus.ACTIVE, request.reason),
        )

    async def QueryAudit(
        self, request: admin_pb2.QueryAuditRequest, context: Ctx
    ) -> AsyncIterator[audit_pb2.AuditEntry]:
        rows = await self.core.audit.query(
            partner=request.partner,
            kind=request.kind,
            since_ms=request.since_ms,
            until_ms=request.until_ms,
            limit=request.limit,
            tail=request.tail,
        )
        for row in rows:
            yield row

    async def VerifyAudit(
        self, request: admin_pb2.VerifyAuditRequest, context: Ctx
    ) -> admin_pb2.VerifyAuditResponse:
        return await self.core.verify(self._op())

    async def ExportAudit(
        self, request: admin_pb2.ExportAuditRequest, context: Ctx
    ) -> AsyncIterator[admin_pb2.AuditRecord]:
        async for rec in self.core.audit.export():
            if isinstance(rec, audit_pb2.AuditEntry):
                yield admin_pb2.AuditRecord(entry=rec)
            else:
                yield admin_pb2.AuditRecord(checkpoint=rec)
        if self.core.audit_certificate:
            yield admin_pb2.AuditRecord(audit_certificate=self.core.audit_certificate)

    async def Stats(self, request: admin_pb2.StatsRequest, context: Ctx) -> admin_pb2.StatsResponse:
        return await self.core.stats()

    async def WhoReceives(
        self, request: admin_pb2.WhoReceivesRequest, context: Ctx
    ) -> admin_pb2.WhoReceivesResponse:
        async def run() -> admin_pb2.WhoReceivesResponse:
            return self.core.who_receives(request.label, request.topic)

        return await self._guard(context, "who-receives", "", run())
