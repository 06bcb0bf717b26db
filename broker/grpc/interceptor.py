"""The gRPC interceptor: every call authenticated and authorized before its request is
parsed, and ended when its certificate is revoked or expires.

The decisions are ``broker.auth``'s (``Authorizer``): this interceptor reads the
connection's certificate and TLS parameters from grpc, refuses with the status of the
decision's domain error (``broker.grpc.status``), audited (``auth.refused``), and
otherwise sets the caller's identity for the servicers (``broker.auth.current_identity``).
It also bounds the connections one identity may hold calls on (``ConnectionLimit``).

Requests reach the broker as bytes: the interceptor registers every handler with a
pass-through deserializer, authorizes the caller first, and only then parses the
request (each item of a stream as the servicer asks for it). A request that is not
valid protobuf is refused ``INVALID_ARGUMENT`` and audited (``request.malformed``), so
an unauthorized caller learns nothing from what it sends, and junk never surfaces as
``UNKNOWN``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from broker.audit import AuditBackend, AuditError, AuditItem
from broker.auth import (
    Authorizer,
    AuthRefused,
    current_identity,
    identity_or_none,
    set_identity,
    too_many_connections,
)
from broker.config import BrokerConfig
from broker.connections import ConnectionLimit
from broker.errors import MalformedRequest, NotAuthenticated
from broker.grpc.status import abort
from broker.registry import PartnerRegistry
from broker.revocation import serial_hex
from coalition.identity import Identity, IdentityKind, ms_to_datetime

log = logging.getLogger("coalition.broker.auth")

# The client certificate of the call being served: (serial, not_after_ms). See track().
_CERT: contextvars.ContextVar[tuple[int, int]] = contextvars.ContextVar("coalition_cert")
# A live call is ended this long after its certificate's not_after (the broker's clock).
EXPIRY_GRACE_MS = 50
MALFORMED_KIND = "request.malformed"


def _auth_value(context: grpc.aio.ServicerContext[Any, Any], key: str) -> str:
    """One value grpc reports for this call's connection ("" if none)."""
    values = list(context.auth_context().get(key) or [])
    return values[0].decode("ascii", "replace") if values else ""


def _tls_version(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The TLS version grpc negotiated for this call's connection ("" if not TLS)."""
    return _auth_value(context, "ssl_tls_version")


@dataclass(eq=False)
class _LiveCall:
    """An authorized call still running: what a revocation needs to end it."""

    context: grpc.aio.ServicerContext[Any, Any]
    task: asyncio.Task[Any]
    serial: int
    not_after_ms: int
    actor: str
    partner: str
    method: str
    expiry: asyncio.TimerHandle | None = None


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Resolve the mTLS identity and refuse (audited) what it may not call."""

    def __init__(
        self,
        cfg: BrokerConfig,
        registry: PartnerRegistry,
        audit: AuditBackend,
        clock: Callable[[], int],
    ) -> None:
        self.audit = audit
        self.clock = clock
        self.authorizer = Authorizer(cfg, registry, clock)
        self._live: dict[int, set[_LiveCall]] = {}
        self._ending: set[asyncio.Task[bool]] = set()
        self.connections = ConnectionLimit(cfg.max_connections_per_identity)
        # Metrics hook (broker.metrics): each refusal's reason code.
        self.on_refused: Callable[[str], None] = lambda _code: None

    def authorize(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> Identity:
        """The caller's identity (Authorizer.authorize on what grpc reports), or
        AuthRefused."""
        pems = list(context.auth_context().get("x509_pem_cert") or [])
        tls = _tls_version(context)
        group = _auth_value(context, "ssl_negotiated_key_exchange_group")
        caller = self.authorizer.authorize(pems, tls, group, method)
        _CERT.set((caller.serial, caller.not_after_ms))
        return caller.identity

    async def _check(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
        try:
            ident = self.authorize(context, method)
            self._hold_connection(context, ident)
            set_identity(ident)
        except AuthRefused as exc:
            self.on_refused(exc.code)
            one_by_one = await self._audit(
                context,
                kind="auth.refused",
                actor=exc.actor or context.peer(),
                decision=exc.code,
                detail={"method": method, "reason": exc.message, "tls": _tls_version(context)},
                source=exc.actor or "unidentified",
            )
            if one_by_one:
                log.warning(
                    "refused", extra={"method": method, "actor": exc.actor, "reason": exc.code}
                )
            await abort(context, exc.error)
        self.track(context, method)

    def track(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
        """Remember an authorized call until it ends, so that revoking its certificate can
        end it (set_revoked), and so can the certificate expiring while the call goes on.
        Runs in the call's own task, after authorize()."""
        cert, task = _CERT.get(None), asyncio.current_task()
        if cert is None or task is None:
            return
        ident = current_identity()
        partner = ident.name if ident.kind is IdentityKind.PARTNER else ""
        call = _LiveCall(context, task, cert[0], cert[1], ident.uri, partner, method)
        self._live.setdefault(call.serial, set()).add(call)
        self._arm_expiry(call)
        # The stubs declare DoneCallback as a class; grpc calls any callable with the context.
        context.add_done_callback(lambda _: self._untrack(call))  # type: ignore[arg-type]

    def _untrack(self, call: _LiveCall) -> None:
        if call.expiry is not None:
            call.expiry.cancel()
            call.expiry = None
        calls = self._live.get(call.serial)
        if calls is not None:
            calls.discard(call)
            if not calls:
                del self._live[call.serial]

    def _arm_expiry(self, call: _LiveCall) -> None:
        delay_ms = max(call.not_after_ms - self.clock(), 0) + EXPIRY_GRACE_MS
        call.expiry = asyncio.get_running_loop().call_later(delay_ms / 1000, self._expiry_due, call)

    def _expiry_due(self, call: _LiveCall) -> None:
        """The timer of a live call's certificate expiry: end the call if the broker's
        clock agrees it has expired, else wait again."""
        call.expiry = None
        if call not in self._live.get(call.serial, ()):
            return
        if self.clock() <= call.not_after_ms:
            self._arm_expiry(call)
            return
        when = ms_to_datetime(call.not_after_ms).isoformat()
        task = asyncio.ensure_future(
            self._end(call, "cert_expired", f"the client certificate expired at {when}")
        )
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    def live_calls(self) -> int:
        """How many authorized calls are running now."""
        return sum(len(c) for c in self._live.values())

    async def set_revoked(self, entries: Iterable[str]) -> tuple[list[int], int]:
        """Make entries the revoked serials now (a reload); return the newly revoked serials
        and how many live calls were ended.

        Every live call (a Subscribe or Publish stream, an operator's audit export, ...)
        made with a newly revoked certificate ends at once with UNAUTHENTICATED
        ``cert_revoked``, each audited. Raises ValueError for an entry that is not a serial
        (nothing changes then).
        """
        added, removed = self.authorizer.set_revoked(entries)
        revoked = self.authorizer.revoked
        await self._record(
            kind="revocation.reloaded",
            actor="broker",
            decision="allow",
            detail={
                "revoked": len(revoked),
                "added": [serial_hex(s) for s in added],
                "removed": [serial_hex(s) for s in removed],
            },
        )
        ended = 0
        for serial in added:
            for call in list(self._live.get(serial, ())):
                message = "the client certificate has been revoked"
                ended += await self._end(call, "cert_revoked", message)
        log.warning(
            "revoked serials reloaded",
            extra={"revoked": len(revoked), "added": len(added), "ended_calls": ended},
        )
        return added, ended

    async def _end(self, call: _LiveCall, code: str, message: str) -> bool:
        """End a live call with UNAUTHENTICATED code, audited first (once: a call both
        revoked and expired is ended by whichever comes first)."""
        if call not in self._live.get(call.serial, ()):
            return False
        self._untrack(call)
        await self._record(
            kind="auth.refused",
            actor=call.actor,
            partner=call.partner,
            decision=code,
            detail={
                "method": call.method,
                "reason": f"{message}; the call in progress was ended",
                "serial": serial_hex(call.serial),
            },
        )
        extra = {"method": call.method, "actor": call.actor, "reason": code}
        log.warning("call in progress ended", extra=extra)
        if not call.context.done():
            # abort() sends the status from this task, then raises here (AbortError); the
            # call's own task is cancelled so its handler stops at once.
            with contextlib.suppress(grpc.aio.AbortError, grpc.aio.UsageError):
                await abort(call.context, NotAuthenticated(code, message))
        call.task.cancel()
        return True

    async def _record(self, **entry: Any) -> None:
        """An audit entry; if the log cannot take it, the call is ended all the same."""
        try:
            await self.audit.record(**entry, now_ms=self.clock())
        except AuditError as exc:
            log.critical("audit entry not written: %s", exc, extra={"kind": entry["kind"]})

    def _hold_connection(
        self, context: grpc.aio.ServicerContext[Any, Any], ident: Identity
    ) -> None:
        """Count this call's connection as busy for ident until the call ends."""
        peer = context.peer()
        if not self.connections.enter(ident.uri, peer):
            raise too_many_connections(ident, self.connections.limit)
        # grpc-stubs types the callback as a class; any callable of the context works.
        context.add_done_callback(
            lambda _: self.connections.leave(ident.uri, peer)  # type: ignore[arg-type]
        )

    async def _audit(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        kind: str,
        actor: str,
        decision: str,
        detail: dict[str, object],
        partner: str = "",
        source: str = "",
    ) -> bool:
        """Record a refusal: one by one up to a threshold per caller and interval, then
        counted into a summary (AuditLog.record_refusal). True if written one by one."""
        item = AuditItem(kind, actor, partner, "", decision, detail)
        try:
            return await self.audit.record_refusal(
                item, now_ms=self.clock(), source=source or partner or actor
            )
        except AuditError:
            # The refusal still goes back with its status; the log says why it has no entry.
            log.critical("audit log cannot be written; %s %s not recorded", kind, decision)
            return True

    async def malformed(
        self, context: grpc.aio.ServicerContext[Any, Any], method: str, err: MalformedRequest
    ) -> None:
        """Audit a request that did not parse (the caller is already authorized)."""
        ident = identity_or_none()
        who = ident.name if ident is not None else context.peer()
        partner = ident.name if ident is not None and ident.kind is IdentityKind.PARTNER else ""
        detail: dict[str, object] = {"method": method, "reason": err.message}
        if err.ordinal:
            detail["ordinal"] = err.ordinal
        if await self._audit(
            context,
            kind=MALFORMED_KIND,
            actor=who,
            partner=partner,
            decision=err.code,
            detail=detail,
        ):
            log.warning("malformed request", extra={"method": method, "actor": who})

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method

        async def refuse(ctx: grpc.aio.ServicerContext[Any, Any], err: MalformedRequest) -> None:
            await self.malformed(ctx, method, err)

        return _wrap(handler, lambda ctx: self._check(ctx, method), refuse)


Check = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]
Refuse = Callable[[grpc.aio.ServicerContext[Any, Any], MalformedRequest], Awaitable[None]]


def _message_name(deserializer: Any) -> str:
    cls = getattr(deserializer, "__self__", None)
    descriptor = getattr(cls, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request message"))


def _parser(deserializer: Any) -> Callable[[Any, int], Any]:
    """parse(raw, ordinal): the request message, or MalformedRequest."""
    name = _message_name(deserializer)

    def parse(raw: Any, ordinal: int) -> Any:
        if deserializer is None or not isinstance(raw, bytes):
            return raw
        try:
            return deserializer(raw)
        except Exception as exc:  # DecodeError, and anything else a parser may raise
            raise MalformedRequest(name, ordinal, exc) from None

    return parse


class ParsedStream:
    """A stream's requests, parsed one by one as they are asked for.

    A request that does not parse is audited, then raised as MalformedRequest; the
    servicer decides how to end the stream (after answering the earlier requests).
    ``last_size`` is the serialized size of the request just returned.
    """

    def __init__(
        self,
        raw: AsyncIterator[Any],
        parse: Callable[[Any, int], Any],
        ctx: grpc.aio.ServicerContext[Any, Any],
        refuse: Refuse,
    ) -> None:
        self._raw, self._parse, self._ctx, self._refuse = raw, parse, ctx, refuse
        self.count = 0
        self.last_size = 0

    def __aiter__(self) -> ParsedStream:
        return self

    async def __anext__(self) -> Any:
        raw = await anext(self._raw)
        self.count += 1
        self.last_size = len(raw) if isinstance(raw, bytes) else 0
        try:
            return self._parse(raw, self.count)
        except MalformedRequest as err:
            await self._refuse(self._ctx, err)
            raise


def _wrap(h: Any, check: Check, refuse: Refuse) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler taking raw bytes: check() first, then parse, in the handler's task.

    A malformed unary request is refused INVALID_ARGUMENT (audited by refuse()); a
    stream's requests are parsed lazily (ParsedStream), and a MalformedRequest the
    servicer lets escape ends the stream INVALID_ARGUMENT.
    """
    parse = _parser(h.request_deserializer)

    async def unary_request(req: Any, ctx: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await check(ctx)
        try:
            return parse(req, 0)
        except MalformedRequest as err:
            await refuse(ctx, err)
            await abort(ctx, err)

    if h.unary_unary:
        inner_uu = h.unary_unary

        async def uu(req: Any, ctx: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await inner_uu(await unary_request(req, ctx), ctx)

        return grpc.unary_unary_rpc_method_handler(uu, None, h.response_serializer)
    if h.unary_stream:
        inner_us = h.unary_stream

        async def us(req: Any, ctx: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            parsed = await unary_request(req, ctx)
            async for item in inner_us(parsed, ctx):
                yield item

        return grpc.unary_stream_rpc_method_handler(us, None, h.response_serializer)
    if h.stream_unary:
        inner_su = h.stream_unary

        async def su(it: Any, ctx: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await check(ctx)
            try:
                return await inner_su(ParsedStream(it, parse, ctx, refuse), ctx)
            except MalformedRequest as err:
                await abort(ctx, err)

        return grpc.stream_unary_rpc_method_handler(su, None, h.response_serializer)
    inner_ss = h.stream_stream

    async def ss(it: Any, ctx: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await check(ctx)
        try:
            async for item in inner_ss(ParsedStream(it, parse, ctx, refuse), ctx):
                yield item
        except MalformedRequest as err:
            await abort(ctx, err)

    return grpc.stream_stream_rpc_method_handler(ss, None, _passing_bytes(h.response_serializer))


def _passing_bytes(serialize: Any) -> Any:
    """The handler's response serializer, passing on unchanged a response the servicer
    serialized itself (bytes: Subscribe's delivery batches, broker.grpc.deliveries)."""
    if serialize is None:
        return None

    def serialize_or_pass(response: Any) -> Any:
        return response if isinstance(response, bytes) else serialize(response)

    return serialize_or_pass
