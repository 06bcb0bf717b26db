"""Every header field and count is bounded, and integers fit what stores them.

The attacking client is built from the proto stubs and a partner's own signing key, as a
partner that turned against the others would: its envelopes are genuinely signed, so
only the bounds stand between them and the store. Each bad envelope travels in one
request with a valid one over real gRPC and mutual TLS: the bad one is refused
``malformed`` with a message naming the field and its limit, the good one is accepted,
and both decisions are audited.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from broker.server import Broker
from clients.sdk import PartnerClient
from coalition import envelope as env
from coalition import envelope_v2
from coalition.epoch import SenderEpochs
from coalition.hpke import HpkePrivateKey
from coalition.labels import (
    MAX_CATEGORY_VALUES,
    Category,
    CategoryType,
    Label,
    LabelError,
    label_to_proto,
    parse_label,
)
from coalition.pae import HEADER_TYPE, pae
from coalition.pki import PartnerCredentials, load_partner
from coalition.v1 import envelope_pb2, exchange_pb2, exchange_pb2_grpc, label_pb2
from tests.helpers import admit, now_ms, partner, policy, running_broker

LABEL = parse_label("NATO SECRET // REL TO KOR, USA, GBR")


@pytest.fixture
async def broker(pki: Path, tmp_path: Path) -> AsyncIterator[Broker]:
    b = await running_broker(pki, tmp_path / "broker")  # max_envelope_bytes: 1 MiB default
    for code in ("KOR", "USA", "GBR"):
        await admit(pki, b.port, policy(code))
    try:
        yield b
    finally:
        await b.stop(grace=1)


@pytest.fixture
async def kor(pki: Path, broker: Broker) -> AsyncIterator[PartnerClient]:
    async with partner(pki, "KOR", broker.port) as c:
        await c.register_keys()
        async with partner(pki, "USA", broker.port) as usa:
            await usa.register_keys()
        yield c


def signed(creds: PartnerCredentials, header: envelope_pb2.Header) -> envelope_pb2.Envelope:
    """A genuinely signed envelope around header, built as any client of the proto could."""
    ciphertext = os.urandom(64)
    prefix = header.SerializeToString()
    digest = hashlib.sha256(ciphertext).digest()
    header_bytes = prefix + bytes([(9 << 3) | 2, 32]) + digest
    signature = creds.signing_key.sign(pae(HEADER_TYPE, header_bytes))
    return envelope_pb2.Envelope(header=header_bytes, ciphertext=ciphertext, signature=signature)


def base_header(creds: PartnerCredentials) -> envelope_pb2.Header:
    h = envelope_pb2.Header(
        message_id=os.urandom(16).hex(),
        sender=creds.code,
        sequence=1,
        topic="intel.ground",
        precedence=label_pb2.ROUTINE,
        created_ms=now_ms(),
        content_type=env.INTEL_SUMMARY,
        signing_key_id=creds.signing_key_id,
    )
    h.label.CopyFrom(label_to_proto(LABEL))
    h.wrapped_keys.add(recipient="USA", key_id="k1", wrapped=os.urandom(1168))
    return h


def huge_message_id(h: envelope_pb2.Header) -> None:
    h.message_id = "a" * 600_000  # 600 KB


def huge_rel_to(h: envelope_pb2.Header) -> None:
    rel = h.label.categories[0]
    rel.values.extend(f"N{i:05d}" for i in range(20_000))  # a 20,000-nation REL TO


def many_wrapped_keys(h: envelope_pb2.Header) -> None:
    for i in range(20_000):
        h.wrapped_keys.add(recipient=f"R{i:05d}", key_id="k", wrapped=b"x")


def sequence_beyond_int64(h: envelope_pb2.Header) -> None:
    h.sequence = 2**63


def recipient_sequence_beyond_int64(h: envelope_pb2.Header) -> None:
    h.wrapped_keys[0].sequence = 2**64 - 1


def long_topic(h: envelope_pb2.Header) -> None:
    h.topic = "intel." + "a" * 5_000


def bad_message_id_charset(h: envelope_pb2.Header) -> None:
    h.message_id = "id\nwith\x00control"


def long_key_id(h: envelope_pb2.Header) -> None:
    h.wrapped_keys[0].key_id = "k" * 100_000


def big_wrapped_key(h: envelope_pb2.Header) -> None:
    h.wrapped_keys[0].wrapped = os.urandom(200_000)


def many_categories(h: envelope_pb2.Header) -> None:
    for i in range(5_000):
        h.label.categories.add(name=f"C{i:04d}", type=label_pb2.INFORMATIVE, values=["X"])


def long_content_type(h: envelope_pb2.Header) -> None:
    h.content_type = "x" * 300_000


CASES: list[tuple[Callable[[envelope_pb2.Header], None], str]] = [
    (huge_message_id, "message_id is 600000 characters; the limit is 64"),
    (huge_rel_to, "categories[0].values has 20003 values, expected at most 128"),
    (many_wrapped_keys, "header wraps 20001 keys; the limit is 256"),
    (sequence_beyond_int64, f"sequence {2**63} is above the limit {2**63 - 1}"),
    (recipient_sequence_beyond_int64, "wrapped_keys[0].sequence"),
    (long_topic, "topic is 5006 characters; the limit is 255"),
    (bad_message_id_charset, "message_id"),
    (long_key_id, "wrapped_keys[0].key_id is 100000 characters; the limit is 64"),
    (big_wrapped_key, "wrapped_keys[0].wrapped is 200000 bytes; the limit is 2048"),
    (many_categories, "categories has 5001 categories, expected at most 16"),
    (long_content_type, "content_type is 300000 characters; the limit is 128"),
]


async def publish_raw(
    creds: PartnerCredentials, port: int, envelopes: list[envelope_pb2.Envelope]
) -> list[exchange_pb2.PublishResult]:
    """One Publish request on a channel of its own, through the generated stub only."""
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        grpc.ssl_channel_credentials(creds.ca_pem, creds.tls_key_pem, creds.tls_cert_pem),
        options=[("grpc.max_send_message_length", 64 << 20)],
    )
    try:
        stub = exchange_pb2_grpc.ExchangeStub(channel)
        request = exchange_pb2.PublishRequest(batch_id=7, envelopes=envelopes)
        [response] = [r async for r in stub.Publish(iter([request]))]
        assert response.batch_id == 7
        return list(response.results)
    finally:
        await channel.close(None)


@pytest.mark.parametrize(("mutate", "names"), CASES, ids=[c[0].__name__ for c in CASES])
async def test_out_of_bounds_header_is_refused_beside_a_good_one(
    pki: Path,
    broker: Broker,
    kor: PartnerClient,
    mutate: Callable[[envelope_pb2.Header], None],
    names: str,
) -> None:
    creds = load_partner(pki / "partners" / "KOR")
    header = base_header(creds)
    mutate(header)
    bad = signed(creds, header)
    # Under the size limit: only the bounds refuse it.
    assert bad.ByteSize() <= broker.exchange.cfg.max_envelope_bytes
    good = (await kor.seal(b"report", topic="intel.ground", label=LABEL)).envelope
    stored = (await broker.store.stats()).messages

    bad_result, good_result = await publish_raw(creds, broker.port, [bad, good])

    assert bad_result.outcome == exchange_pb2.REFUSED, bad_result
    assert (bad_result.status, bad_result.reason_code) == ("INVALID_ARGUMENT", "malformed")
    assert names in bad_result.reason, bad_result.reason
    assert len(bad_result.reason) < 300 and bad_result.message_id == ""
    assert good_result.outcome == exchange_pb2.ACCEPTED, good_result
    assert (await broker.store.stats()).messages == stored + 1
    refusals = await broker.audit.query(kind="publish.refused", partner="KOR")
    assert [(e.decision, names in e.detail_json) for e in refusals] == [("malformed", True)]
    accepted = await broker.audit.query(kind="publish.accepted", partner="KOR")
    assert [e.message_id for e in accepted] == [good_result.message_id]
    # A recipient's open() refuses it the same way, before any key is touched.
    with pytest.raises(env.InvalidEnvelope) as info:
        env.open(bad, recipient="USA", keys={}, signer=lambda s, k: creds.signing_key.public_key())
    assert info.value.reason is env.Failure.MALFORMED and names in str(info.value)


async def test_stream_goes_on_after_an_out_of_range_sequence(
    pki: Path, broker: Broker, kor: PartnerClient
) -> None:
    """The SDK's own stream: the refusal is a result, not the end of the call."""
    creds = load_partner(pki / "partners" / "KOR")
    header = base_header(creds)
    sequence_beyond_int64(header)
    first = await kor.publish([signed(creds, header)])
    assert [(r.outcome, r.reason_code) for r in first] == [(exchange_pb2.REFUSED, "malformed")]
    again = await kor.publish([(await kor.seal(b"x", topic="intel.a", label=LABEL)).envelope])
    assert again[0].outcome == exchange_pb2.ACCEPTED, again


async def test_seal_at_the_limits_is_accepted(pki: Path, broker: Broker) -> None:
    """What seal() makes at every limit passes the broker; one more is refused by seal()."""
    creds = load_partner(pki / "partners" / "KOR")
    nations = [f"N{i:03d}" for i in range(MAX_CATEGORY_VALUES)]
    label = Label(
        "NATO",
        LABEL.classification,
        (Category("REL TO", CategoryType.PERMISSIVE, ("KOR", "USA", *nations[:-2])),),
    )
    key = HpkePrivateKey.generate().public_key()
    recipients = [env.Recipient(f"P{i:03d}", "k" * 64, key) for i in range(env.MAX_RECIPIENTS)]
    # KOR's certificate certifies a hybrid key, so what it seals is v2 (the same bounds).
    hybrid = creds.hybrid_signing_key
    assert hybrid is not None
    fields: dict[str, object] = {
        "plaintext": b"x",
        "sequence": env.MAX_SEQUENCE,
        "topic": "intel." + "a" * (env.MAX_TOPIC_CHARS - 6),
        "label": label_to_proto(label),
        "precedence": 1,
        "content_type": env.INTEL_SUMMARY,
        "recipients": recipients,
        "created_ms": now_ms(),
        "message_id": "m" * env.MAX_MESSAGE_ID_CHARS,
    }

    def seal(**over: object) -> envelope_pb2.Envelope:
        [e] = envelope_v2.seal_batch(
            [envelope_v2.Message(**{**fields, **over})],  # type: ignore[arg-type]
            sender="KOR",
            signing_key=hybrid,
            signing_key_id=creds.signing_key_id,
            epochs=SenderEpochs("KOR"),
            created_ms=now_ms(),
        )
        return e

    [res] = await publish_raw(creds, broker.port, [seal()])
    assert res.outcome == exchange_pb2.ACCEPTED, res
    for over in (
        {"recipients": [*recipients, env.Recipient("P999", "k", key)]},
        {"message_id": "m" * (env.MAX_MESSAGE_ID_CHARS + 1)},
        {"topic": "intel." + "a" * env.MAX_TOPIC_CHARS},
        {"sequence": env.MAX_SEQUENCE + 1},
    ):
        with pytest.raises(ValueError):
            seal(**over)
    too_many = Category("REL TO", CategoryType.PERMISSIVE, (*nations, "KOR"))
    with pytest.raises(LabelError, match="at most 128"):
        Label("NATO", LABEL.classification, (too_many,))
