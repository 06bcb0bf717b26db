"""``PartnerClient``: a partner's connection to the broker.

It verifies the directory, chooses recipients, seals, publishes, subscribes and opens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from cryptography import x509

from clients.sdk.channel import secure_channel
from clients.sdk.errors import ClientError, NoRecipients, call
from clients.sdk.publish import _PublishStream
from clients.sdk.sequences import Allocation, Sequencer, SequenceSource
from clients.sdk.subscription import ExpiredHandler, SubscribeStream
from coalition import envelope as env
from coalition.clock import wall_clock_ms
from coalition.directory import Directory
from coalition.labels import Label, Precedence, label_to_proto
from coalition.pki import PartnerCredentials
from coalition.policy import releases_to_anyone
from coalition.v1 import envelope_pb2, exchange_pb2, exchange_pb2_grpc

if TYPE_CHECKING:
    from coalition.v1.exchange_pb2_grpc import ExchangeAsyncStub


# What a sender may say about a partner named in REL TO that got no key: only what it
# legitimately has (the directory it may see, the broker's Recipients answer for a label
# it may originate), never another partner's clearance, categories or topics.
NOT_LISTED = "not a listed partner: not admitted, unknown, or a group"
NO_KEY_BUNDLE = "no key bundle"
NOT_ELIGIBLE = "not eligible now"
KEYS_UNVERIFIED = "its keys do not verify"


def _not_sealed_for(
    label: Label, me: str, eligible: Sequence[str], chosen: Sequence[str], d: Directory
) -> dict[str, str]:
    """Each partner named in REL TO (but this one) that is not among chosen, and why."""
    out: dict[str, str] = {}
    for code in label.releasable_to or ():
        if code == me or code in chosen:
            continue
        peer = d.peers.get(code)
        if code in d.problems:
            out[code] = KEYS_UNVERIFIED
        elif peer is None:
            out[code] = NOT_LISTED
        elif peer.hpke_public is None:
            out[code] = NO_KEY_BUNDLE  # none registered, or none this sender may use
        elif code not in eligible:
            out[code] = NOT_ELIGIBLE  # the broker's word: policy, suspension, topic
    return out


@dataclass(frozen=True)
class Sealed:
    envelope: envelope_pb2.Envelope
    message_id: str
    recipients: tuple[str, ...]
    sequence: int
    allocation: Allocation = field(default_factory=lambda: Allocation(0))
    # Partners named in REL TO that got no key, with why (see PartnerClient.seal).
    not_sealed_for: Mapping[str, str] = field(default_factory=dict)


class PartnerClient:
    """A partner's connection to the broker."""

    def __init__(
        self,
        creds: PartnerCredentials,
        target: str,
        *,
        sequencer: SequenceSource | None = None,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.creds = creds
        self.code = creds.code
        self.target = target
        self.clock = clock
        self.sequencer: SequenceSource = sequencer or Sequencer()
        self.ca_cert = x509.load_pem_x509_certificate(creds.ca_pem)
        self.channel = secure_channel(target, creds.ca_pem, creds.tls_cert_pem, creds.tls_key_pem)
        self.stub: ExchangeAsyncStub = exchange_pb2_grpc.ExchangeStub(self.channel)
        self._directory: Directory | None = None
        self._pub: _PublishStream | None = None

    async def __aenter__(self) -> PartnerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._pub is not None:
            await self._pub.close()
            self._pub = None
        await self.channel.close(None)

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the TLS channel is up (raises ClientError on timeout)."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except TimeoutError:
            raise ClientError(
                grpc.StatusCode.UNAVAILABLE, f"broker at {self.target} not reachable"
            ) from None

    # -- keys and directory ----------------------------------------------------------------
    async def register_keys(self) -> str:
        """Publish this node's current signed key bundle; returns its key id."""
        resp = await call(
            self.stub.RegisterKeys(exchange_pb2.RegisterKeysRequest(bundle=self.creds.bundle))
        )
        return resp.key_id

    async def directory(self, *, refresh: bool = False) -> Directory:
        """The verified directory (cached until refresh)."""
        if self._directory is None or refresh:
            resp = await call(self.stub.Directory(exchange_pb2.DirectoryRequest()))
            self._directory = Directory.verify(resp.entries, self.ca_cert, self.clock())
        return self._directory

    async def recipients(self, label: Label, topic: str) -> list[str]:
        """Partners the broker reports eligible for this label and topic now."""
        resp = await call(
            self.stub.Recipients(
                exchange_pb2.RecipientsRequest(label=label_to_proto(label), topic=topic)
            )
        )
        return list(resp.partners)

    # -- sealing and publishing --------------------------------------------------------------
    async def seal(
        self,
        payload: bytes,
        *,
        topic: str,
        label: Label,
        precedence: Precedence = Precedence.ROUTINE,
        content_type: str = env.INTEL_SUMMARY,
        recipients: Sequence[str] | None = None,
    ) -> Sealed:
        """Seal payload for the eligible recipients, each checked against the signed directory.

        Raises NoRecipients when nobody may receive it.
        """
        names = list(recipients) if recipients is not None else await self.recipients(label, topic)

        def usable(d: Directory, name: str) -> bool:
            # Releasability is the broker's word (Recipients): which groups a partner is
            # in is its standing, which the directory does not show, and a code in REL TO
            # may name a partner and a group at once. What the node checks itself is the
            # key: CA-certified signing key, bundle signed under it.
            peer = d.peers.get(name)
            return (
                releases_to_anyone(label)
                and peer is not None
                and peer.hpke_public is not None
                and name != self.code
            )

        directory = await self.directory()
        if not all(usable(directory, n) for n in names if n != self.code):
            # Keys or groups may have changed since the cached copy (policy changes,
            # key rotation): check again against a fresh directory before dropping anyone.
            directory = await self.directory(refresh=True)
        # Unknown, keyless, or not released to by the label: never wrap for it.
        chosen = [
            env.Recipient(name, peer.key_id, peer.hpke_public)
            for name in names
            if usable(directory, name) and (peer := directory.peers[name]).hpke_public is not None
        ]
        dropped = _not_sealed_for(label, self.code, names, [r.partner for r in chosen], directory)
        if not chosen:
            why = "; ".join(f"{p} ({r})" for p, r in dropped.items())
            raise NoRecipients(
                f"no eligible recipient for {label.human()} on {topic} right now"
                + (f": {why}" if why else ""),
                dropped,
            )
        alloc = self.sequencer.allocate([r.partner for r in chosen])
        seq = alloc.sequence
        chosen = [
            dataclasses.replace(r, sequence=alloc.per_recipient.get(r.partner, 0)) for r in chosen
        ]
        message_id = os.urandom(16).hex()
        envelope = env.seal(
            plaintext=payload,
            message_id=message_id,
            sender=self.code,
            signing_key=self.creds.signing_key,
            signing_key_id=self.creds.signing_key_id,
            sequence=seq,
            topic=topic,
            label=label_to_proto(label),
            precedence=int(precedence),
            content_type=content_type,
            recipients=chosen,
            created_ms=self.clock(),
        )
        return Sealed(envelope, message_id, tuple(r.partner for r in chosen), seq, alloc, dropped)

    def discard(self, sealed: Sealed) -> None:
        """Forget a sealed envelope the broker refused: its recipients' numbers are reused.

        Only for a definite refusal; after an ambiguous failure (the connection broke) the
        envelope may be stored, so its numbers must stay taken. A discarded envelope must
        not be published again (seal the payload anew): its numbers now belong to others.
        """
        self.sequencer.release(sealed.allocation)

    async def publish(
        self, envelopes: Sequence[envelope_pb2.Envelope]
    ) -> list[exchange_pb2.PublishResult]:
        """Publish envelopes in one request; one result each, once durable or refused."""
        if self._pub is None or self._pub.broken:
            self._pub = _PublishStream(self.stub)
        return await self._pub.send(envelopes)

    # -- subscribing and opening ---------------------------------------------------------------
    def subscribe(
        self,
        topics: Sequence[str],
        *,
        window: int = 256,
        on_expired: ExpiredHandler | None = None,
    ) -> SubscribeStream:
        """A Subscribe stream; on_expired receives the broker's expiry notices (see
        SubscribeStream)."""
        return SubscribeStream(self.stub, topics, window, on_expired=on_expired)

    async def open(self, delivery: exchange_pb2.Delivery) -> env.Opened:
        """Verify and decrypt a delivery. Raises env.InvalidEnvelope."""
        directory = await self.directory()
        try:
            return env.open(
                delivery.envelope,
                recipient=self.code,
                keys=self.creds.hpke_keys,
                signer=directory.signer,
            )
        except env.InvalidEnvelope as exc:
            if exc.reason is not env.Failure.UNKNOWN_SENDER:
                raise
        # A sender (or signing key) newer than our copy of the directory: fetch it again.
        directory = await self.directory(refresh=True)
        return env.open(
            delivery.envelope,
            recipient=self.code,
            keys=self.creds.hpke_keys,
            signer=directory.signer,
        )
