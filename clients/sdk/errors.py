"""Errors at the SDK's edge: gRPC failures mapped to ``ClientError``; TLS failures in a sentence."""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import TypeVar

import grpc

from coalition.clock import wall_clock_ms

T = TypeVar("T")


class ClientError(Exception):
    """A call to the broker failed; ``status`` is the gRPC status, ``message`` says why."""

    def __init__(self, status: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status
        self.message = message


class NoRecipients(ClientError):
    """No partner is eligible for this label and topic right now; ``not_sealed_for`` says,
    for each partner named in REL TO, why it got no key (see PartnerClient.seal)."""

    def __init__(self, message: str, not_sealed_for: Mapping[str, str] | None = None) -> None:
        super().__init__(grpc.StatusCode.FAILED_PRECONDITION, message)
        self.not_sealed_for = dict(not_sealed_for or {})


class TlsReason(enum.StrEnum):
    """Why the broker's certificate failed this client's verification."""

    OTHER_CA = "other_ca"  # not signed by this coalition's CA: another PKI
    NOT_YET_VALID = "not_yet_valid"  # by this computer's clock (which may be behind)
    EXPIRED = "expired"  # by this computer's clock (which may be ahead)
    NAME_MISMATCH = "name_mismatch"  # does not name the address connected to
    UNVERIFIED = "unverified"  # failed verification for a reason gRPC does not name

    @property
    def clock(self) -> bool:
        """The certificate fails only for the time: this computer's clock may be wrong."""
        return self in (TlsReason.NOT_YET_VALID, TlsReason.EXPIRED)


class BrokerTlsError(ClientError):
    """The TLS handshake with the broker failed verification: ``reason`` says why.

    Retrying does not help until the PKI, the address or the clock is put right.
    ``str()`` is the one sentence for a person (no status name, no gRPC detail)."""

    def __init__(self, message: str, reason: TlsReason = TlsReason.UNVERIFIED) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)
        self.args = (message,)
        self.reason = reason

    def __str__(self) -> str:
        return self.message


# gRPC Core's words for a failed handshake (OpenSSL/BoringSSL reasons), the reason and
# the sentence; "{now}" is this computer's clock.
_TLS_FAILURES = (
    (
        ("unable to get local issuer certificate", "self signed certificate", "self-signed"),
        TlsReason.OTHER_CA,
        "the broker's certificate is not signed by this coalition's CA (pki/ca.crt); this "
        "identity and the broker come from different PKIs: use the ca.crt the broker's "
        "certificate was issued by, or re-issue the broker from this CA",
    ),
    (
        ("certificate is not yet valid",),
        TlsReason.NOT_YET_VALID,
        "the broker's certificate is not yet valid by this computer's clock ({now}): this "
        "clock is probably behind (check the date and NTP), or the certificate was issued "
        "for a later date",
    ),
    (
        ("certificate has expired",),
        TlsReason.EXPIRED,
        "the broker's certificate has expired by this computer's clock ({now}): renew it "
        "('coalition-keys issue-broker --force'), or check this clock if it is ahead",
    ),
    (
        ("hostname verification check failed",),
        TlsReason.NAME_MISMATCH,
        "the broker's certificate does not name the address this client connects to "
        "(name mismatch): connect by a name it holds, or re-issue it with "
        "'coalition-keys issue-broker --host NAME --ip ADDR'",
    ),
    (
        ("certificate_verify_failed", "certificate verify failed"),
        TlsReason.UNVERIFIED,
        "the broker's certificate failed verification against this coalition's CA (pki/ca.crt)",
    ),
)


def tls_failure(details: str, now_ms: int | None = None) -> tuple[TlsReason, str] | None:
    """The reason and sentence for a gRPC UNAVAILABLE detail that is a failed TLS
    verification, or None; a clock sentence names ``now_ms`` (default: the wall clock)."""
    low = details.lower()
    for needles, reason, sentence in _TLS_FAILURES:
        if any(n in low for n in needles):
            if reason.clock:
                now = wall_clock_ms() if now_ms is None else now_ms
                when = dt.datetime.fromtimestamp(now / 1000, dt.UTC)
                sentence = sentence.format(now=f"it reads {when:%Y-%m-%dT%H:%M:%SZ}")
            return reason, sentence
    return None


# What grpcio's asyncio client reports when writing a request fails inside gRPC Core.
_CORE_WRITE_FAILED = "Internal error from Core"


def client_error(exc: grpc.aio.AioRpcError) -> ClientError:
    """The ClientError for a failed call (the one place that translates gRPC errors).

    grpcio's asyncio client turns a request write that loses the race with the broker
    ending the stream (shutting down, or a clean end) into INTERNAL "Internal error
    from Core", hiding the status the broker sent (grpc/grpc#36066). That is the stream
    going away, not a broker fault, so it is reported as UNAVAILABLE, which callers
    retry (a retried envelope that was in fact accepted is refused as a replay).
    """
    if (
        exc.code() == grpc.StatusCode.INTERNAL
        and exc.details() == _CORE_WRITE_FAILED
        and "SendMessageOperation" in (exc.debug_error_string() or "")
    ):
        return ClientError(
            grpc.StatusCode.UNAVAILABLE,
            "the broker ended the stream while a request was on its way; retry",
        )
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        failure = tls_failure(exc.details() or "")
        if failure is not None:
            return BrokerTlsError(failure[1], failure[0])
    return ClientError(exc.code(), exc.details() or exc.code().name)


@contextlib.asynccontextmanager
async def mapped_errors() -> AsyncIterator[None]:
    """Translate gRPC errors into ClientError (see client_error)."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise client_error(exc) from None


async def call(aw: Awaitable[T]) -> T:
    async with mapped_errors():
        return await aw
