"""The one table from domain error (``broker.errors``) to gRPC status code.

Every place that turns a ``BrokerError`` into a gRPC status (the servicers, the
interceptor, the status name a refused publish carries) looks it up here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import grpc

from broker.errors import (
    AlreadyExists,
    BrokerError,
    Exhausted,
    Forbidden,
    InvalidInput,
    NotAuthenticated,
    NotFound,
    Precondition,
    Unavailable,
)

STATUS: Mapping[type[BrokerError], grpc.StatusCode] = {
    BrokerError: grpc.StatusCode.INTERNAL,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    NotAuthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    Precondition: grpc.StatusCode.FAILED_PRECONDITION,
    Exhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_of(err: BrokerError) -> grpc.StatusCode:
    """The gRPC status for err: that of the nearest class in its ancestry the table names
    (a subclass such as ``MalformedRequest`` takes its parent's status)."""
    for cls in type(err).__mro__:
        status = STATUS.get(cls)
        if status is not None:
            return status
    return grpc.StatusCode.INTERNAL


def status_name(err: BrokerError) -> str:
    """The name of err's gRPC status, e.g. ``"PERMISSION_DENIED"``."""
    return status_of(err).name


async def abort(ctx: grpc.aio.ServicerContext[Any, Any], err: BrokerError) -> NoReturn:
    """End the call with err's status and its sentence (``ServicerContext.abort`` raises)."""
    await ctx.abort(status_of(err), err.message)
