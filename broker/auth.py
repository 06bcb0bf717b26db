"""Authentication and service-level authorization, as a server interceptor.

The TLS layer has already verified the client certificate against the coalition
CA. This interceptor maps the certificate's SAN URI to an identity, re-checks
validity and revocation, and decides which service the identity may call:
partners the Exchange service, operators the Admin service, anyone
authenticated the health and reflection services. Servicers hold no auth code;
they read the identity from ``current_identity()``.

Requests reach the broker as bytes: the interceptor registers every handler with a
pass-through deserializer, authorizes the caller first, and only then parses the
request (each item of a stream as the servicer asks for it). A request that is not
valid protobuf is refused ``INVALID_ARGUMENT`` and audited (``request.malformed``), so
an unauthorized caller learns nothing from what it sends, and junk never surfaces as
``UNKNOWN``.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from cryptography import x509

from broker.audit import AuditError, AuditLog
from broker.config import BrokerConfig
from broker.errors import InvalidInput
from broker.registry import Registry
from coalition.identity import (
    Identity,
    IdentityError,
    IdentityKind,
    check_validity,
    identity_from_cert,
)
from coalition.policy import PartnerStatus

log = logging.getLogger("coalition.broker.auth")

_IDENTITY: contextvars.ContextVar[Identity] = contextvars.ContextVar("coalition_identity")

EXCHANGE = "/coalition.v1.Exchange/"
ADMIN = "/coalition.v1.Admin/"
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


TLS_VERSION = "TLSv1.3"


def _tls_version(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The TLS version grpc negotiated for this call's connection ("" if not TLS)."""
    values = list(context.auth_context().get("ssl_tls_version") or [])
    return values[0].decode("ascii", "replace") if values else ""


def current_identity() -> Identity:
    """The authenticated caller of the RPC being served."""
    return _IDENTITY.get()


MALFORMED_KIND = "request.malformed"


class MalformedRequest(InvalidInput):
    """A request, or the ``ordinal``-th request of a stream, that does not parse."""

    def __init__(self, message_name: str, ordinal: int, exc: BaseException) -> None:
        where = f"request {ordinal} of the stream" if ordinal else "request"
        super().__init__(
            "malformed_request", f"{where} is not a valid {message_name}: {exc or type(exc)}"
        )
        self.ordinal = ordinal


class AuthRefused(Exception):
    def __init__(self, status: grpc.StatusCode, code: str, message: str, actor: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.actor = status, code, message, actor


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Resolve the mTLS identity and refuse (audited) what it may not call."""

    def __init__(
        self, cfg: BrokerConfig, registry: Registry, audit: AuditLog, clock: Callable[[], int]
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.audit = audit
        self.clock = clock
        self.revoked = {s.lower() for s in cfg.revoked_serials}

    def authorize(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> Identity:
        """The caller's identity, or AuthRefused."""
        auth = context.auth_context()
        pems = list(auth.get("x509_pem_cert") or [])
        if not pems:
            raise AuthRefused(
                grpc.StatusCode.UNAUTHENTICATED,
                "no_certificate",
                "a client certificate is required",
                "",
            )
        tls = _tls_version(context)
        if tls != TLS_VERSION:
            # grpc Python has no knob for the minimum TLS version, so it is enforced here.
            raise AuthRefused(
                grpc.StatusCode.UNAUTHENTICATED,
                "tls_version",
                f"the connection uses {tls or 'no TLS'}; {TLS_VERSION} is required",
                "",
            )
        try:
            cert = x509.load_pem_x509_certificate(pems[0])
            ident = identity_from_cert(cert)
        except (ValueError, IdentityError) as exc:
            raise AuthRefused(
                grpc.StatusCode.UNAUTHENTICATED,
                "no_identity",
                f"the client certificate names no coalition identity: {exc}",
                "",
            ) from exc
        try:
            check_validity(cert, self.clock(), "the client certificate")
        except IdentityError as exc:
            raise AuthRefused(
                grpc.StatusCode.UNAUTHENTICATED, "cert_expired", str(exc), ident.uri
            ) from exc
        if format(cert.serial_number, "x") in self.revoked:
            raise AuthRefused(
                grpc.StatusCode.UNAUTHENTICATED,
                "cert_revoked",
                "the client certificate has been revoked",
                ident.uri,
            )
        if method.startswith(OPEN_SERVICES):
            return ident
        if method.startswith(EXCHANGE):
            if ident.kind is not IdentityKind.PARTNER:
                raise AuthRefused(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "not_a_partner",
                    f"{ident.uri} is not a partner; the Exchange service is for partners",
                    ident.uri,
                )
            rec = self.registry.get(ident.name)
            if rec is None:
                raise AuthRefused(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "unknown_partner",
                    f"partner {ident.name} is not registered with this broker; "
                    "an operator must admit it",
                    ident.uri,
                )
            if rec.policy.status is PartnerStatus.PENDING:
                # Deny by default: proposed by one operator is not admitted. Until a
                # second operator approves, only the health check answers.
                raise AuthRefused(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "not_admitted",
                    f"partner {ident.name} is not admitted yet: its admission awaits a "
                    "second operator's approval",
                    ident.uri,
                )
            return ident
        if method.startswith(ADMIN):
            if ident.kind is not IdentityKind.OPERATOR:
                raise AuthRefused(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "not_an_operator",
                    f"{ident.uri} is not an operator; the Admin service is for operators",
                    ident.uri,
                )
            if ident.name not in self.cfg.operators:
                raise AuthRefused(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "unknown_operator",
                    f"operator {ident.name} is not authorized on this broker",
                    ident.uri,
                )
            return ident
        raise AuthRefused(
            grpc.StatusCode.PERMISSION_DENIED,
            "unknown_service",
            f"no such service for {ident.uri}",
            ident.uri,
        )

    async def _check(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
        try:
            _IDENTITY.set(self.authorize(context, method))
        except AuthRefused as exc:
            await self._audit(
                context,
                kind="auth.refused",
                actor=exc.actor or context.peer(),
                decision=exc.code,
                detail={"method": method, "reason": exc.message, "tls": _tls_version(context)},
            )
            log.warning("refused", extra={"method": method, "actor": exc.actor, "reason": exc.code})
            await context.abort(exc.status, exc.message)

    async def _audit(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        kind: str,
        actor: str,
        decision: str,
        detail: dict[str, object],
        partner: str = "",
    ) -> None:
        try:
            await self.audit.record(
                kind=kind,
                actor=actor,
                partner=partner,
                decision=decision,
                detail=detail,
                now_ms=self.clock(),
            )
        except AuditError:
            # The refusal still goes back with its status; the log says why it has no entry.
            log.critical("audit log cannot be written; %s %s not recorded", kind, decision)

    async def malformed(
        self, context: grpc.aio.ServicerContext[Any, Any], method: str, err: MalformedRequest
    ) -> None:
        """Audit a request that did not parse (the caller is already authorized)."""
        ident = _IDENTITY.get(None)
        who = ident.name if ident is not None else context.peer()
        partner = ident.name if ident is not None and ident.kind is IdentityKind.PARTNER else ""
        detail: dict[str, object] = {"method": method, "reason": err.message}
        if err.ordinal:
            detail["ordinal"] = err.ordinal
        await self._audit(
            context,
            kind=MALFORMED_KIND,
            actor=who,
            partner=partner,
            decision=err.code,
            detail=detail,
        )
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
            await ctx.abort(err.status, err.message)

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
                await ctx.abort(err.status, err.message)

        return grpc.stream_unary_rpc_method_handler(su, None, h.response_serializer)
    inner_ss = h.stream_stream

    async def ss(it: Any, ctx: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await check(ctx)
        try:
            async for item in inner_ss(ParsedStream(it, parse, ctx, refuse), ctx):
                yield item
        except MalformedRequest as err:
            await ctx.abort(err.status, err.message)

    return grpc.stream_stream_rpc_method_handler(ss, None, h.response_serializer)
