"""Every bad input over real mTLS: right status, a clear message, an audit entry,
nothing stored, and other streams unaffected."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from broker.server import Broker
from clients.sdk import ClientError, PartnerClient, call
from coalition import envelope as env
from coalition.labels import Classification, label_to_proto, parse_label
from coalition.pki import load_partner
from coalition.policy import policy_to_proto
from coalition.v1 import envelope_pb2, exchange_pb2
from tests.helpers import admit, now_ms, operator, partner, policy, running_broker
from tests.v2_batches import forged_signature, truncated

LABEL = parse_label("NATO SECRET // REL TO KOR, USA, GBR")


@pytest.fixture
async def broker(pki: Path, tmp_path: Path, backend: dict[str, object]) -> AsyncIterator[Broker]:
    b = await running_broker(pki, tmp_path / "broker", max_envelope_bytes=64 * 1024, **backend)
    for code in ("KOR", "USA", "GBR"):
        await admit(pki, b.port, policy(code))
    await admit(pki, b.port, policy("UKR", level=Classification.RESTRICTED))
    try:
        yield b
    finally:
        await b.stop(grace=1)


@pytest.fixture
async def kor(pki: Path, broker: Broker) -> AsyncIterator[PartnerClient]:
    async with partner(pki, "KOR", broker.port) as c:
        await c.register_keys()
        yield c


@pytest.fixture
async def usa(pki: Path, broker: Broker) -> AsyncIterator[PartnerClient]:
    async with partner(pki, "USA", broker.port) as c:
        await c.register_keys()
        yield c


async def refused(
    client: PartnerClient, e: envelope_pb2.Envelope, broker: Broker
) -> exchange_pb2.PublishResult:
    """Publish one bad envelope; assert nothing was stored; return its result."""
    before = (await broker.store.stats()).messages
    [res] = await client.publish([e])
    assert res.outcome == exchange_pb2.REFUSED, res
    assert (await broker.store.stats()).messages == before
    entries = await broker.audit.query(kind="publish.refused", tail=True, limit=1)
    assert entries and entries[-1].decision == res.reason_code
    return res


async def test_garbage_bytes_in_header(kor: PartnerClient, broker: Broker) -> None:
    res = await refused(
        kor, envelope_pb2.Envelope(header=b"\xff\x00garbage", signature=b"x"), broker
    )
    assert (res.status, res.reason_code) == ("INVALID_ARGUMENT", "malformed")
    assert "malformed" in res.reason


async def test_truncated_envelope(kor: PartnerClient, usa: PartnerClient, broker: Broker) -> None:
    s = await kor.seal(b"x", topic="intel.a", label=LABEL)
    res = await refused(kor, truncated(s.envelope), broker)
    assert (res.status, res.reason_code) == ("INVALID_ARGUMENT", "malformed")


async def test_oversized_envelope(kor: PartnerClient, usa: PartnerClient, broker: Broker) -> None:
    s = await kor.seal(b"x" * 100_000, topic="intel.a", label=LABEL)
    res = await refused(kor, s.envelope, broker)
    assert (res.status, res.reason_code) == ("INVALID_ARGUMENT", "oversized")
    assert "limit is 65536 bytes" in res.reason


async def test_sender_not_the_mtls_identity(
    pki: Path, kor: PartnerClient, usa: PartnerClient, broker: Broker
) -> None:
    # KOR's genuine envelope pushed through USA's connection.
    s = await kor.seal(b"x", topic="intel.a", label=LABEL)
    res = await refused(usa, s.envelope, broker)
    assert (res.status, res.reason_code) == ("PERMISSION_DENIED", "sender_mismatch")
    # USA forging an envelope that claims to come from KOR, signed with USA's key.
    creds = load_partner(pki / "partners" / "USA")
    d = await usa.directory()
    forged = env.seal(
        plaintext=b"fake",
        sender="KOR",
        signing_key=creds.signing_key,
        signing_key_id=creds.signing_key_id,
        sequence=1,
        topic="intel.a",
        label=label_to_proto(LABEL),
        precedence=1,
        content_type=env.INTEL_SUMMARY,
        recipients=[env.Recipient("KOR", d.peers["KOR"].key_id, d.peers["KOR"].hpke_public)],  # type: ignore[arg-type]
        created_ms=now_ms(),
    )
    res = await refused(usa, forged, broker)
    assert res.reason_code == "sender_mismatch"


async def test_bad_signature(kor: PartnerClient, usa: PartnerClient, broker: Broker) -> None:
    s = await kor.seal(b"x", topic="intel.a", label=LABEL)
    res = await refused(kor, forged_signature(s.envelope), broker)
    assert (res.status, res.reason_code) == ("UNAUTHENTICATED", "bad_signature")


async def test_replayed_message_id(kor: PartnerClient, usa: PartnerClient, broker: Broker) -> None:
    s = await kor.seal(b"x", topic="intel.a", label=LABEL)
    [ok] = await kor.publish([s.envelope])
    assert ok.outcome == exchange_pb2.ACCEPTED
    res = await refused(kor, s.envelope, broker)
    assert (res.status, res.reason_code) == ("ALREADY_EXISTS", "replay")
    assert "replay" in res.reason


async def test_out_of_window_timestamp(pki: Path, usa: PartnerClient, broker: Broker) -> None:
    skewed = PartnerClient(
        load_partner(pki / "partners" / "KOR"),
        f"127.0.0.1:{broker.port}",
        clock=lambda: now_ms() + 3_600_000,
    )
    async with skewed:
        s = await skewed.seal(b"x", topic="intel.a", label=LABEL)
        res = await refused(skewed, s.envelope, broker)
    assert (res.status, res.reason_code) == ("INVALID_ARGUMENT", "clock_skew")
    assert "from the broker's clock" in res.reason


async def test_label_above_origination_ceiling(
    pki: Path, usa: PartnerClient, broker: Broker
) -> None:
    async with partner(pki, "UKR", broker.port) as ukr:
        await ukr.register_keys()
        s = await ukr.seal(b"x", topic="intel.a", label=LABEL, recipients=["USA"])
        res = await refused(ukr, s.envelope, broker)
    assert (res.status, res.reason_code) == ("PERMISSION_DENIED", "above_origination_ceiling")


async def test_topic_not_permitted(kor: PartnerClient, usa: PartnerClient, broker: Broker) -> None:
    s = await kor.seal(b"x", topic="ops.plans", label=LABEL, recipients=["USA"])
    res = await refused(kor, s.envelope, broker)
    assert (res.status, res.reason_code) == ("PERMISSION_DENIED", "topic_not_permitted")


async def test_forbidden_subscription_topic(kor: PartnerClient, broker: Broker) -> None:
    sub = kor.subscribe(["ops.>"])
    with pytest.raises(ClientError) as info:
        async for _ in sub:
            pass
    assert info.value.status == grpc.StatusCode.PERMISSION_DENIED
    assert "may not subscribe" in info.value.message
    assert await broker.audit.query(kind="subscribe.refused", partner="KOR")


async def test_suspended_partner(
    pki: Path, kor: PartnerClient, usa: PartnerClient, broker: Broker
) -> None:
    # Sealed while active: once suspended, KOR gets no directory to seal with.
    s = await kor.seal(b"x", topic="intel.a", label=LABEL, recipients=["USA"])
    async with operator(pki, "op1", broker.port) as op1:
        await op1.suspend("KOR", "test")
    res = await refused(kor, s.envelope, broker)
    assert (res.status, res.reason_code) == ("PERMISSION_DENIED", "suspended")
    with pytest.raises(ClientError) as info:
        async for _ in kor.subscribe(["intel.>"]):
            pass
    assert info.value.status == grpc.StatusCode.PERMISSION_DENIED


async def test_unknown_partner_is_unauthenticated(pki: Path, broker: Broker) -> None:
    async with partner(pki, "ROGUE", broker.port) as rogue:
        with pytest.raises(ClientError) as info:
            await rogue.directory()
    assert info.value.status == grpc.StatusCode.UNAUTHENTICATED
    assert "not registered" in info.value.message
    assert await broker.audit.query(kind="auth.refused")


async def test_unknown_operator(pki: Path, broker: Broker) -> None:
    async with operator(pki, "op3", broker.port) as op3:
        with pytest.raises(ClientError) as info:
            await op3.partners()
    assert info.value.status == grpc.StatusCode.UNAUTHENTICATED
    entries = await broker.audit.query(kind="auth.refused")
    assert any(e.decision == "unknown_operator" for e in entries)


async def test_partner_calling_admin(pki: Path, broker: Broker) -> None:
    from clients.sdk import OperatorClient
    from coalition.pki import OperatorCredentials

    creds = load_partner(pki / "partners" / "KOR")
    as_op = OperatorCredentials("KOR", creds.ca_pem, creds.tls_cert_pem, creds.tls_key_pem)
    async with OperatorClient(as_op, f"127.0.0.1:{broker.port}") as c:
        with pytest.raises(ClientError) as info:
            await c.stats()
    assert info.value.status == grpc.StatusCode.PERMISSION_DENIED
    assert "not an operator" in info.value.message
    entries = await broker.audit.query(kind="auth.refused")
    assert any(e.decision == "not_an_operator" for e in entries)


async def test_operator_cannot_approve_own_proposal(pki: Path, broker: Broker) -> None:
    raised = policy("UKR", level=Classification.SECRET)
    async with operator(pki, "op1", broker.port) as op1:
        resp = await op1.set_policy(policy_to_proto(raised), "raise UKR")
        assert resp.WhichOneof("result") == "proposal"
        with pytest.raises(ClientError) as info:
            await op1.approve(resp.proposal.proposal_id)
    assert info.value.status == grpc.StatusCode.PERMISSION_DENIED
    assert "cannot also approve" in info.value.message
    entries = await broker.audit.query(kind="admin.refused")
    assert any(e.decision == "self_approval" for e in entries)
    assert broker.registry.get("UKR").policy.clearances["NATO"] is Classification.RESTRICTED  # type: ignore[union-attr]


async def test_bad_inputs_do_not_disturb_other_streams(
    kor: PartnerClient, usa: PartnerClient, broker: Broker
) -> None:
    sub = usa.subscribe(["intel.>"])
    received: list[bytes] = []

    async def drain() -> None:
        async for d in sub:
            received.append((await usa.open(d)).plaintext)
            await sub.ack([d.offset])

    task = asyncio.create_task(drain())
    for bad in (b"\x00", b"\xff" * 10):
        await kor.publish([envelope_pb2.Envelope(header=bad)])
    s = await kor.seal(b"still flowing", topic="intel.a", label=LABEL)
    [ok] = await kor.publish([s.envelope])
    assert ok.outcome == exchange_pb2.ACCEPTED
    from tests.helpers import eventually

    await eventually(lambda: received == [b"still flowing"], timeout=10)
    sub.close()
    task.cancel()


async def test_bad_label_for_recipients(kor: PartnerClient, broker: Broker) -> None:
    from coalition.v1 import label_pb2

    with pytest.raises(ClientError) as info:
        await call(
            kor.stub.Recipients(
                exchange_pb2.RecipientsRequest(
                    label=label_pb2.Label(policy="NATO"), topic="intel.a"
                )
            )
        )
    assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT
    entries = await broker.audit.query(kind="recipients.refused", partner="KOR")
    assert entries and entries[-1].decision == "bad_label"


async def test_subscribe_without_open(kor: PartnerClient, broker: Broker) -> None:
    async def requests() -> AsyncIterator[exchange_pb2.SubscribeRequest]:
        yield exchange_pb2.SubscribeRequest(ack=exchange_pb2.Ack(offsets=[1]))

    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in kor.stub.Subscribe(requests()):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message must be an open" in (info.value.details() or "")
    entries = await broker.audit.query(kind="subscribe.refused", partner="KOR")
    assert entries and entries[-1].decision == "no_open"
