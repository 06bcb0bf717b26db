"""Domain errors of the broker: a machine-readable code and a sentence a person
understands. No gRPC here: ``broker.grpc.status`` maps each class to its status code.
"""

from __future__ import annotations


class BrokerError(Exception):
    """A refusal with a machine-readable code and a sentence a person understands."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidInput(BrokerError):
    """The request itself is wrong (malformed, oversized, out of window)."""


class NotAuthenticated(BrokerError):
    """The caller or the signature could not be authenticated."""


class Forbidden(BrokerError):
    """The caller is known but policy does not allow this."""


class NotFound(BrokerError):
    """What the request names does not exist (a partner, a proposal)."""


class AlreadyExists(BrokerError):
    """A replay, or a second registration of the same thing."""


class Precondition(BrokerError):
    """The system is not in the state the request needs (stale version, sequence order)."""


class Exhausted(BrokerError):
    """A limit was reached: store full, rate limit."""


class Unavailable(BrokerError):
    """The broker is shutting down."""


class MalformedRequest(InvalidInput):
    """A request, or the ``ordinal``-th request of a stream, that does not parse."""

    def __init__(self, message_name: str, ordinal: int, exc: BaseException) -> None:
        where = f"request {ordinal} of the stream" if ordinal else "request"
        super().__init__(
            "malformed_request", f"{where} is not a valid {message_name}: {exc or type(exc)}"
        )
        self.ordinal = ordinal
