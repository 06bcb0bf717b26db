"""The exchange core's shape: its one memo type, the domain values it answers with, the
refusal audit it owns, and that it builds no gRPC response (a real broker underneath)."""

from __future__ import annotations

import ast
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.errors import Exhausted, Forbidden, InvalidInput
from broker.exchange import (
    Accepted,
    DeliveryBatch,
    ExchangeCore,
    Refused,
    StreamItem,
    StreamStatus,
)
from broker.exchange.memo import Memo
from broker.server import Broker
from clients.sdk import PartnerClient, claimed_header
from coalition.labels import parse_label
from coalition.v1 import envelope_pb2
from tests.helpers import admit, partner, policy, running_broker

LABEL = parse_label("NATO SECRET // REL TO KOR, USA")
PACKAGE = Path(__file__).resolve().parent.parent / "broker" / "exchange"


def test_memo_evicts_the_least_recently_used_key() -> None:
    memo: Memo[str, int] = Memo(2)
    memo.put("a", 1)
    memo.put("b", 2)
    assert memo.get("a") == 1  # a is now the most recently used
    memo.put("c", 3)  # over size: b goes
    assert (memo.get("a"), memo.get("b"), memo.get("c")) == (1, None, 3)
    memo.put("a", 10)  # replacing refreshes too
    memo.put("d", 4)  # c is the least recently used now
    assert ("c" in memo, "a" in memo, "d" in memo, len(memo)) == (False, True, True, 2)
    memo.discard("a")
    assert len(memo) == 1
    with pytest.raises(ValueError):
        Memo(0)


def test_memo_never_grows_past_its_size() -> None:
    memo: Memo[int, int] = Memo(64)
    for i in range(10_000):
        memo.put(i, i)
        assert len(memo) <= 64
    assert [k for k in range(10_000) if k in memo] == list(range(10_000 - 64, 10_000))


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_the_exchange_package_holds_no_grpc_and_no_response_messages() -> None:
    modules = sorted(PACKAGE.glob("*.py"))
    assert {m.stem for m in modules} >= {
        "facade",
        "publish",
        "delivery",
        "live",
        "directory",
        "memo",
        "ratelimit",
        "disk_guard",
    }
    for m in modules:
        imported = _imports(m)
        assert not [n for n in imported if n == "grpc" or n.startswith("grpc.")], m
        # Response shapes are the servicers' business; signed kernel types may stay.
        assert "coalition.v1.exchange_pb2" not in imported, m
        assert len(m.read_text().splitlines()) <= 450, m


@pytest.fixture
async def pair(pki: Path, tmp_path: Path) -> AsyncIterator[tuple[Broker, PartnerClient]]:
    b = await running_broker(pki, tmp_path / "broker")
    for code in ("KOR", "USA"):
        await admit(pki, b.port, policy(code))
    kor, usa = partner(pki, "KOR", b.port), partner(pki, "USA", b.port)
    try:
        for c in (kor, usa):
            await c.register_keys()
        yield b, kor
    finally:
        for c in (kor, usa):
            await c.close()
        await b.stop(grace=1)


async def test_publish_answers_with_domain_outcomes(pair: tuple[Broker, PartnerClient]) -> None:
    b, kor = pair
    core: ExchangeCore = b.exchange
    sealed = await kor.seal(b"one", topic="intel.ground", label=LABEL, recipients=["USA"])
    h = claimed_header(sealed.envelope)  # v1 or v2 (KOR's certificate certifies v2)
    assert h is not None
    first = await core.publish("KOR", [sealed.envelope, envelope_pb2.Envelope(header=b"\xff")])
    assert len(first) == 2
    ok, bad = first
    assert isinstance(ok, Accepted)
    assert (ok.message_id, ok.sequence) == (h.message_id, h.sequence)
    assert ok.offset > 0
    assert isinstance(bad, Refused) and isinstance(bad.error, InvalidInput)
    assert (bad.message_id, bad.error.code) == ("", "malformed")
    [again] = await core.publish("KOR", [sealed.envelope])  # a replay
    assert isinstance(again, Refused)
    assert (again.message_id, again.error.code) == (h.message_id, "replay")
    assert core.counters["KOR"].published == 1 and core.counters["KOR"].refused == 2
    refusals = await b.audit.query(kind="publish.refused", partner="KOR")
    assert sorted(e.decision for e in refusals) == ["malformed", "replay"]


async def test_delivery_loop_yields_domain_items(pair: tuple[Broker, PartnerClient]) -> None:
    b, kor = pair
    core = b.exchange
    sealed = await kor.seal(b"two", topic="intel.ground", label=LABEL, recipients=["USA"])
    [ok] = await core.publish("KOR", [sealed.envelope])
    assert isinstance(ok, Accepted)
    sub = core.open_subscription("USA", ["intel.>"], 8)
    items: list[StreamItem] = []
    try:
        async for item in core.deliveries(sub):
            items.append(item)
            if isinstance(item, StreamStatus):
                break
    finally:
        core.close_subscription(sub)
    batch, status = items
    assert isinstance(batch, DeliveryBatch)
    [m], [h] = batch.messages, batch.headers
    assert (m.offset, h.topic) == (ok.offset, "intel.ground")
    assert m.envelope == sealed.envelope.SerializeToString()
    assert status == StreamStatus(caught_up=True, backlog=0)
    assert sub.inflight == {ok.offset}
    [audited] = await b.audit.query(kind="deliver", partner="USA")
    assert audited.message_id == sealed.message_id


async def test_the_core_audits_refused_calls(pair: tuple[Broker, PartnerClient]) -> None:
    b, _ = pair
    await b.exchange.refused("directory.refused", "KOR", Forbidden("suspended", "no"))
    await b.exchange.refused("keys.refused", "KOR", Exhausted("rate_limited", "slow down"))
    entries = await b.audit.query(partner="KOR")
    got = {(e.kind, e.decision) for e in entries if e.kind.endswith(".refused")}
    assert got == {("directory.refused", "suspended"), ("keys.refused", "rate_limited")}
