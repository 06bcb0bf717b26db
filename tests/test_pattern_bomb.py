"""A partner subscribing with a huge number of topic patterns, against a real broker
process over mutual TLS.

Before the subject tree and the limits, a 100,000-pattern subscription (all inside the
partner's permitted `intel.>`, a 1.6 MiB open) and another partner publishing on 40
new topics held the broker's event loop for 5-6 s: every new topic was matched
against every pattern, and an unrelated partner's Directory call waited that long
instead of a few ms. Waits are bounded; the one timing bound is generous (see below).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from clients.sdk import ClientError, PartnerClient
from coalition.labels import parse_label
from coalition.v1 import exchange_pb2, exchange_pb2_grpc
from tests.helpers import admit, broker_argv, eventually, operator, partner, policy
from tests.test_broker_faults import ROOT, BrokerProcess

pytestmark = pytest.mark.slow

BOMB = 100_000
LABEL = parse_label("NATO SECRET // REL TO UKR")
# The finding's figures were 5-6 s of stall against 4 ms; a Directory call that takes
# longer than this is the stall, not noise of a shared machine.
STALL_BOUND_S = 2.0


@dataclass
class ConfiguredBroker(BrokerProcess):
    """A broker process started with a [limits] config file as well as the flags."""

    limits: str = ""

    def spawn(self) -> subprocess.Popen[bytes]:
        self.starts += 1
        argv = broker_argv(self.pki, self.data, self.port, self.port_file)
        if self.limits:
            conf = self.data.parent / "broker.toml"
            conf.write_text(f"[limits]\n{self.limits}\n")
            argv += ["--config", str(conf)]
        with (self.data.parent / f"broker-{self.starts}.log").open("wb") as log:
            return subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture
def broker_proc(pki: Path, tmp_path: Path) -> Iterator[ConfiguredBroker]:
    b = ConfiguredBroker(pki, tmp_path / "data")
    try:
        yield b
    finally:
        b.cleanup()


@contextlib.asynccontextmanager
async def three_partners(pki: Path, port: int) -> AsyncIterator[dict[str, PartnerClient]]:
    """UKR subscribes (the bomb), KOR publishes, USA only reads the directory."""
    for code in ("UKR", "KOR", "USA"):
        await admit(pki, port, policy(code))
    out = {c: partner(pki, c, port) for c in ("UKR", "KOR", "USA")}
    try:
        for c in out.values():
            await c.register_keys()
        yield out
    finally:
        for c in out.values():
            await c.close()


def bomb_patterns(n: int) -> list[str]:
    """n distinct patterns inside `intel.>`, ~16 bytes each; none matches `intel.new*`."""
    return [f"intel.s{i:05d}.*.x" if i % 2 else f"intel.s{i:05d}.>" for i in range(n)]


class DirectoryProbe:
    """USA calls Directory over and over on its own connection; records each latency."""

    def __init__(self, pki: Path, port: int) -> None:
        self.client = partner(pki, "USA", port)
        self.stub = exchange_pb2_grpc.ExchangeStub(self.client.channel)
        self.latencies: list[float] = []
        self.errors: list[grpc.StatusCode] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                await self.stub.Directory(exchange_pb2.DirectoryRequest(), timeout=30)
                self.latencies.append(time.monotonic() - t0)
            except grpc.aio.AioRpcError as exc:
                self.errors.append(exc.code())
            await asyncio.sleep(0.02)

    async def more(self, n: int) -> None:
        """Wait (bounded) until n more calls have ended."""
        want = len(self.latencies) + len(self.errors) + n
        await eventually(lambda: len(self.latencies) + len(self.errors) >= want, 60)

    async def __aenter__(self) -> DirectoryProbe:
        await self.stub.Directory(exchange_pb2.DirectoryRequest(), timeout=30)  # connected
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task
        await self.client.close()


async def refusal(client: PartnerClient, patterns: list[str]) -> ClientError:
    """The error the broker ends a subscription with (bounded: an accepted open fails)."""

    async def first() -> None:
        async for _ in client.subscribe(patterns):
            pass

    with pytest.raises(ClientError) as info:
        await asyncio.wait_for(first(), 30)
    return info.value


async def test_hundred_thousand_patterns_are_refused_and_audited(
    pki: Path, broker_proc: ConfiguredBroker
) -> None:
    await broker_proc.start()
    port = broker_proc.port
    async with three_partners(pki, port) as c, DirectoryProbe(pki, port) as probe:
        patterns = bomb_patterns(BOMB)
        wire = exchange_pb2.SubscribeRequest(open=exchange_pb2.SubscribeOpen(topics=patterns))
        assert wire.ByteSize() > 1.6 * 2**20  # the finding's 1.6 MiB open
        info = await refusal(c["UKR"], patterns)
        assert info.status == grpc.StatusCode.INVALID_ARGUMENT
        assert "100000 topic patterns" in info.message
        assert "at most 256" in info.message
        # Just over the byte limit, under the count: refused for its size.
        fat = [f"intel.{'x' * 70}{i:03d}.>" for i in range(220)]
        assert len(fat) <= 256 and sum(map(len, fat)) > 16 * 1024
        info2 = await refusal(c["UKR"], fat)
        assert info2.status == grpc.StatusCode.INVALID_ARGUMENT
        assert "bytes" in info2.message
        # At the limit the open is accepted, and delivery works through it.
        # At both limits (256 patterns, 16,075 of 16,384 bytes) the open is accepted, and
        # 40 messages on new topics are routed through it while USA is served.
        wide = [p.replace(".s", "." + "w" * 49, 1) for p in bomb_patterns(255)]
        at_cap = [*wide, "intel.new.>"]
        assert len(at_cap) == 256 and 16_000 < sum(map(len, at_cap)) <= 16 * 1024
        async with live_subscription(c["UKR"], at_cap) as got:
            await publish_new_topics(c["KOR"], got, 40)
            await probe.more(5)
        async with operator(pki, "op1", port) as op:
            refused = await op.audit(kind="subscribe.refused", partner="UKR")
    assert [e.decision for e in refused] == ["too_many_patterns", "too_many_patterns"]
    reasons = [json.loads(e.detail_json)["reason"] for e in refused]
    assert "100000 topic patterns" in reasons[0] and "bytes" in reasons[1]
    # The other partner was served throughout.
    assert probe.errors == [] and probe.latencies
    assert max(probe.latencies) < STALL_BOUND_S, max(probe.latencies)


@contextlib.asynccontextmanager
async def live_subscription(client: PartnerClient, patterns: list[str]) -> AsyncIterator[list[str]]:
    """A subscription with patterns, open and caught up; yields the topics it receives."""
    sub = client.subscribe(patterns)
    got: list[str] = []

    async def read() -> None:
        async for d in sub:
            got.append(d.topic)
            await sub.ack([d.offset])

    reader = asyncio.create_task(read())
    try:
        await eventually(lambda: reader.done() or sub.caught_up.is_set(), 60)
        if reader.done():
            reader.result()  # the open was refused: raise why
        yield got
        if reader.done():
            reader.result()
    finally:
        await sub.aclose()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def publish_new_topics(kor: PartnerClient, got: list[str], topics: int) -> None:
    """KOR publishes one message on each of `topics` new topics; returns once the
    subscription has them all (bounded)."""
    envs = [
        (
            await kor.seal(b"report", topic=f"intel.new.t{i}", label=LABEL, recipients=["UKR"])
        ).envelope
        for i in range(topics)
    ]
    results = await kor.publish(envs)
    assert {r.outcome for r in results} == {exchange_pb2.ACCEPTED}
    await eventually(lambda: len(got) >= topics, 60)
    assert sorted(got) == sorted(f"intel.new.t{i}" for i in range(topics))


async def test_hundred_thousand_patterns_do_not_stall_other_partners(
    pki: Path, broker_proc: ConfiguredBroker
) -> None:
    """The subject tree alone, at the finding's scale: the limits raised so the broker
    accepts the 100,000-pattern open, then 40 messages on new topics are routed
    through it while another partner reads the directory."""
    broker_proc.limits = "max_subscribe_patterns = 100001\nmax_subscribe_pattern_bytes = 2097152"
    await broker_proc.start()
    port = broker_proc.port
    async with three_partners(pki, port) as c:
        # The one pattern that matches the new topics comes last: matching pattern by
        # pattern tries all 100,000 others first, for every new topic.
        patterns = [*bomb_patterns(BOMB), "intel.new.>"]
        # Opening costs time linear in the open (bounded by the limits); it is not what
        # is measured: the probe starts once the subscription is live.
        async with live_subscription(c["UKR"], patterns) as got:
            async with DirectoryProbe(pki, port) as probe:
                await publish_new_topics(c["KOR"], got, 40)
                await probe.more(5)
    assert probe.errors == [], probe.errors
    worst = max(probe.latencies)
    print(f"worst of {len(probe.latencies)} Directory calls: {worst:.3f} s")
    # Before the tree: 5-6 s per Directory call while the 40 topics were routed.
    assert worst < STALL_BOUND_S, f"a Directory call took {worst:.2f} s"
