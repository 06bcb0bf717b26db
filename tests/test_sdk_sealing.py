"""The SDK's v2 sealing without a network: concurrent seals merged into one signed batch,
sequences in batch order, epoch rolls before the next batch, numbers given back."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from clients.sdk import BatchSealer, Draft, Sealed, Sequencer
from coalition import envelope as env
from coalition import envelope_v2
from coalition.epoch import RecipientEpochs
from coalition.hpke import HpkePrivateKey
from coalition.hybrid import HybridPublicKey, HybridSigningKey
from coalition.labels import label_to_proto, parse_label
from coalition.v1 import envelope_pb2
from tests.helpers import now_ms

LABEL = label_to_proto(parse_label("NATO SECRET // REL TO KOR, USA, GBR"))
KEY = HybridSigningKey.generate()
USA_KEY = HpkePrivateKey.generate()
GBR_KEY = HpkePrivateKey.generate()
USA = env.Recipient("USA", "u1", USA_KEY.public_key())
GBR = env.Recipient("GBR", "g1", GBR_KEY.public_key())


def signer(sender: str, key_id: str) -> HybridPublicKey:
    if (sender, key_id) != ("KOR", "kid"):
        raise KeyError(sender)
    return KEY.public_key()


def sealer(seq: Sequencer) -> BatchSealer:
    return BatchSealer("KOR", KEY, "kid", lambda: seq, now_ms)


def draft(i: int = 0, *, to: tuple[env.Recipient, ...] = (USA, GBR), prec: int = 1) -> Draft:
    return Draft(b"report %d" % i, "intel.ground", LABEL, prec, env.INTEL_SUMMARY, to)


def root_of(s: Sealed) -> envelope_pb2.BatchRoot:
    return envelope_pb2.BatchRoot.FromString(s.envelope.batch.root)


async def test_a_lone_seal_goes_at_once_and_verifies() -> None:
    s = sealer(Sequencer(per_recipient=True))
    [one] = await s.seal([draft()])
    assert s.batches == 1 and root_of(one).tree_size == 1
    assert envelope_v2.is_v2(one.envelope)
    v = envelope_v2.verify(one.envelope, signer)
    assert v.header.message_id == one.message_id and v.header.sequence == one.sequence
    assert one.recipients == ("USA", "GBR")
    assert [k.sequence for k in v.header_v2.epoch_keys] == [1, 1]


class HeldKey(HybridSigningKey):
    """KEY, whose first signature waits until the test lets it go (a slow signature)."""

    def __init__(self) -> None:
        super().__init__(KEY.ed25519, KEY.ml_dsa)
        self.signing = threading.Event()
        self.go = threading.Event()

    def sign(self, payload_type: str, body: bytes) -> envelope_pb2.HybridSignature:
        self.signing.set()
        self.go.wait(10)  # bounded: a sealer that signs on the event loop fails, not hangs
        return super().sign(payload_type, body)


async def test_seals_arriving_while_a_batch_is_signed_go_together_in_call_order() -> None:
    """While the first seal is being signed (off the event loop), the others arrive,
    wait, and go as ONE batch: two signatures for 40 messages, sequences in call order."""
    key = HeldKey()
    seq = Sequencer(per_recipient=True)
    s = BatchSealer("KOR", key, "kid", lambda: seq, now_ms)
    first = asyncio.create_task(s.seal([draft(0)]))
    assert await asyncio.to_thread(key.signing.wait, 10)
    rest = [asyncio.create_task(s.seal([draft(i)])) for i in range(1, 40)]
    await asyncio.sleep(0.01)
    assert not first.done() and s.batches == 0
    key.go.set()
    out = [await first, *[await t for t in rest]]
    sealed = [x for [x] in out]
    assert s.batches == 2
    assert [root_of(x).tree_size for x in sealed] == [1] + [39] * 39
    assert len({x.envelope.batch.root for x in sealed[1:]}) == 1
    seqs = [x.sequence for x in sealed]
    assert seqs == sorted(seqs) and len(set(seqs)) == 40
    assert [x.allocation.per_recipient["USA"] for x in sealed] == list(range(1, 41))
    roots = envelope_v2.RootCache()
    usa = RecipientEpochs("USA", {"u1": USA_KEY})
    for i, x in enumerate(sealed):
        o = envelope_v2.open(x.envelope, epochs=usa, signer=signer, roots=roots)
        assert o.plaintext == b"report %d" % i and o.sequence == i + 1
    # One root check per batch, one decapsulation per epoch.
    assert roots.verifications == 2 and usa.decapsulations == 1


async def test_seals_made_together_are_one_batch() -> None:
    s = sealer(Sequencer())
    await asyncio.gather(*(s.seal([draft(i)]) for i in range(16)))
    assert s.batches == 1


async def test_a_batch_is_bounded_by_the_publish_merge_limit() -> None:
    s = sealer(Sequencer())
    sealed = await s.seal([draft(i, to=(USA,)) for i in range(300)])
    sizes = [root_of(x).tree_size for x in sealed]
    assert max(sizes) <= 256 and sum(1 for _ in {x.envelope.batch.root for x in sealed}) == 2


async def test_a_roll_opens_new_epochs_before_the_next_batch() -> None:
    s = sealer(Sequencer())
    [a] = await s.seal([draft()])
    [b] = await s.seal([draft()])
    s.roll("USA")
    [c] = await s.seal([draft()])
    s.roll()
    [d] = await s.seal([draft()])

    def epoch(x: Sealed, who: str) -> bytes:
        [k] = [
            k
            for k in envelope_pb2.HeaderV2.FromString(x.envelope.header_v2).epoch_keys
            if k.recipient == who
        ]
        return bytes(k.epoch_id)

    assert epoch(a, "USA") == epoch(b, "USA") != epoch(c, "USA") != epoch(d, "USA")
    assert epoch(a, "GBR") == epoch(c, "GBR") != epoch(d, "GBR")
    assert s.epochs.encapsulations == 5


async def test_one_bad_message_does_not_fail_the_others() -> None:
    seq = Sequencer(per_recipient=True)
    s = sealer(seq)
    results = await asyncio.gather(
        s.seal([draft(0)]),
        s.seal([draft(1)]),
        s.seal([draft(2, prec=99)]),  # not a precedence
        s.seal([draft(3)]),
        return_exceptions=True,
    )
    assert isinstance(results[2], ValueError)
    good = [r[0] for r in results if not isinstance(r, BaseException)]
    assert len(good) == 3
    # The refused message's numbers were given back: the recipients see no hole.
    assert sorted(g.allocation.per_recipient["USA"] for g in good) == [1, 2, 3]
    for g in good:
        envelope_v2.verify(g.envelope, signer)


async def test_a_cancelled_seal_gives_its_numbers_back(tmp_path: Path) -> None:
    seq = Sequencer(per_recipient=True)
    s = sealer(seq)
    first = asyncio.create_task(s.seal([draft(0)]))
    await asyncio.sleep(0)
    gone = asyncio.create_task(s.seal([draft(1)]))
    kept = asyncio.create_task(s.seal([draft(2)]))
    await asyncio.sleep(0)
    gone.cancel()
    await first
    [k] = await kept
    with pytest.raises(asyncio.CancelledError):
        await gone
    # The cancelled caller never held its envelope: only 0 and 2 took USA's numbers.
    [again] = await s.seal([draft(3)])
    assert sorted([k.allocation.per_recipient["USA"], again.allocation.per_recipient["USA"]]) == [
        2,
        3,
    ]
