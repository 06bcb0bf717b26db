"""Authentication and service-level authorization, as a server interceptor.

The TLS layer has already verified the client certificate against the coalition
CA. This interceptor maps the certificate's SAN URI to an identity, re-checks
validity and revocation, and decides which service the identity may call:
partners the Exchange service, operators the Admin service, anyone
authenticated the health and reflection services. Servicers hold no auth code;
they read the identity from ``current_identity()``.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from cryptography import x509

from broker.audit import AuditError, AuditItem, AuditLog
from broker.config import BrokerConfig
from broker.registry import Registry
from coalition.identity import (
    Identity,
    IdentityError,
    IdentityKind,
    check_validity,
    identity_from_cert,
)

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
            if self.registry.get(ident.name) is None:
                raise AuthRefused(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "unknown_partner",
                    f"partner {ident.name} is not registered with this broker; "
                    "an operator must admit it",
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
            detail = {"method": method, "reason": exc.message, "tls": _tls_version(context)}
            item = AuditItem("auth.refused", exc.actor or context.peer(), "", "", exc.code, detail)
            try:
                # One by one up to a threshold per caller and interval, then summarised.
                one_by_one = await self.audit.record_refusal(
                    item, now_ms=self.clock(), source=exc.actor or "unidentified"
                )
            except AuditError as err:  # disk full: still refuse, with the right status
                one_by_one = True
                log.critical("auth refusal not audited: %s", err)
            if one_by_one:
                log.warning(
                    "refused", extra={"method": method, "actor": exc.actor, "reason": exc.code}
                )
            await context.abort(exc.status, exc.message)

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
        return _wrap(handler, lambda ctx: self._check(ctx, method))


def _wrap(
    h: Any, check: Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler with check() run first, in the handler's own task."""
    if h.unary_unary:
        inner_uu = h.unary_unary

        async def uu(req: Any, ctx: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await check(ctx)
            return await inner_uu(req, ctx)

        return grpc.unary_unary_rpc_method_handler(
            uu, h.request_deserializer, h.response_serializer
        )
    if h.unary_stream:
        inner_us = h.unary_stream

        async def us(req: Any, ctx: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await check(ctx)
            async for item in inner_us(req, ctx):
                yield item

        return grpc.unary_stream_rpc_method_handler(
            us, h.request_deserializer, h.response_serializer
        )
    if h.stream_unary:
        inner_su = h.stream_unary

        async def su(it: Any, ctx: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await check(ctx)
            return await inner_su(it, ctx)

        return grpc.stream_unary_rpc_method_handler(
            su, h.request_deserializer, h.response_serializer
        )
    inner_ss = h.stream_stream

    async def ss(it: Any, ctx: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await check(ctx)
        async for item in inner_ss(it, ctx):
            yield item

    return grpc.stream_stream_rpc_method_handler(ss, h.request_deserializer, h.response_serializer)
