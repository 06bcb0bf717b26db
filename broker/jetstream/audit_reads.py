"""Reading the audit stream back: every block in order, the newest entries first, and
which checkpoint signers a verification trusts."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Callable

import nats.errors
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.audit.backend import AuditError
from broker.jetstream.audit_blocks import Block
from broker.jetstream.audit_stream import AuditStream
from coalition.identity import IdentityError, IdentityKind, identity_from_cert, verify_audit_cert
from coalition.v1 import audit_pb2

log = logging.getLogger("coalition.broker.audit")


async def scan(stream: AuditStream, last: int) -> AsyncGenerator[tuple[int, Block | None], None]:
    """(stream sequence, block) for every message up to last, in order; None for a
    message that is not a block. Read through an ordered consumer; if it fails (an
    election), the rest is read one message at a time."""
    done = 0
    try:
        async with contextlib.aclosing(stream.follow(1, last)) as follow:
            async for seq, block in follow:
                if seq != done + 1:  # never skip a message, whatever the consumer does
                    break
                done = seq
                yield seq, block
    except (AuditError, nats.errors.Error) as exc:
        log.warning("audit stream read one by one from %d: %s", done + 1, exc)
    for seq in range(done + 1, last + 1):
        yield seq, await stream.read(seq)


# How many blocks a tail query reads backwards before it scans the stream instead.
NEWEST_BLOCKS = 64


def matches(e: audit_pb2.AuditEntry, partner: str, kind: str, since: int, until: int) -> bool:
    """Whether e passes a query's filters (AuditLog.query's meaning)."""
    return (
        (not partner or e.partner == partner)
        and e.kind.startswith(kind)
        and e.time_ms >= since
        and (not until or e.time_ms < until)
    )


async def newest(
    stream: AuditStream, last: int, wanted: Callable[[audit_pb2.AuditEntry], bool], limit: int
) -> list[audit_pb2.AuditEntry] | None:
    """The newest limit entries wanted accepts, in seq order, read backwards from stream
    sequence last; None if NEWEST_BLOCKS blocks did not hold that many (then scan)."""
    out: list[audit_pb2.AuditEntry] = []
    for seq in range(last, max(last - NEWEST_BLOCKS, 0), -1):
        block = await stream.read(seq)
        for e in reversed(block.entries if block is not None else ()):
            if wanted(e):
                out.append(e)
                if len(out) == limit:
                    return out[::-1]
    return out[::-1] if last <= NEWEST_BLOCKS else None


class SignerTrust:
    """Which audit certificates carried by checkpoints a verification accepts: those the
    CA issued to a broker identity, valid when the checkpoint was signed (none without a
    CA). Each certificate is judged once, at the first checkpoint that carries it."""

    def __init__(self, ca: x509.Certificate | None) -> None:
        self._ca = ca
        self._judged: dict[bytes, Ed25519PublicKey | None] = {}
        self.seen: list[bytes] = []  # every distinct signer certificate met, in order

    def meet(self, der: bytes, time_ms: int) -> Ed25519PublicKey | None:
        """The key of der if it is trusted (judged at its first meeting), else None."""
        if not der:
            return None
        if der not in self._judged:
            self.seen.append(der)
            self._judged[der] = self._certified(der, time_ms)
        return self._judged[der]

    def _certified(self, der: bytes, time_ms: int) -> Ed25519PublicKey | None:
        if self._ca is None:
            return None
        try:
            identity = identity_from_cert(x509.load_der_x509_certificate(der))
            if identity.kind is not IdentityKind.BROKER:
                return None
            return verify_audit_cert(der, self._ca, identity.name, time_ms)
        except (ValueError, IdentityError):
            return None
