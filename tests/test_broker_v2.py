"""The broker takes envelope v2 over real mTLS, on each store backend: one hybrid root
check per batch (counted), the same refusals as v1 for broken envelopes (audited, nothing
stored, the broker keeps serving), routing on the epoch keys' recipients, the same stored
fields (and so JetStream subjects) as v1, and v1 from partners whose certificate holds no
ML-DSA-65 key (and v1 stored before a restart) still delivered."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.server import Broker
from clients.sdk import PartnerClient, Sequencer, SubscribeStream
from coalition import envelope_v2
from coalition.hybrid import HybridSigningKey
from coalition.labels import label_from_proto, parse_label
from coalition.pae import BATCH_ROOT_TYPE
from coalition.pki import PartnerCredentials, load_partner
from coalition.v1 import envelope_pb2, exchange_pb2
from tests import v2_tools
from tests.helpers import admit, partner, policy, running_broker
from tests.v2_batches import (
    admit_with,
    hybrid_key,
    open_v1,
    opened,
    seal_v1,
    seal_v2,
    v1_only,
)

LABEL = parse_label("NATO SECRET // REL TO KOR, USA, GBR, UKR")
TO_USA: dict[str, Any] = {"topic": "intel.a", "label": LABEL, "recipients": ["USA"]}


async def start(pki: Path, data: Path, backend: dict[str, object]) -> Broker:
    return await running_broker(pki, data, **backend)


@pytest.fixture
def ukr_creds(pki: Path) -> PartnerCredentials:
    return v1_only(pki, "UKR")


@pytest.fixture
async def broker(
    pki: Path, tmp_path: Path, backend: dict[str, object], ukr_creds: PartnerCredentials
) -> AsyncIterator[Broker]:
    b = await start(pki, tmp_path / "broker", backend)
    for code in ("KOR", "USA", "GBR"):
        await admit(pki, b.port, policy(code))
    await admit_with(pki, b.port, ukr_creds, policy("UKR"))
    try:
        yield b
    finally:
        await b.stop(grace=1)


@pytest.fixture
async def clients(
    pki: Path, broker: Broker, ukr_creds: PartnerCredentials
) -> AsyncIterator[dict[str, PartnerClient]]:
    out = {c: partner(pki, c, broker.port) for c in ("KOR", "USA", "GBR")}
    for c in out.values():
        await c.register_keys()
    # UKR only sends: its key bundle is signed by a key its new certificate does not hold.
    out["UKR"] = PartnerClient(ukr_creds, f"127.0.0.1:{broker.port}")
    yield out
    for c in out.values():
        await c.close()


async def receive(client: PartnerClient, n: int) -> list[exchange_pb2.Delivery]:
    """n deliveries, acknowledged."""
    sub = client.subscribe(("intel.>",))
    got: list[exchange_pb2.Delivery] = []
    try:
        async with asyncio.timeout(30):
            async for d in sub:
                got.append(d)
                await sub.ack([d.offset])
                if len(got) == n:
                    break
    finally:
        await sub.aclose()
    return got


async def refused(
    client: PartnerClient, envelopes: list[envelope_pb2.Envelope], broker: Broker
) -> list[exchange_pb2.PublishResult]:
    """Publish bad envelopes; all refused, none stored, each refusal audited."""
    before = (await broker.store.stats()).messages
    results = await client.publish(envelopes)
    assert all(r.outcome == exchange_pb2.REFUSED for r in results), results
    assert (await broker.store.stats()).messages == before
    entries = await broker.audit.query(kind="publish.refused", tail=True, limit=len(results))
    assert [e.decision for e in entries] == [r.reason_code for r in results]
    for e, r in zip(entries, results, strict=True):
        assert json.loads(e.detail_json)["status"] == r.status
    return results


def roots(broker: Broker) -> tuple[int, int]:
    """(root signature checks, root cache hits) so far."""
    cache = broker.exchange.pipeline.signatures.roots
    return cache.verifications, cache.hits


async def test_a_batch_costs_one_root_check_and_is_routed_on_its_epoch_keys(
    clients: dict[str, PartnerClient], broker: Broker, pki: Path
) -> None:
    kor, usa = clients["KOR"], clients["USA"]
    payloads = [f"report {i}".encode() for i in range(16)]
    batch = await seal_v2(kor, payloads, topic="intel.ground", label=LABEL, recipients=["USA"])
    results = await kor.publish(batch)
    assert [r.outcome for r in results] == [exchange_pb2.ACCEPTED] * 16, results
    assert roots(broker) == (1, 15)

    # Stored with the header core's fields, as a v1 envelope's (the JetStream subject is
    # built from these: precedence, sender, topic).
    core = envelope_v2.parse_v2(batch[3])[0]
    m = await broker.store.get(results[3].offset)
    assert m is not None
    assert (m.sender, m.sequence, m.topic, m.precedence, m.message_id) == (
        "KOR",
        core.sequence,
        "intel.ground",
        core.precedence,
        core.message_id,
    )
    assert m.label == core.label.SerializeToString()
    assert m.envelope == batch[3].SerializeToString()

    got = await receive(usa, 16)
    kor_creds, usa_creds = kor.creds, usa.creds
    assert [opened(d.envelope, usa_creds, kor_creds).plaintext for d in got] == payloads
    assert all(label_from_proto(d.label) == LABEL and d.topic == "intel.ground" for d in got)

    # GBR may receive the label but the sender gave it no epoch key: not delivered.
    sub = clients["GBR"].subscribe(("intel.>",))
    try:
        async with asyncio.timeout(30):
            await nothing_until_caught_up(sub)
    finally:
        await sub.aclose()
    denied = await broker.audit.query(kind="deliver.denied", partner="GBR")
    assert {e.decision for e in denied} == {"no_key_wrapped"}


async def nothing_until_caught_up(sub: SubscribeStream) -> None:
    """Read sub until it reports caught up; fail on any delivery before that."""
    reader = asyncio.ensure_future(anext(aiter(sub)))
    caught = asyncio.ensure_future(sub.caught_up.wait())
    done, pending = await asyncio.wait({reader, caught}, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()
    assert reader not in done, "a partner without an epoch key was sent the message"


async def test_a_root_seen_before_is_not_checked_again(
    clients: dict[str, PartnerClient], broker: Broker
) -> None:
    kor = clients["KOR"]
    batch = await seal_v2(
        kor, [b"a", b"b", b"c", b"d"], topic="intel.a", label=LABEL, recipients=["USA"]
    )
    first = await kor.publish(batch[:2])
    assert all(r.outcome == exchange_pb2.ACCEPTED for r in first), first
    assert roots(broker) == (1, 1)
    second = await kor.publish(batch[2:])  # the same root, in another request
    assert all(r.outcome == exchange_pb2.ACCEPTED for r in second), second
    assert roots(broker) == (1, 3)
    other = await seal_v2(kor, [b"e"], topic="intel.a", label=LABEL, recipients=["USA"])
    [ok] = await kor.publish(other)
    assert ok.outcome == exchange_pb2.ACCEPTED, ok
    assert roots(broker) == (2, 3)


def _swap_leaves(batch: list[envelope_pb2.Envelope]) -> envelope_pb2.Envelope:
    """batch[0]'s proof with batch[1]'s header and ciphertext (a leaf of the same root)."""
    out = v2_tools.copy(batch[0])
    out.header_v2 = batch[1].header_v2
    out.ciphertext = batch[1].ciphertext
    return out


def _wrong_path(batch: list[envelope_pb2.Envelope]) -> envelope_pb2.Envelope:
    out = v2_tools.copy(batch[0])
    out.batch.path[0] = bytes(b ^ 1 for b in out.batch.path[0])
    return out


def _ed25519_only(
    key: HybridSigningKey, batch: list[envelope_pb2.Envelope]
) -> list[envelope_pb2.Envelope]:
    def strip(sig: envelope_pb2.HybridSignature) -> envelope_pb2.HybridSignature:
        return envelope_pb2.HybridSignature(ed25519=sig.ed25519)

    return v2_tools.rebatch(batch, key, keep=strip)


def _ml_dsa_from_another_key(
    key: HybridSigningKey, batch: list[envelope_pb2.Envelope]
) -> list[envelope_pb2.Envelope]:
    other = HybridSigningKey.generate()

    def mix(sig: envelope_pb2.HybridSignature) -> envelope_pb2.HybridSignature:
        # other's ML-DSA-65 signature over the same root bytes as key's Ed25519 one (the
        # batch is unchanged, so its root is too)
        forged = other.sign(BATCH_ROOT_TYPE, batch[0].batch.root)
        return envelope_pb2.HybridSignature(ed25519=sig.ed25519, ml_dsa_65=forged.ml_dsa_65)

    return v2_tools.rebatch(batch, key, keep=mix)


async def test_broken_v2_envelopes_are_refused_like_v1_and_audited(
    clients: dict[str, PartnerClient], broker: Broker
) -> None:
    kor, usa = clients["KOR"], clients["USA"]
    key = hybrid_key(kor.creds)
    batch = await seal_v2(kor, [b"x", b"y", b"z"], topic="intel.a", label=LABEL, recipients=["USA"])
    gbr_batch = await seal_v2(
        clients["GBR"], [b"g1", b"g2"], topic="intel.a", label=LABEL, recipients=["USA"]
    )

    # A root from another sender: KOR's header under GBR's batch proof.
    foreign = v2_tools.copy(gbr_batch[0])
    foreign.header_v2 = batch[0].header_v2
    foreign.ciphertext = batch[0].ciphertext
    # A v1 signature on a v2 envelope.
    mixed = v2_tools.copy(batch[0])
    mixed.signature = b"\x00" * 64
    cases = {
        "wrong path": (_wrong_path(batch), "UNAUTHENTICATED", "bad_path"),
        "swapped leaf": (_swap_leaves(batch), "UNAUTHENTICATED", "bad_path"),
        "root signed by Ed25519 only": (
            _ed25519_only(key, batch)[0],
            "UNAUTHENTICATED",
            "bad_signature",
        ),
        "ML-DSA-65 half from another key": (
            _ml_dsa_from_another_key(key, batch)[0],
            "UNAUTHENTICATED",
            "bad_signature",
        ),
        "root from another sender": (foreign, "INVALID_ARGUMENT", "malformed"),
        "v1 signature on v2": (mixed, "INVALID_ARGUMENT", "malformed"),
        "another partner's batch": (gbr_batch[1], "PERMISSION_DENIED", "sender_mismatch"),
    }
    for name, (e, status, code) in cases.items():
        [res] = await refused(kor, [e], broker)
        assert (res.status, res.reason_code) == (status, code), (name, res.reason)
    assert roots(broker) == (2, 0)  # the two one-half signatures; the rest never got there

    # The broker keeps serving: the genuine batch is accepted and delivered.
    results = await kor.publish(batch)
    assert [r.outcome for r in results] == [exchange_pb2.ACCEPTED] * 3, results
    got = await receive(usa, 3)
    assert [opened(d.envelope, usa.creds, kor.creds).plaintext for d in got] == [b"x", b"y", b"z"]

    # With the genuine root cached, a one-half signature over the same root is checked
    # (a hit needs the same signature bytes) and refused again.
    for name in ("root signed by Ed25519 only", "ML-DSA-65 half from another key"):
        e, status, code = cases[name]
        [res] = await refused(kor, [e], broker)
        assert (res.status, res.reason_code) == (status, code), (name, res.reason)
    assert roots(broker) == (5, 2)


async def test_the_certificate_decides_the_version(
    clients: dict[str, PartnerClient], broker: Broker, ukr_creds: PartnerCredentials
) -> None:
    kor, usa, ukr = clients["KOR"], clients["USA"], clients["UKR"]
    # KOR's certificate carries an ML-DSA-65 key: a v1 envelope (Ed25519 only) from it is
    # refused, so nobody can strip its messages back to one signature.
    [res] = await refused(kor, [await seal_v1(kor, b"one signature only", **TO_USA)], broker)
    assert (res.status, res.reason_code) == ("UNAUTHENTICATED", "hybrid_key_required")
    assert "ML-DSA-65" in res.reason and "must be v2" in res.reason

    # UKR's carries none: a v2 envelope from it is refused before any root check, v1 taken.
    forged_key = HybridSigningKey.generate()
    v2 = await seal_v2(
        ukr, [b"v2"], topic="intel.a", label=LABEL, recipients=["USA"], signing_key=forged_key
    )
    [res] = await refused(ukr, v2, broker)
    assert (res.status, res.reason_code) == ("UNAUTHENTICATED", "no_hybrid_key")
    assert "carries no ML-DSA-65 key" in res.reason
    assert roots(broker) == (0, 0)
    [ok] = await ukr.publish([await seal_v1(ukr, b"still v1", **TO_USA)])
    assert ok.outcome == exchange_pb2.ACCEPTED, ok
    [d] = await receive(usa, 1)
    assert open_v1(d.envelope, usa.creds, ukr_creds).plaintext == b"still v1"


async def test_v1_and_v2_stored_before_a_restart_are_delivered_after_it(
    pki: Path, tmp_path: Path, backend: dict[str, object]
) -> None:
    # The upgrade path: a v1-only partner's messages and a hybrid partner's v2 ones, both
    # stored, then the broker restarts (routing parses them again from the store) and a
    # new v2 batch follows; the recipient gets all of them in order.
    data = tmp_path / "broker"
    ukr_creds = v1_only(pki, "UKR")
    b = await start(pki, data, backend)
    try:
        for code in ("KOR", "USA", "GBR"):
            await admit(pki, b.port, policy(code))
        await admit_with(pki, b.port, ukr_creds, policy("UKR"))
        async with (
            partner(pki, "USA", b.port) as usa,
            partner(pki, "KOR", b.port) as kor,
            PartnerClient(ukr_creds, f"127.0.0.1:{b.port}") as ukr,
        ):
            await usa.register_keys()
            for text in (b"old v1 1", b"old v1 2"):
                [ok] = await ukr.publish([await seal_v1(ukr, text, **TO_USA)])
                assert ok.outcome == exchange_pb2.ACCEPTED, ok
            batch = await seal_v2(kor, [b"old v2 1", b"old v2 2"], **TO_USA)
            assert all(r.outcome == exchange_pb2.ACCEPTED for r in await kor.publish(batch))
    finally:
        await b.stop(grace=1)

    b = await start(pki, data, backend)
    try:
        async with partner(pki, "KOR", b.port) as kor, partner(pki, "USA", b.port) as usa:
            batch = await seal_v2(kor, [b"new v2"], **TO_USA)
            assert all(r.outcome == exchange_pb2.ACCEPTED for r in await kor.publish(batch))
            got = await receive(usa, 5)
            texts = [
                opened(d.envelope, usa.creds, kor.creds).plaintext
                if envelope_v2.is_v2(d.envelope)
                else open_v1(d.envelope, usa.creds, ukr_creds).plaintext
                for d in got
            ]
            assert texts == [b"old v1 1", b"old v1 2", b"old v2 1", b"old v2 2", b"new v2"]
            # GBR was eligible by policy but in no epoch key: nothing for it after the
            # restart either.
            async with partner(pki, "GBR", b.port) as gbr:
                await gbr.register_keys()
                sub = gbr.subscribe(("intel.>",))
                try:
                    async with asyncio.timeout(30):
                        await nothing_until_caught_up(sub)
                finally:
                    await sub.aclose()
    finally:
        await b.stop(grace=1)


async def test_an_expired_v2_message_is_announced_to_its_epoch_key_recipients(
    pki: Path, tmp_path: Path, backend: dict[str, object]
) -> None:
    # Retention's eligibility reads the recipients (and their numbers) from the epoch keys.
    b = await running_broker(pki, tmp_path / "broker", retention_ms=1000, **backend)
    try:
        for code in ("KOR", "USA", "GBR"):
            await admit(pki, b.port, policy(code))
        target = f"127.0.0.1:{b.port}"
        async with (
            PartnerClient(
                load_partner(pki / "partners" / "KOR"),
                target,
                sequencer=Sequencer(per_recipient=True),
            ) as kor,
            partner(pki, "USA", b.port) as usa,
            partner(pki, "GBR", b.port) as gbr,
        ):
            await usa.register_keys()
            await gbr.register_keys()
            batch = await seal_v2(kor, [b"one", b"two"], **TO_USA)
            results = await kor.publish(batch)
            assert all(r.outcome == exchange_pb2.ACCEPTED for r in results), results
            await asyncio.sleep(1.1)  # older than retention_ms
            assert b.retention is not None
            swept = await b.retention.sweep()
            assert swept.removed == 2
            notices = {p: await b.store.notices(p, 10) for p in ("USA", "GBR")}
        assert [(n.message_id, n.recipient_sequence) for n in notices["USA"]] == [
            (envelope_v2.parse_v2(e)[0].message_id, i + 1) for i, e in enumerate(batch)
        ]
        assert notices["GBR"] == []  # eligible by policy, but in no epoch key
    finally:
        await b.stop(grace=1)
