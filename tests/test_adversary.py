"""Adversaries: a partner client written to misbehave at volume, and a tampered store,
each with envelope v1 (partners without hybrid keys) and v2."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.server import Broker
from clients.sdk import ClientError, PartnerClient
from coalition import envelope as env
from coalition import envelope_v2
from coalition.epoch import SenderEpochs
from coalition.labels import Classification, label_to_proto, parse_label
from coalition.pki import load_partner
from coalition.v1 import envelope_pb2, exchange_pb2
from tests import v2_tools
from tests.helpers import (
    admit,
    eventually,
    now_ms,
    operator,
    partner,
    policy,
    running_broker,
    sqlite_only,
)
from tests.v2_batches import (
    admit_with,
    hybrid_key,
    open_any,
    open_v1,
    opened,
    seal_v1,
    seal_v2,
    v1_only,
)

LABEL = parse_label("NATO SECRET // REL TO KOR, USA, UKR")
TO_USA: dict[str, Any] = {"topic": "intel.a", "label": LABEL, "recipients": ["USA"]}


@pytest.fixture
async def broker(pki: Path, tmp_path: Path, backend: dict[str, object]) -> AsyncIterator[Broker]:
    b = await running_broker(pki, tmp_path / "broker", max_envelope_bytes=16 * 1024, **backend)
    for code in ("KOR", "USA", "UKR"):
        await admit(pki, b.port, policy(code))
    try:
        yield b
    finally:
        await b.stop(grace=1)


@pytest.fixture
async def clients(pki: Path, broker: Broker) -> AsyncIterator[dict[str, PartnerClient]]:
    out = {c: partner(pki, c, broker.port) for c in ("KOR", "USA", "UKR")}
    for c in out.values():
        await c.register_keys()
    yield out
    for c in out.values():
        await c.close()


@pytest.fixture(params=["v1", "v2"])
async def senders(
    request: pytest.FixtureRequest, pki: Path, tmp_path: Path, backend: dict[str, object]
) -> AsyncIterator[tuple[str, Broker, dict[str, PartnerClient]]]:
    """The envelope version the senders use, a broker, and KOR, USA, UKR connected to it.

    v1: KOR and UKR are admitted under Ed25519-only signing certificates (partners that
    have not moved to hybrid keys; the broker takes v1 only from them) and seal v1. v2:
    everyone under the PKI's hybrid certificates, sealing v2 batches. Both straight with
    the kernel (tests/v2_batches.py), whatever the SDK seals.
    """
    version = str(request.param)
    b = await running_broker(pki, tmp_path / "broker", max_envelope_bytes=16 * 1024, **backend)
    creds = {c: load_partner(pki / "partners" / c) for c in ("KOR", "USA", "UKR")}
    if version == "v1":
        creds["KOR"], creds["UKR"] = v1_only(pki, "KOR"), v1_only(pki, "UKR")
    for code, cred in creds.items():
        await admit_with(pki, b.port, cred, policy(code))
    out = {code: PartnerClient(cred, f"127.0.0.1:{b.port}") for code, cred in creds.items()}
    try:
        await out["USA"].register_keys()  # the only recipient here
        yield version, b, out
    finally:
        for client in out.values():
            await client.close()
        await b.stop(grace=1)


async def seal(
    version: str, client: PartnerClient, text: bytes, *, sender: str | None = None
) -> envelope_pb2.Envelope:
    """One envelope of ``version`` from client's partner to USA (or claiming ``sender``)."""
    if version == "v1":
        return await seal_v1(client, text, **TO_USA, sender=sender)
    if sender is None:
        [e] = await seal_v2(client, [text], **TO_USA)
        return e
    d = await client.directory(refresh=True)
    peer = d.peers["USA"]
    assert peer.hpke_public is not None
    message = envelope_v2.Message(
        plaintext=text,
        topic="intel.a",
        label=label_to_proto(LABEL),
        precedence=1,
        content_type=env.INTEL_SUMMARY,
        recipients=[env.Recipient("USA", peer.key_id, peer.hpke_public)],
        sequence=client.sequencer.allocate(["USA"]).sequence,
        created_ms=now_ms(),
    )
    [e] = envelope_v2.seal_batch(  # another sender's name, under client's own key
        [message],
        sender=sender,
        signing_key=hybrid_key(client.creds),
        signing_key_id=client.creds.signing_key_id,
        epochs=SenderEpochs(sender),
        created_ms=now_ms(),
    )
    return e


def _downgraded(e: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    """The same envelope with its signed label rewritten to UNCLASSIFIED: v1's header
    (layout kept), v2's header core (its batch proof kept)."""
    if envelope_v2.is_v2(e):
        return v2_tools.edit_core(
            e,
            lambda h: setattr(h.label, "classification", int(Classification.UNCLASSIFIED)),
        )
    prefix, digest_field = e.header[:-34], e.header[-34:]
    h = envelope_pb2.Header.FromString(prefix)
    h.label.classification = int(Classification.UNCLASSIFIED)  # type: ignore[assignment]
    return envelope_pb2.Envelope(
        header=h.SerializeToString() + digest_field, ciphertext=e.ciphertext, signature=e.signature
    )


def _garbage(version: str) -> envelope_pb2.Envelope:
    if version == "v1":
        return envelope_pb2.Envelope(header=os.urandom(64), signature=os.urandom(64))
    return envelope_pb2.Envelope(
        header_v2=os.urandom(64), batch=envelope_pb2.BatchProof(root=os.urandom(64))
    )


async def test_misbehaving_partner_at_volume(
    pki: Path, senders: tuple[str, Broker, dict[str, PartnerClient]]
) -> None:
    version, broker, clients = senders
    rogue, kor, usa = clients["UKR"], clients["KOR"], clients["USA"]

    # A legitimate exchange runs throughout.
    received: list[bytes] = []
    sub = usa.subscribe(["intel.>"])
    by_code = {c.code: c.creds for c in clients.values()}

    async def drain() -> None:
        async for dl in sub:
            sender = envelope_v2_sender(dl.envelope)
            received.append(open_any(dl.envelope, usa.creds, by_code[sender]))
            await sub.ack([dl.offset])

    reader = asyncio.create_task(drain())
    genuine = await seal(version, rogue, b"genuine")
    [first] = await rogue.publish([genuine])
    assert first.outcome == exchange_pb2.ACCEPTED, first
    stored_before = (await broker.store.stats()).messages

    # What the signed label's rewrite breaks: v1's header signature, v2's inclusion path.
    tampered = "bad_signature" if version == "v1" else "bad_path"
    expected: Counter[str] = Counter()
    bad: list[envelope_pb2.Envelope] = []
    for i in range(60):
        kind = i % 5
        if kind == 0:  # impersonation
            bad.append(await seal(version, rogue, b"forged", sender="USA"))
            expected["sender_mismatch"] += 1
        elif kind == 1:  # replay
            bad.append(genuine)
            expected["replay"] += 1
        elif kind == 2:  # label downgrade
            bad.append(_downgraded(genuine))
            expected[tampered] += 1
        elif kind == 3:  # oversized
            bad.append(await seal(version, rogue, os.urandom(20_000)))
            expected["oversized"] += 1
        else:  # malformed bytes
            bad.append(_garbage(version))
            expected["malformed"] += 1
    results = []
    for start in range(0, len(bad), 20):
        results += await rogue.publish(bad[start : start + 20])
        [res] = await kor.publish([await seal(version, kor, f"legit {start}".encode())])
        assert res.outcome == exchange_pb2.ACCEPTED, res

    got = Counter(r.reason_code for r in results)
    assert all(r.outcome == exchange_pb2.REFUSED for r in results)
    assert got == expected
    assert (await broker.store.stats()).messages == stored_before + 3  # the legit ones only
    await eventually(lambda: len(received) == 4, timeout=10)
    assert sorted(received) == [b"genuine", b"legit 0", b"legit 20", b"legit 40"]

    # Subscribing to a forbidden topic is refused and the legitimate stream is unaffected.
    with pytest.raises(ClientError) as info:
        async for _ in rogue.subscribe(["ops.>"]):
            pass
    assert info.value.status == grpc.StatusCode.PERMISSION_DENIED
    refused = await broker.audit.query(kind="publish.refused", partner="UKR")
    assert len(refused) == len(bad)
    async with operator(pki, "op1", broker.port) as op:
        verdict = await op.verify_audit()
    assert verdict.ok, verdict.problem
    await sub.aclose()
    reader.cancel()


def envelope_v2_sender(e: envelope_pb2.Envelope) -> str:
    """The (unverified) sender named in a delivered envelope of either version."""
    if envelope_v2.is_v2(e):
        return envelope_v2.parse_v2(e)[0].sender
    return env.parse_header(e).sender


@sqlite_only("the attacker edits messages.db; JetStream's stream is tested by its store")
async def test_tampered_store_is_detected(
    pki: Path, senders: tuple[str, Broker, dict[str, PartnerClient]], tmp_path: Path
) -> None:
    version, broker, clients = senders
    kor, usa = clients["KOR"], clients["USA"]
    [res] = await kor.publish([await seal(version, kor, b"original report")])
    assert res.outcome == exchange_pb2.ACCEPTED

    # An attacker with disk access flips a ciphertext byte and fixes up the digest column.
    db = sqlite3.connect(tmp_path / "broker" / "messages.db")
    (raw,) = db.execute(
        "SELECT envelope FROM messages WHERE msg_offset=?", (res.offset,)
    ).fetchone()
    e = envelope_pb2.Envelope.FromString(raw)
    ct = bytearray(e.ciphertext)
    ct[20] ^= 0x01
    e.ciphertext = bytes(ct)
    new_raw = e.SerializeToString()
    db.execute(
        "UPDATE messages SET envelope=?, digest=? WHERE msg_offset=?",
        (new_raw, hashlib.sha256(new_raw).digest(), res.offset),
    )
    db.commit()
    db.close()

    # The recipient detects it: the signed header's payload digest no longer matches.
    sub = usa.subscribe(["intel.>"])
    async for dl in sub:
        if version == "v1":
            with pytest.raises(env.InvalidEnvelope) as info:
                open_v1(dl.envelope, usa.creds, kor.creds)
            assert info.value.reason is env.Failure.DIGEST_MISMATCH
        else:
            with pytest.raises(envelope_v2.InvalidEnvelopeV2) as info2:
                opened(dl.envelope, usa.creds, kor.creds)
            assert info2.value.reason is envelope_v2.Failure.DIGEST_MISMATCH
        break
    await sub.aclose()

    # Audit verification detects it too: the digest was committed to the hash chain.
    async with operator(pki, "op2", broker.port) as op:
        verdict = await op.verify_audit()
    assert not verdict.ok
    assert list(verdict.tampered_offsets) == [res.offset]
    assert "do not match the digest the audit log recorded" in verdict.problem


async def test_subscriber_that_never_acknowledges_stays_bounded(
    pki: Path, broker: Broker, clients: dict[str, PartnerClient]
) -> None:
    kor, usa, ukr = clients["KOR"], clients["USA"], clients["UKR"]
    # UKR opens a stream with a small window and then never reads nor acknowledges.
    stalled = ukr.subscribe(["intel.>"], window=8)
    stalled_it = stalled.__aiter__()

    async def read_one() -> exchange_pb2.Delivery:
        return await anext(stalled_it)

    first = asyncio.create_task(read_one())
    await eventually(lambda: bool(broker.exchange.live.get("UKR")))
    got: list[bytes] = []
    sub = usa.subscribe(["intel.>"])

    async def drain() -> None:
        async for dl in sub:
            got.append((await usa.open(dl)).plaintext)
            await sub.ack([dl.offset])

    reader = asyncio.create_task(drain())
    for i in range(0, 60, 10):
        batch = [
            (await kor.seal(f"m{i + j}".encode(), topic="intel.a", label=LABEL)).envelope
            for j in range(10)
        ]
        assert all(r.outcome == exchange_pb2.ACCEPTED for r in await kor.publish(batch))
    await eventually(lambda: len(got) == 60, timeout=15)
    [ukr_sub] = broker.exchange.live["UKR"]
    # The broker holds at most the window for the stalled subscriber; the rest waits in
    # the store, not in memory.
    assert len(ukr_sub.inflight) <= 8
    assert await broker.store.backlog_count("UKR") == 60
    first.cancel()
    stalled.close()
    await sub.aclose()
    reader.cancel()
