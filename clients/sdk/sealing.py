"""Envelope v2 sealing: concurrent seals coalesced into one hybrid-signed batch.

``BatchSealer`` is what a ``PartnerClient`` with a hybrid signing key seals through.
While one batch is being sealed (off the event loop), the seals that arrive wait, and
then go together as the next batch: one ``envelope_v2.seal_batch``, one Ed25519 and one
ML-DSA-65 signature for all of them. A lone seal goes at once. A batch holds at most
``envelope_v2.MAX_BATCH`` messages and no more than one Publish request carries
(``publish.merge_count``), so a batch published at once fits one request.

Sequence numbers are allocated on the event loop, message by message in the order the
batch is built (the order the seals arrived), so publish order stays sequence order as
with v1. The sealer owns the client's ``SenderEpochs``; ``roll()`` only records the
request and the roll is made before the next batch is sealed, so an epoch is never
changed under a batch being sealed and a roll asked for before a seal applies to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from clients.sdk.publish import merge_count
from clients.sdk.sequences import Allocation, SequenceSource
from coalition import envelope as env
from coalition import envelope_v2
from coalition.epoch import EpochPolicy, SenderEpochs
from coalition.hybrid import HybridSigningKey
from coalition.v1 import envelope_pb2, label_pb2

__all__ = ["BatchSealer", "Draft", "Sealed"]

# What a v2 envelope adds to its payload, for the merge limit: the root signature and
# proof (about 3.7 KB) and an epoch key with its encapsulation per recipient.
_ENVELOPE_OVERHEAD = 4096
_PER_RECIPIENT = 1300


@dataclass(frozen=True)
class Sealed:
    envelope: envelope_pb2.Envelope
    message_id: str
    recipients: tuple[str, ...]
    sequence: int
    allocation: Allocation = field(default_factory=lambda: Allocation(0))
    # Partners named in REL TO that got no key, with why (see PartnerClient.seal).
    not_sealed_for: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Draft:
    """One message waiting for its batch: content, routing metadata, chosen recipients."""

    payload: bytes
    topic: str
    label: label_pb2.Label
    precedence: int
    content_type: str
    recipients: Sequence[env.Recipient]

    def size_hint(self) -> int:
        return len(self.payload) + _ENVELOPE_OVERHEAD + _PER_RECIPIENT * len(self.recipients)


_Waiter = tuple[Draft, "asyncio.Future[Sealed]"]


class BatchSealer:
    """Seals drafts into v2 batches, one batch at a time, merging those that wait."""

    def __init__(
        self,
        sender: str,
        signing_key: HybridSigningKey,
        signing_key_id: str,
        sequencer: Callable[[], SequenceSource],
        clock: Callable[[], int],
        policy: EpochPolicy | None = None,
    ) -> None:
        self.sender = sender
        self._signing_key = signing_key
        self._signing_key_id = signing_key_id
        self._sequencer = sequencer  # read at each batch: the client's may be replaced
        self._clock = clock
        self.epochs = SenderEpochs(sender, policy)
        self._queue: list[_Waiter] = []
        self._task: asyncio.Task[None] | None = None
        self._roll_all = False
        self._roll: set[str] = set()
        self.batches = 0  # batches sealed (each one hybrid signature)
        self.rolls = 0  # roll requests applied (all recipients, or one)

    def roll(self, recipient: str | None = None) -> None:
        """Roll one recipient's epoch, or all, before the next batch is sealed."""
        if recipient is None:
            self._roll_all = True
        else:
            self._roll.add(recipient)

    async def seal(self, drafts: Sequence[Draft]) -> list[Sealed]:
        """Seal drafts (in order, contiguous in one or more batches); one Sealed each.

        Raises ValueError for a draft the envelope refuses, or what sealing raised.
        """
        loop = asyncio.get_running_loop()
        waiters = [(d, loop.create_future()) for d in drafts]
        self._queue.extend(waiters)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return list(await asyncio.gather(*(f for _, f in waiters)))

    async def _drain(self) -> None:
        while self._queue:
            take = min(
                envelope_v2.MAX_BATCH,
                merge_count((1, d.size_hint()) for d, _ in self._queue),
            )
            batch, self._queue = self._queue[:take], self._queue[take:]
            batch = [(d, f) for d, f in batch if not f.cancelled()]
            if batch:
                await self._seal_one(batch)

    async def _seal_one(self, batch: list[_Waiter]) -> None:
        try:
            await self._seal_batch(batch)
        except ValueError:
            # One bad draft must not fail the others: seal each alone (a batch of one
            # answers its own caller with the error).
            for waiter in batch:
                await self._seal_batch([waiter])

    def _apply_rolls(self) -> None:
        if self._roll_all:
            self.epochs.roll()
            self.rolls += 1
        else:
            for r in sorted(self._roll):
                self.epochs.roll(r)
                self.rolls += 1
        self._roll_all = False
        self._roll.clear()

    async def _seal_batch(self, batch: list[_Waiter]) -> None:
        sequencer = self._sequencer()
        allocations: list[Allocation] = []
        try:
            self._apply_rolls()
            now = self._clock()
            messages = []
            for d, _ in batch:  # numbers in batch order: publish order is sequence order
                alloc = sequencer.allocate([r.partner for r in d.recipients])
                allocations.append(alloc)
                messages.append(
                    envelope_v2.Message(
                        plaintext=d.payload,
                        topic=d.topic,
                        label=d.label,
                        precedence=d.precedence,
                        content_type=d.content_type,
                        recipients=[
                            dataclasses.replace(r, sequence=alloc.per_recipient.get(r.partner, 0))
                            for r in d.recipients
                        ],
                        sequence=alloc.sequence,
                        created_ms=now,
                        message_id=os.urandom(16).hex(),
                    )
                )
            # Off the loop, so the seals arriving meanwhile queue up for the next batch.
            envelopes = await asyncio.to_thread(
                envelope_v2.seal_batch,
                messages,
                sender=self.sender,
                signing_key=self._signing_key,
                signing_key_id=self._signing_key_id,
                epochs=self.epochs,
                created_ms=now,
            )
        except BaseException as exc:
            # Nothing was sealed: every number taken for this batch is given back.
            for alloc in allocations:
                sequencer.release(alloc)
            if isinstance(exc, ValueError) and len(batch) > 1:
                raise  # _seal_one seals each alone
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError(exc))
            if not isinstance(exc, Exception):
                raise
            return
        self.batches += 1
        for (d, fut), m, e, alloc in zip(batch, messages, envelopes, allocations, strict=True):
            sealed = Sealed(
                e,
                m.message_id or "",
                tuple(r.partner for r in d.recipients),
                alloc.sequence,
                alloc,
            )
            if fut.cancelled():
                # Its caller is gone and never held the envelope, so it is never published.
                sequencer.release(alloc)
            else:
                fut.set_result(sealed)
