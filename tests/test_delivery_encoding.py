"""A delivery batch serialized by hand around the stored envelopes is byte for byte the
SubscribeResponse the message would serialize to, for v1 and v2 envelopes, and parses
back to the same deliveries (offsets, envelopes, labels, topics, precedences)."""

from __future__ import annotations

import os
from pathlib import Path

from broker.exchange import DeliveryBatch
from broker.exchange.headers import routing_header
from broker.grpc.deliveries import delivery_batch_bytes
from broker.store import StoredMessage
from coalition import envelope as env
from coalition import envelope_v2
from coalition.epoch import SenderEpochs
from coalition.labels import label_to_proto, parse_label
from coalition.pki import load_partner
from coalition.v1 import envelope_pb2, exchange_pb2

LABEL = parse_label("NATO SECRET // REL TO KOR, USA")


def _as_message(item: DeliveryBatch) -> exchange_pb2.SubscribeResponse:
    """The response built as a message, as the Subscribe servicer built it before."""
    resp = exchange_pb2.SubscribeResponse()
    for m, h in zip(item.messages, item.headers, strict=True):
        d = resp.batch.deliveries.add(offset=m.offset, topic=h.topic, precedence=h.precedence)
        d.envelope.MergeFromString(m.envelope)
        d.label.CopyFrom(h.label)
    return resp


def _stored(offset: int, raw: bytes) -> StoredMessage:
    h = routing_header(envelope_pb2.Envelope.FromString(raw))
    return StoredMessage(
        offset=offset,
        stored_ms=1,
        message_id=h.message_id,
        sender=h.sender,
        sequence=h.sequence,
        topic=h.topic,
        precedence=int(h.precedence),
        classification=int(h.label.classification),
        label=h.label.SerializeToString(),
        created_ms=h.created_ms,
        expiry_ms=0,
        envelope=raw,
        digest=os.urandom(32),
    )


def _sealed(pki: Path) -> tuple[list[bytes], list[bytes]]:
    """Five v1 and five v2 envelopes of KOR for USA: sizes, topics and precedences vary."""
    kor = load_partner(pki / "partners" / "KOR")
    usa = load_partner(pki / "partners" / "USA")
    assert kor.hybrid_signing_key is not None
    to = [env.Recipient("USA", usa.current_key_id, usa.hpke_keys[usa.current_key_id].public_key())]
    label = label_to_proto(LABEL)
    shapes = [
        (os.urandom(1 + 700 * i), "intel.ground" if i % 2 else "t", [1, 4][i % 2], i + 1)
        for i in range(5)
    ]
    v1 = [
        env.seal(
            plaintext=body,
            sender="KOR",
            signing_key=kor.signing_key,
            signing_key_id=kor.signing_key_id,
            sequence=seq,
            topic=topic,
            label=label,
            precedence=precedence,
            content_type=env.INTEL_SUMMARY,
            recipients=to,
            created_ms=1,
        ).SerializeToString()
        for body, topic, precedence, seq in shapes
    ]
    v2 = [
        e.SerializeToString()
        for e in envelope_v2.seal_batch(
            [
                envelope_v2.Message(body, topic, label, precedence, env.INTEL_SUMMARY, to, seq, 1)
                for body, topic, precedence, seq in shapes
            ],
            sender="KOR",
            signing_key=kor.hybrid_signing_key,
            signing_key_id=kor.signing_key_id,
            epochs=SenderEpochs("KOR"),
            created_ms=1,
        )
    ]
    return v1, v2


def test_hand_serialized_batches_equal_the_messages(pki: Path) -> None:
    batches = _sealed(pki)
    offsets = [1, 127, 128, 300, 2**40]
    for raws in [*batches, batches[0][:1], batches[1][:1] + batches[0][:2]]:
        messages = [_stored(o, r) for o, r in zip(offsets, raws, strict=False)]
        headers = [routing_header(envelope_pb2.Envelope.FromString(m.envelope)) for m in messages]
        item = DeliveryBatch(messages, headers)

        wire = delivery_batch_bytes(item)

        assert wire == _as_message(item).SerializeToString()
        parsed = exchange_pb2.SubscribeResponse.FromString(wire)
        assert [d.offset for d in parsed.batch.deliveries] == offsets[: len(raws)]
        assert [d.envelope.SerializeToString() for d in parsed.batch.deliveries] == raws
        assert [d.topic for d in parsed.batch.deliveries] == [h.topic for h in headers]
        assert [d.label for d in parsed.batch.deliveries] == [h.label for h in headers]
        assert [d.precedence for d in parsed.batch.deliveries] == [h.precedence for h in headers]


def test_varints_equal_protobufs_at_every_width() -> None:
    from broker.grpc.deliveries import _varint

    assert _varint(0) == b"\x00"
    edges = [1, 127, 128, 255, 300, 16383, 16384, 2**21 - 1, 2**21, 2**40, 2**64 - 1]
    for n in edges:
        assert b"\x08" + _varint(n) == exchange_pb2.Delivery(offset=n).SerializeToString()
    # A negative enum value: ten bytes, its 64-bit two's complement.
    assert b"\x28" + _varint(-1) == exchange_pb2.Delivery(precedence=-1).SerializeToString()  # type: ignore[arg-type]
