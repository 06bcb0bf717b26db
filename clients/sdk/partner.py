"""``PartnerClient``: a partner's connection to the broker.

It verifies the directory, chooses recipients, seals, publishes, subscribes and opens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import grpc
from cryptography import x509

from clients.sdk.channel import secure_channel
from clients.sdk.errors import ClientError, NoRecipients, call
from clients.sdk.opening import OPEN_ERRORS, Opened, Opener, is_unknown_sender
from clients.sdk.publish import _PublishStream
from clients.sdk.sealing import BatchSealer, Draft, Sealed
from clients.sdk.sequences import Sequencer, SequenceSource
from clients.sdk.subscription import ExpiredHandler, SubscribeStream
from coalition import envelope as env
from coalition.clock import wall_clock_ms
from coalition.directory import Directory, Peer
from coalition.federation import TrustFile
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
# Recipients answers remembered (per label and topic) to see a recipient set change.
_ELIGIBLE_REMEMBERED = 1024


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


class PartnerClient:
    """A partner's connection to the broker."""

    def __init__(
        self,
        creds: PartnerCredentials,
        target: str,
        *,
        sequencer: SequenceSource | None = None,
        clock: Callable[[], int] = wall_clock_ms,
        trust: TrustFile | None = None,
    ) -> None:
        self.creds = creds
        # Federation: the CAs of peer nations, for senders and recipients served by
        # other nations' brokers (coalition.federation; docs/federation.md).
        self.trust = trust
        self.code = creds.code
        self.target = target
        self.clock = clock
        self.sequencer: SequenceSource = sequencer or Sequencer()
        self.ca_cert = x509.load_pem_x509_certificate(creds.ca_pem)
        self.channel = secure_channel(target, creds.ca_pem, creds.tls_cert_pem, creds.tls_key_pem)
        self.stub: ExchangeAsyncStub = exchange_pb2_grpc.ExchangeStub(self.channel)
        self._directory: Directory | None = None
        self._pub: _PublishStream | None = None
        # v2 when the credentials carry a hybrid signing key (the CA certified its
        # ML-DSA-65 half in the signing certificate); v1 otherwise.
        hybrid = creds.hybrid_signing_key
        self.sealer: BatchSealer | None = (
            None
            if hybrid is None
            else BatchSealer(
                self.code, hybrid, creds.signing_key_id, lambda: self.sequencer, self.clock
            )
        )
        self.opener = Opener(self.code, creds.hpke_keys)
        # The last Recipients answer per (label, topic), to roll epochs when it changes.
        self._eligible: OrderedDict[tuple[bytes, str], frozenset[str]] = OrderedDict()

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
            fresh = Directory.verify(resp.entries, self.ca_cert, self.clock(), self.trust)
            if self._directory is not None:
                self._roll_changed(self._directory, fresh)
            self._directory = fresh
        return self._directory

    def _roll_changed(self, old: Directory, new: Directory) -> None:
        """Roll the epoch of each partner whose directory entry changed, came or went."""
        if self.sealer is None:
            return
        for code in set(old.peers) | set(new.peers) | set(old.problems) | set(new.problems):
            if _entry(old, code) != _entry(new, code):
                self.sealer.roll(code)

    async def recipients(self, label: Label, topic: str) -> list[str]:
        """Partners the broker reports eligible for this label and topic now."""
        wire = label_to_proto(label)
        resp = await call(
            self.stub.Recipients(exchange_pb2.RecipientsRequest(label=wire, topic=topic))
        )
        partners = list(resp.partners)
        self._eligible_now((wire.SerializeToString(deterministic=True), topic), partners)
        return partners

    def _eligible_now(self, slot: tuple[bytes, str], partners: Sequence[str]) -> None:
        """Roll the epochs of partners who joined or left this label's recipients."""
        now = frozenset(partners)
        before = self._eligible.get(slot)
        self._eligible[slot] = now
        self._eligible.move_to_end(slot)
        while len(self._eligible) > _ELIGIBLE_REMEMBERED:
            self._eligible.popitem(last=False)
        if before is not None and self.sealer is not None:
            for code in before ^ now:
                self.sealer.roll(code)

    def roll_epochs(self, partner: str | None = None) -> None:
        """Open new epoch keys for one partner, or all, from the next message on (v2)."""
        if self.sealer is not None:
            self.sealer.roll(partner)

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

        v2 when this client has a hybrid signing key: seals made concurrently are signed
        together as one batch (``BatchSealer``). Raises NoRecipients when nobody may
        receive it.
        """
        [sealed] = await self.seal_many(
            [payload],
            topic=topic,
            label=label,
            precedence=precedence,
            content_type=content_type,
            recipients=recipients,
        )
        return sealed

    async def seal_many(
        self,
        payloads: Sequence[bytes],
        *,
        topic: str,
        label: Label,
        precedence: Precedence = Precedence.ROUTINE,
        content_type: str = env.INTEL_SUMMARY,
        recipients: Sequence[str] | None = None,
    ) -> list[Sealed]:
        """Seal several payloads with one label, topic and recipient set, in order.

        v2: one batch (up to its limits), one signature. Publish them in this order.
        Raises NoRecipients when nobody may receive them.
        """
        chosen, dropped = await self._choose(label, topic, recipients)
        wire = label_to_proto(label)
        if self.sealer is not None:
            drafts = [
                Draft(p, topic, wire, int(precedence), content_type, chosen) for p in payloads
            ]
            return [
                dataclasses.replace(s, not_sealed_for=dropped)
                for s in await self.sealer.seal(drafts)
            ]
        out = []
        for payload in payloads:
            alloc = self.sequencer.allocate([r.partner for r in chosen])
            mine = [
                dataclasses.replace(r, sequence=alloc.per_recipient.get(r.partner, 0))
                for r in chosen
            ]
            message_id = os.urandom(16).hex()
            envelope = env.seal(
                plaintext=payload,
                message_id=message_id,
                sender=self.code,
                signing_key=self.creds.signing_key,
                signing_key_id=self.creds.signing_key_id,
                sequence=alloc.sequence,
                topic=topic,
                label=wire,
                precedence=int(precedence),
                content_type=content_type,
                recipients=mine,
                created_ms=self.clock(),
            )
            out.append(
                Sealed(
                    envelope,
                    message_id,
                    tuple(r.partner for r in mine),
                    alloc.sequence,
                    alloc,
                    dropped,
                )
            )
        return out

    async def _choose(
        self, label: Label, topic: str, recipients: Sequence[str] | None
    ) -> tuple[list[env.Recipient], dict[str, str]]:
        """The recipients to wrap for, each checked against the signed directory, and
        the partners named in REL TO that get no key, with why. Raises NoRecipients."""
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
        return chosen, dropped

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

    async def open(self, delivery: exchange_pb2.Delivery) -> Opened:
        """Verify and decrypt a delivery, v1 or v2 (``clients.sdk.opening``).

        Raises env.InvalidEnvelope (v1) or envelope_v2.InvalidEnvelopeV2 (v2).
        """
        directory = await self.directory()
        try:
            return self.opener.open(delivery.envelope, directory)
        except OPEN_ERRORS as exc:
            if not is_unknown_sender(exc):
                raise
        # A sender (or signing key) newer than our copy of the directory: fetch it again.
        directory = await self.directory(refresh=True)
        return self.opener.open(delivery.envelope, directory)


def _entry(d: Directory, code: str) -> tuple[object, ...]:
    """What of a directory entry an epoch depends on (keys, standing, a problem)."""
    peer: Peer | None = d.peers.get(code)
    if peer is None:
        return (None, d.problems.get(code))
    return (
        peer.signing_key_id,
        peer.key_id,
        None if peer.hpke_public is None else peer.hpke_public.raw,
        None if peer.hybrid_public is None else peer.hybrid_public.raw,
        peer.status,
        peer.groups,
    )
