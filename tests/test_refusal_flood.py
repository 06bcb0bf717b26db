"""A partner that keeps sending refused traffic: its refusals count against its publish
rate (beyond it whole requests are refused rate_limited before any signature check), and
the audit log records them one by one only up to a threshold per partner and interval,
then counts them per reason in one summary entry, exactly. Other partners are unaffected.

The broker's clock is held still (and moved by hand), so the token bucket refills only
when the test says: the counts below are exact, not timing-dependent.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.server import Broker, start_broker
from clients.sdk import ClientError
from coalition.labels import parse_label
from coalition.v1 import audit_pb2, envelope_pb2, exchange_pb2
from tests.helpers import admit, broker_config, now_ms, operator, partner, policy
from tests.v2_batches import forged_signature

LABEL = parse_label("NATO SECRET // REL TO KOR, USA")
RATE = 200  # the partner's publish rate in this test (messages/s)
THRESHOLD = 100  # refusals audited one by one per partner and interval (the default)


class Clock:
    """The broker's clock, moved only by the test."""

    def __init__(self) -> None:
        self.ms = now_ms()

    def __call__(self) -> int:
        return self.ms


async def _broker(pki: Path, data: Path, clock: Clock) -> Broker:
    cfg = broker_config(pki, data, default_publish_rate_per_s=RATE)
    return await start_broker(cfg, clock=clock)


def _tampered(e: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    return forged_signature(e)  # v1 or v2: refused bad_signature


def _summaries(entries: list[audit_pb2.AuditEntry]) -> list[tuple[str, dict[str, Any]]]:
    """(reason, detail) of each summary entry, in log order."""
    return [(e.decision, json.loads(e.detail_json)) for e in entries if e.kind.endswith(".summary")]


def _counted(entries: list[audit_pb2.AuditEntry]) -> int:
    """Refusals the entries account for: one each, plus each summary's count."""
    single = sum(1 for e in entries if not e.kind.endswith(".summary"))
    return single + sum(int(d["count"]) for _, d in _summaries(entries))


async def test_a_refused_flood_is_throttled_and_summarised(pki: Path, tmp_path: Path) -> None:
    """2,000 envelopes with a bad signature, in requests of 50, at one instant: the first
    RATE of them are verified and refused bad_signature, the rest are refused rate_limited
    unverified (before, all 2,000 were verified, and each was its own audit entry). In the
    audit log: THRESHOLD entries one by one, the other 1,900 in two summary entries
    (written at shutdown, the interval being still open)."""
    clock = Clock()
    b = await _broker(pki, tmp_path / "broker", clock)
    try:
        for code in ("KOR", "USA"):
            await admit(pki, b.port, policy(code))
        async with partner(pki, "KOR", b.port) as kor, partner(pki, "USA", b.port) as usa:
            await usa.register_keys()
            await kor.register_keys()
            good = [(await kor.seal(b"report", topic="intel.a", label=LABEL)).envelope]
            bad = [_tampered(good[0])] * 50
            outcomes: Counter[str] = Counter()
            ids: list[str] = []
            for _ in range(40):
                for r in await kor.publish(bad):
                    assert r.outcome == exchange_pb2.REFUSED
                    outcomes[r.reason_code] += 1
                    ids.append(r.message_id)
            assert outcomes == {"bad_signature": RATE, "rate_limited": 2000 - RATE}
            [r] = await kor.publish(good)
            assert (r.status, r.reason_code) == ("RESOURCE_EXHAUSTED", "rate_limited"), r
            assert "rate of 200 messages/s" in r.reason
            # Another partner publishing meanwhile is not held back.
            s = await usa.seal(b"from USA", topic="intel.a", label=LABEL, recipients=["KOR"])
            [r] = await usa.publish([s.envelope])
            assert r.outcome == exchange_pb2.ACCEPTED, r
            # A second later the bucket has refilled: KOR's good envelope goes through.
            clock.ms += 1000
            [r] = await kor.publish(good)
            assert r.outcome == exchange_pb2.ACCEPTED, r
    finally:
        await b.stop(grace=1)
    b = await _broker(pki, tmp_path / "broker", clock)
    try:
        entries = await b.audit.query(kind="publish.refused", partner="KOR")
        single = [e for e in entries if e.kind == "publish.refused"]
        assert len(single) == THRESHOLD
        assert {e.decision for e in single} == {"bad_signature"}
        summaries = dict(_summaries(entries))  # one interval: one summary per reason
        assert {k: v["count"] for k, v in summaries.items()} == {
            "bad_signature": RATE - THRESHOLD,
            "rate_limited": 2000 - RATE + 1,
        }
        assert summaries["rate_limited"]["first_message_id"] == ids[RATE]
        assert summaries["rate_limited"]["status"] == "RESOURCE_EXHAUSTED"
        assert (await b.audit.verify(b.admin.audit_public_key)).ok
    finally:
        await b.stop(grace=1)


async def test_an_auth_refusal_flood_is_summarised(pki: Path, tmp_path: Path) -> None:
    """A certificate holder that is not admitted calls again and again: each call is
    refused UNAUTHENTICATED, the first THRESHOLD are audited one by one and the rest are
    counted in one auth.refused.summary entry (before, 300 entries)."""
    clock = Clock()
    b = await _broker(pki, tmp_path / "broker", clock)
    try:
        async with partner(pki, "ROGUE", b.port) as rogue:
            for _ in range(300):
                with pytest.raises(ClientError) as err:
                    await rogue.directory(refresh=True)
                assert err.value.status == grpc.StatusCode.UNAUTHENTICATED
        async with operator(pki, "op1", b.port) as op:
            assert len(await op.audit(kind="auth.refused")) == THRESHOLD
    finally:
        await b.stop(grace=1)
    b = await _broker(pki, tmp_path / "broker", clock)
    try:
        entries = await b.audit.query(kind="auth.refused")
        assert len([e for e in entries if e.kind == "auth.refused"]) == THRESHOLD
        [(reason, summary)] = _summaries(entries)
        assert (reason, summary["count"]) == ("unknown_partner", 300 - THRESHOLD)
        assert [e.actor for e in entries if e.kind.endswith(".summary")] == [
            "urn:coalition:partner:ROGUE"
        ]
    finally:
        await b.stop(grace=1)


async def test_summaries_are_written_when_their_interval_closes(pki: Path, tmp_path: Path) -> None:
    """Without a shutdown: once the interval has closed, its summary is in the log."""
    cfg = broker_config(
        pki, tmp_path / "broker", refusal_audit_threshold=5, refusal_audit_interval_ms=300
    )
    b = await start_broker(cfg)
    try:
        async with partner(pki, "ROGUE", b.port) as rogue:
            for _ in range(20):
                with pytest.raises(ClientError):
                    await rogue.directory(refresh=True)
        async with operator(pki, "op1", b.port) as op:

            async def counted() -> int:
                return _counted(await op.audit(kind="auth.refused"))

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while await counted() < 20:
                assert loop.time() < deadline, "no summary written after its interval"
                await asyncio.sleep(0.1)
            assert await counted() == 20
    finally:
        await b.stop(grace=1)
