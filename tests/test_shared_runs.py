"""Shared byte runs in delivery batches: the broker finds each v2 envelope's shareable runs
(its epoch keys' encapsulations, its batch root with the hybrid signature) by walking tags,
sends each once per batch, and the SDK rebuilds every envelope byte for byte, or refuses
the whole batch when a broker's table or references are out of bounds."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from broker.exchange import DeliveryBatch
from broker.exchange.headers import routing_header
from broker.grpc.deliveries import SharedRuns, _varint, delivery_batch_bytes
from clients.sdk.errors import ClientError
from clients.sdk.subscription import rebuilt
from coalition import envelope as env
from coalition import envelope_v2, shared_runs
from coalition.epoch import SenderEpochs
from coalition.labels import label_to_proto, parse_label
from coalition.pki import load_partner
from coalition.shared_runs import MAX_REFS, MAX_TABLE, Rebuilder, SharedRunsError
from coalition.v1 import envelope_pb2, exchange_pb2
from tests.test_delivery_encoding import _stored
from tests.v2_batches import hybrid_signer, opened

LABEL = label_to_proto(parse_label("NATO SECRET // REL TO KOR, USA, GBR, UKR"))


def _batch(pki: Path, n: int, epochs: SenderEpochs | None = None) -> list[bytes]:
    """n v2 envelopes of KOR in one batch, each for USA, GBR and UKR (one epoch each)."""
    kor = load_partner(pki / "partners" / "KOR")
    assert kor.hybrid_signing_key is not None
    to = []
    for code in ("USA", "GBR", "UKR"):
        p = load_partner(pki / "partners" / code)
        to.append(env.Recipient(code, p.current_key_id, p.hpke_keys[p.current_key_id].public_key()))
    msgs = [
        envelope_v2.Message(
            os.urandom(100 + 300 * i), "intel.a", LABEL, 1, env.INTEL_SUMMARY, to, i + 1, 1
        )
        for i in range(n)
    ]
    return [
        e.SerializeToString()
        for e in envelope_v2.seal_batch(
            msgs,
            sender="KOR",
            signing_key=kor.hybrid_signing_key,
            signing_key_id=kor.signing_key_id,
            epochs=epochs or SenderEpochs("KOR"),
            created_ms=1,
        )
    ]


def _v1(pki: Path) -> bytes:
    kor = load_partner(pki / "partners" / "KOR")
    usa = load_partner(pki / "partners" / "USA")
    to = [env.Recipient("USA", usa.current_key_id, usa.hpke_keys[usa.current_key_id].public_key())]
    return env.seal(
        plaintext=b"v1 body",
        sender="KOR",
        signing_key=kor.signing_key,
        signing_key_id=kor.signing_key_id,
        sequence=1,
        topic="intel.a",
        label=LABEL,
        precedence=1,
        content_type=env.INTEL_SUMMARY,
        recipients=to,
        created_ms=1,
    ).SerializeToString()


def _item(raws: list[bytes], first: int = 1) -> DeliveryBatch:
    messages = [_stored(first + i, r) for i, r in enumerate(raws)]
    return DeliveryBatch(
        messages, [routing_header(envelope_pb2.Envelope.FromString(r)) for r in raws]
    )


def test_runs_name_each_encapsulation_and_the_signed_root(pki: Path) -> None:
    for raw in _batch(pki, 3):
        e = envelope_pb2.Envelope.FromString(raw)
        h = envelope_pb2.HeaderV2.FromString(e.header_v2)
        found = shared_runs.runs(raw)
        pairs = list(zip(found[::2], found[1::2], strict=True))
        assert [raw[s:t] for s, t in pairs[:-1]] == [k.encapsulation for k in h.epoch_keys]
        s, t = pairs[-1]
        assert t == len(raw)
        proof = envelope_pb2.BatchProof()
        proof.ParseFromString(raw[s:t])  # the root and its signature fields, nothing else
        assert proof.root == e.batch.root
        assert proof.root_signature == e.batch.root_signature
        assert not proof.path and not proof.leaf_salt


def test_runs_of_anything_but_a_v2_envelope_are_empty(pki: Path) -> None:
    raw = _batch(pki, 1)[0]
    assert shared_runs.runs(_v1(pki)) == ()
    assert shared_runs.runs(b"") == ()
    for cut in (1, 17, len(raw) // 2, len(raw) - 1):
        assert shared_runs.runs(raw[:cut]) == ()  # truncated: the walk runs out
    assert shared_runs.runs(b"\x2a\xff\xff\xff\xff\x0f" + raw) == ()  # a length past the end
    for _ in range(200):  # whatever the bytes, positions are in order and in range
        junk = os.urandom(64) + raw[64:]
        got = shared_runs.runs(junk)
        assert list(got) == sorted(got) and all(0 <= p <= len(junk) for p in got)


def test_a_shared_batch_rebuilds_each_stored_envelope_byte_for_byte(pki: Path) -> None:
    raws = _batch(pki, 16)
    raws.insert(5, _v1(pki))  # v1 has no runs: it travels whole in the same batch
    item = _item(raws)
    runs = SharedRuns()

    plain = exchange_pb2.SubscribeResponse.FromString(delivery_batch_bytes(item))
    wire = delivery_batch_bytes(item, runs)
    shared = exchange_pb2.SubscribeResponse.FromString(wire)

    # Each run once: 3 encapsulations and one signed root for the 16 v2 envelopes.
    assert len(shared.batch.shared) == 4
    assert runs.walked == len(raws)
    assert len(wire) < len(plain.SerializeToString()) * 0.45
    assert not shared.batch.deliveries[5].envelope_cut  # the v1 envelope, whole
    table = shared.batch.shared
    rebuilder = Rebuilder(table, 1 << 30)
    for d, raw in zip(shared.batch.deliveries, raws, strict=True):
        if d.envelope_cut:
            assert not d.HasField("envelope")
            assert rebuilder.rebuild(d.envelope_cut, d.shared_refs) == raw
    assert list(rebuilt(shared.batch)) == list(plain.batch.deliveries)
    assert [d.envelope.SerializeToString() for d in shared.batch.deliveries] == raws

    # Another subscriber's batch of the same messages: no walk again.
    delivery_batch_bytes(item, runs)
    assert runs.walked == len(raws)


def test_one_delivery_and_old_subscribers_get_whole_envelopes(pki: Path) -> None:
    raws = _batch(pki, 2)
    one = _item(raws[:1])
    assert delivery_batch_bytes(one, SharedRuns()) == delivery_batch_bytes(one)
    two = exchange_pb2.SubscribeResponse.FromString(delivery_batch_bytes(_item(raws)))
    assert not two.batch.shared
    assert rebuilt(two.batch) is two.batch.deliveries  # nothing to rebuild


def test_an_epochs_encapsulations_are_shared_across_publish_batches(pki: Path) -> None:
    epochs = SenderEpochs("KOR")
    raws = _batch(pki, 2, epochs) + _batch(pki, 2, epochs)
    shared = exchange_pb2.SubscribeResponse.FromString(
        delivery_batch_bytes(_item(raws), SharedRuns())
    )
    # Two roots, one set of three encapsulations.
    assert len(shared.batch.shared) == 5


# -- a broker that lies ------------------------------------------------------------------------


def _hostile(pki: Path) -> exchange_pb2.DeliveryBatch:
    raws = _batch(pki, 3)
    return exchange_pb2.SubscribeResponse.FromString(
        delivery_batch_bytes(_item(raws), SharedRuns())
    ).batch


def _refused(batch: exchange_pb2.DeliveryBatch, why: str) -> None:
    with pytest.raises(ClientError) as info:
        rebuilt(batch)
    assert info.value.status == grpc.StatusCode.INTERNAL
    assert "do not rebuild" in info.value.message and why in info.value.message


def test_references_outside_the_table_or_out_of_order_are_refused(pki: Path) -> None:
    b = _hostile(pki)
    b.deliveries[2].shared_refs[1] = len(b.shared)
    _refused(b, "names run")

    b = _hostile(pki)
    refs = b.deliveries[1].shared_refs
    refs[2] = refs[0]  # the second run where the first one goes
    _refused(b, "out of order")

    b = _hostile(pki)
    b.deliveries[1].shared_refs[2] = b.deliveries[1].shared_refs[0] + 1  # overlaps the run
    _refused(b, "out of order")

    b = _hostile(pki)
    b.deliveries[0].shared_refs[-2] = len(b.deliveries[0].envelope_cut) + 10**6
    _refused(b, "past the end")

    b = _hostile(pki)
    b.deliveries[0].shared_refs.append(0)
    _refused(b, "pairs")


def test_a_table_or_references_over_their_bounds_are_refused(pki: Path) -> None:
    b = _hostile(pki)
    b.shared.extend([b"x"] * (MAX_TABLE + 1 - len(b.shared)))
    _refused(b, "table holds")

    b = _hostile(pki)
    b.deliveries[0].shared_refs.extend([len(b.deliveries[0].envelope_cut) + 1, 0] * MAX_REFS)
    _refused(b, "references")


def test_one_run_referenced_many_times_cannot_amplify_memory(pki: Path) -> None:
    # A 1 MiB run referenced 40 times in each of two deliveries (each a valid envelope:
    # a 40 MiB ciphertext), 80 MiB in all, over what one response may carry (64 MiB):
    # the second is refused before it is joined.
    head = b"\x12" + _varint(40 << 20)
    b = exchange_pb2.DeliveryBatch(shared=[bytes(1 << 20)])
    for offset in (1, 2):
        b.deliveries.add(
            offset=offset,
            envelope_cut=head,
            shared_refs=[v for i in range(40) for v in (len(head) + i * (1 << 20), 0)],
        )
    _refused(b, "more than")
    with pytest.raises(SharedRunsError):
        Rebuilder([b"ab"], 9).rebuild(b"", [0, 0, 2, 0, 4, 0, 6, 0, 8, 0])


def test_a_delivery_with_both_forms_or_bytes_that_are_no_envelope_is_refused(pki: Path) -> None:
    b = _hostile(pki)
    b.deliveries[1].envelope.ciphertext = b"both"
    _refused(b, "both")

    b = _hostile(pki)
    b.shared[-1] = b"\xff" * len(b.shared[-1])  # the signed root: rebuilds, does not parse
    _refused(b, "Envelope")


def test_a_table_that_lies_yields_envelopes_that_do_not_verify(pki: Path) -> None:
    kor, usa = (load_partner(pki / "partners" / c) for c in ("KOR", "USA"))
    signer = hybrid_signer(kor)
    honest = rebuilt(_hostile(pki))
    assert opened(honest[0].envelope, usa, kor).plaintext
    # Another encapsulation or another signed root in the table: each envelope rebuilds
    # and parses, and fails verification (the leaf, or the root signature, no longer
    # matches) before anything is decrypted.
    b = _hostile(pki)
    b.shared[0] = bytes(x ^ 1 for x in b.shared[0])
    b.shared[-1] = _hostile(pki).shared[-1]
    for d in rebuilt(b):
        with pytest.raises(envelope_v2.InvalidEnvelopeV2):
            envelope_v2.verify(d.envelope, signer)


def test_nothing_of_a_bad_batch_is_returned(pki: Path) -> None:
    b = _hostile(pki)
    b.deliveries[2].shared_refs[1] = 99  # the first two deliveries alone would rebuild
    before = [d.SerializeToString() for d in b.deliveries]
    with pytest.raises(ClientError):
        rebuilt(b)
    # The caller gets an error, never a delivery; the batch's messages are delivered
    # again on the next subscription, as nothing was acknowledged.
    assert len(before) == 3
