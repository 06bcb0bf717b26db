"""Domain errors of the broker and the one table that maps them to gRPC status codes."""

from __future__ import annotations

import grpc


class BrokerError(Exception):
    """A refusal with a machine-readable code and a sentence a person understands."""

    status = grpc.StatusCode.INTERNAL

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidInput(BrokerError):
    """The request itself is wrong (malformed, oversized, out of window)."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class NotAuthenticated(BrokerError):
    """The caller or the signature could not be authenticated."""

    status = grpc.StatusCode.UNAUTHENTICATED


class Forbidden(BrokerError):
    """The caller is known but policy does not allow this."""

    status = grpc.StatusCode.PERMISSION_DENIED


class NotFound(BrokerError):
    status = grpc.StatusCode.NOT_FOUND


class AlreadyExists(BrokerError):
    """A replay, or a second registration of the same thing."""

    status = grpc.StatusCode.ALREADY_EXISTS


class Precondition(BrokerError):
    """The system is not in the state the request needs (stale version, sequence order)."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class Exhausted(BrokerError):
    """A limit was reached: store full, rate limit."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(BrokerError):
    """The broker is shutting down."""

    status = grpc.StatusCode.UNAVAILABLE


def status_name(err: BrokerError) -> str:
    """The gRPC status code name for err, e.g. "PERMISSION_DENIED"."""
    return err.status.name
