"""Adversaries: a partner client written to misbehave at volume, and a tampered store."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from broker.server import Broker
from clients.demo.rogue import downgrade
from clients.sdk import OPEN_ERRORS, ClientError, PartnerClient
from coalition import envelope as env
from coalition.labels import label_to_proto, parse_label
from coalition.pki import load_partner
from coalition.v1 import envelope_pb2, exchange_pb2
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

LABEL = parse_label("NATO SECRET // REL TO KOR, USA, UKR")


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


def _downgraded(e: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    """The same envelope with its signed label rewritten to UNCLASSIFIED (layout kept,
    v1 or v2: only the signature can catch it)."""
    return downgrade(e)


async def test_misbehaving_partner_at_volume(
    pki: Path, broker: Broker, clients: dict[str, PartnerClient]
) -> None:
    rogue, kor, usa = clients["UKR"], clients["KOR"], clients["USA"]
    creds = load_partner(pki / "partners" / "UKR")
    d = await rogue.directory()
    usa_peer = d.peers["USA"]
    assert usa_peer.hpke_public is not None
    to_usa = [env.Recipient("USA", usa_peer.key_id, usa_peer.hpke_public)]

    # A legitimate exchange runs throughout.
    received: list[bytes] = []
    sub = usa.subscribe(["intel.>"])

    async def drain() -> None:
        async for dl in sub:
            received.append((await usa.open(dl)).plaintext)
            await sub.ack([dl.offset])

    reader = asyncio.create_task(drain())
    genuine = await rogue.seal(b"genuine", topic="intel.a", label=LABEL, recipients=["USA"])
    [first] = await rogue.publish([genuine.envelope])
    assert first.outcome == exchange_pb2.ACCEPTED
    stored_before = (await broker.store.stats()).messages

    expected: Counter[str] = Counter()
    bad: list[envelope_pb2.Envelope] = []
    for i in range(60):
        kind = i % 5
        if kind == 0:  # impersonation
            bad.append(
                env.seal(
                    plaintext=b"forged",
                    sender="USA",
                    signing_key=creds.signing_key,
                    signing_key_id=creds.signing_key_id,
                    sequence=i + 1,
                    topic="intel.a",
                    label=label_to_proto(LABEL),
                    precedence=1,
                    content_type=env.INTEL_SUMMARY,
                    recipients=to_usa,
                    created_ms=now_ms(),
                )
            )
            expected["sender_mismatch"] += 1
        elif kind == 1:  # replay
            bad.append(genuine.envelope)
            expected["replay"] += 1
        elif kind == 2:  # label downgrade
            bad.append(_downgraded(genuine.envelope))
            expected["bad_signature"] += 1
        elif kind == 3:  # oversized
            big = await rogue.seal(
                os.urandom(20_000), topic="intel.a", label=LABEL, recipients=["USA"]
            )
            bad.append(big.envelope)
            expected["oversized"] += 1
        else:  # malformed bytes
            bad.append(envelope_pb2.Envelope(header=os.urandom(64), signature=os.urandom(64)))
            expected["malformed"] += 1
    results = []
    for start in range(0, len(bad), 20):
        results += await rogue.publish(bad[start : start + 20])
        ok = await kor.seal(
            f"legit {start}".encode(), topic="intel.a", label=LABEL, recipients=["USA"]
        )
        [res] = await kor.publish([ok.envelope])
        assert res.outcome == exchange_pb2.ACCEPTED

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


@sqlite_only("the attacker edits messages.db; JetStream's stream is tested by its store")
async def test_tampered_store_is_detected(
    pki: Path, broker: Broker, clients: dict[str, PartnerClient], tmp_path: Path
) -> None:
    kor, usa = clients["KOR"], clients["USA"]
    sealed = await kor.seal(b"original report", topic="intel.a", label=LABEL, recipients=["USA"])
    [res] = await kor.publish([sealed.envelope])
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
    import hashlib

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
        with pytest.raises(OPEN_ERRORS) as info:
            await usa.open(dl)
        assert isinstance(info.value, OPEN_ERRORS)
        assert info.value.reason.value == "digest_mismatch"
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
