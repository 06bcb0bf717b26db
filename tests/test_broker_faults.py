"""Faults with real processes: the broker runs as `coalition-broker serve` in a subprocess
and is stopped with SIGTERM or killed with SIGKILL in the middle of publishing.

Waits are bounded so a failure ends; nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients.sdk import ClientError, OperatorClient, PartnerClient
from coalition.labels import parse_label
from coalition.v1 import exchange_pb2
from tests.helpers import (
    admit,
    broker_argv,
    eventually,
    operator,
    partner,
    policy,
    running_broker,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
LABEL = parse_label("NATO SECRET // REL TO USA")
TOPIC = "intel.ground"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class BrokerProcess:
    """`python -m broker.cli serve` on a fixed port, restartable on the same data."""

    pki: Path
    data: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def port_file(self) -> Path:
        return self.data.parent / f"port-{self.starts}"

    def spawn(self) -> subprocess.Popen[bytes]:
        self.starts += 1
        with (self.data.parent / f"broker-{self.starts}.log").open("wb") as log:
            return subprocess.Popen(
                broker_argv(self.pki, self.data, self.port, self.port_file),
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def start(self) -> None:
        """Start the broker and wait (bounded) until it wrote its port file."""
        self.proc = self.spawn()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"broker exited with {self.proc.returncode}:\n{self.log()}")
            if loop.time() > deadline:
                raise AssertionError(f"broker did not start:\n{self.log()}")
            await asyncio.sleep(0.05)
        assert int(self.port_file.read_text()) == self.port

    def log(self) -> str:
        return (self.data.parent / f"broker-{self.starts}.log").read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (rc := self.proc.poll()) is None:
            if loop.time() > deadline:
                raise AssertionError("broker did not exit")
            await asyncio.sleep(0.05)
        return rc

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def broker_proc(pki: Path, tmp_path: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(pki, tmp_path / "data")
    try:
        yield b
    finally:
        b.cleanup()


@dataclass
class Publisher:
    """Publishes batches until stopped or the broker goes away; records every outcome."""

    client: PartnerClient
    accepted: dict[str, int] = field(default_factory=dict)  # message id -> offset
    sent: set[str] = field(default_factory=set)
    refused: list[exchange_pb2.PublishResult] = field(default_factory=list)
    errors: list[ClientError] = field(default_factory=list)
    batches: int = 0

    async def run(self, stop: asyncio.Event, batch: int = 5) -> None:
        while not stop.is_set():
            envs = []
            for _ in range(batch):
                s = await self.client.seal(
                    b"report %d" % len(self.sent), topic=TOPIC, label=LABEL, recipients=["USA"]
                )
                self.sent.add(s.message_id)
                envs.append(s.envelope)
            try:
                # Bounded: a publish must be answered or fail, never hang.
                results = await asyncio.wait_for(self.client.publish(envs), 20)
            except ClientError as exc:
                self.errors.append(exc)
                return
            self.batches += 1
            for r in results:
                if r.outcome == exchange_pb2.ACCEPTED:
                    self.accepted[r.message_id] = r.offset
                else:
                    self.refused.append(r)


async def subscribe_until(
    client: PartnerClient, want: set[str], *, timeout: float = 30
) -> dict[str, int]:
    """Receive, open and acknowledge until caught up with every id in want; id -> offset."""
    got: dict[str, int] = {}
    dupes: list[str] = []
    sub = client.subscribe(["intel.>"])

    async def run() -> None:
        async for d in sub:
            mid = (await client.open(d)).header.message_id
            if mid in got:
                dupes.append(mid)
            got[mid] = d.offset
            await sub.ack([d.offset])

    task = asyncio.create_task(run())
    try:
        await eventually(
            lambda: task.done() or (sub.caught_up.is_set() and want <= got.keys()), timeout
        )
        if task.done():
            task.result()  # the stream failed: raise why
    finally:
        await sub.aclose()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert dupes == [], "a message was delivered twice in one subscription"
    return got


@contextlib.asynccontextmanager
async def clients(pki: Path, port: int, *codes: str) -> AsyncIterator[dict[str, PartnerClient]]:
    out = {c: partner(pki, c, port) for c in codes}
    try:
        yield out
    finally:
        for c in out.values():
            await c.close()


async def stats_backlog(op: OperatorClient, code: str) -> int:
    return {p.partner: p.backlog for p in (await op.stats()).partners}[code]


async def test_sigterm_while_publishing(pki: Path, broker_proc: BrokerProcess) -> None:
    await broker_proc.start()
    port = broker_proc.port
    for code in ("KOR", "USA"):
        await admit(pki, port, policy(code))
    async with clients(pki, port, "KOR", "USA") as c:
        await c["USA"].register_keys()
        pub = Publisher(c["KOR"])
        stop = asyncio.Event()
        task = asyncio.create_task(pub.run(stop))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while len(pub.accepted) < 50:
            assert not task.done(), pub.errors
            assert loop.time() < deadline, "publisher made no progress"
            await asyncio.sleep(0.01)
        broker_proc.signal(signal.SIGTERM)
        rc = await broker_proc.wait_exit()
        stop.set()
        await asyncio.wait_for(task, 30)
    assert rc == 0, broker_proc.log()
    # Every answer was an acceptance or an explicit refusal because of the shutdown; a call
    # that was cut off failed with UNAVAILABLE (or CANCELLED), none hung.
    for r in pub.refused:
        assert (r.status, r.reason_code) == ("UNAVAILABLE", "shutting_down"), r
    for e in pub.errors:
        assert e.status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), e
    assert pub.errors or pub.refused
    accepted = set(pub.accepted)
    await broker_proc.start()
    async with clients(pki, port, "USA") as c:
        got = await subscribe_until(c["USA"], accepted)
    assert accepted <= got.keys()
    assert got.keys() <= pub.sent
    assert all(got[m] == off for m, off in pub.accepted.items())
    async with operator(pki, "op1", port) as op:
        stats = await op.stats()
        assert stats.store_messages >= len(accepted)
        assert (await op.verify_audit()).ok
    broker_proc.signal(signal.SIGTERM)
    assert await broker_proc.wait_exit() == 0


async def test_sigkill_during_publish_burst_loses_nothing(
    pki: Path, broker_proc: BrokerProcess
) -> None:
    await broker_proc.start()
    port = broker_proc.port
    publishers = ("KOR", "GBR", "UKR")
    for code in (*publishers, "USA"):
        await admit(pki, port, policy(code))
    async with clients(pki, port, *publishers, "USA") as c, operator(pki, "op1", port) as op:
        usa = c["USA"]
        await usa.register_keys()
        # Before the burst: USA receives ten messages and acknowledges four of them.
        first: dict[str, int] = {}
        for i in range(10):
            s = await c["KOR"].seal(b"early %d" % i, topic=TOPIC, label=LABEL, recipients=["USA"])
            [r] = await c["KOR"].publish([s.envelope])
            assert r.outcome == exchange_pb2.ACCEPTED
            first[r.message_id] = r.offset
        by_offset = sorted(first, key=first.__getitem__)
        acked, owed = set(by_offset[:4]), set(by_offset[4:])
        sub = usa.subscribe(["intel.>"])
        seen: list[tuple[str, int]] = []

        async def receive() -> None:
            async for d in sub:
                mid = (await usa.open(d)).header.message_id
                seen.append((mid, d.offset))
                if mid in acked:
                    await sub.ack([d.offset])

        receiver = asyncio.create_task(receive())
        # The acknowledgements are durable once the broker's backlog for USA shrank by four.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while await stats_backlog(op, "USA") != 6:
            assert loop.time() < deadline, "acknowledgements not settled"
            await asyncio.sleep(0.05)
        # The burst: three publishers at once; SIGKILL once enough were accepted.
        burst = [Publisher(c[code]) for code in publishers]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(p.run(stop)) for p in burst]
        deadline = loop.time() + 30
        while sum(len(p.accepted) for p in burst) < 90:
            assert loop.time() < deadline, [p.errors for p in burst]
            await asyncio.sleep(0.005)
        broker_proc.signal(signal.SIGKILL)
        assert await broker_proc.wait_exit() == -signal.SIGKILL
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        stop.set()
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)
        sub.close()
    for p in burst:
        assert p.errors, "the kill cut every publisher off"
        assert all(
            e.status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) for e in p.errors
        )
        assert not p.refused
    promised = set().union(*(set(p.accepted) for p in burst))
    all_sent = set().union(*(p.sent for p in burst))
    await broker_proc.start()
    async with clients(pki, port, "USA") as c:
        got = await subscribe_until(c["USA"], owed | promised)
    # None lost: every message acknowledged to its publisher and not yet acknowledged by USA.
    assert (owed | promised) <= got.keys()
    # Redelivery only of unacknowledged messages: nothing USA acknowledged came back.
    assert not (acked & got.keys())
    # Anything else delivered was sent in the burst (stored, but its answer lost in the kill).
    assert got.keys() <= owed | all_sent
    offsets = {off for p in burst for off in p.accepted.values()}
    assert offsets <= set(got.values())
    # Every message stored has its acceptance in the audit log, exactly once, even one
    # whose entry the kill cut off (recorded as recovered when the broker started again).
    async with operator(pki, "op1", port) as op:
        entries = await op.audit(kind="publish.accepted")
        assert (await op.verify_audit()).ok
    accepted_ids = [e.message_id for e in entries]
    assert len(accepted_ids) == len(set(accepted_ids))
    assert set(got) <= set(accepted_ids)
    broker_proc.signal(signal.SIGTERM)
    assert await broker_proc.wait_exit() == 0


class SlowReadStore:
    """The broker's store, with one pending() read held back until an acknowledgement settled:
    the read's snapshot predates the acknowledgement, its answer arrives after it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.armed = False
        self.snapshot_taken = asyncio.Event()
        self.settled = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def pending_and_head(self, subscriber: str, limit: int, exclude: Any = ()) -> Any:
        # Exclude nothing, so the held-back read still holds the soon-acknowledged row.
        rows, head = await self.inner.pending_and_head(subscriber, limit)
        if self.armed and subscriber == "USA":
            self.armed = False
            self.snapshot_taken.set()
            await asyncio.wait_for(self.settled.wait(), 10)
        return rows, head

    async def settle(self, subscriber: str, offsets: Any) -> int:
        cursor = await self.inner.settle(subscriber, offsets)
        if subscriber == "USA":
            self.settled.set()
        return int(cursor)


async def test_ack_racing_a_store_read_is_not_redelivered(pki: Path, tmp_path: Path) -> None:
    # Every delivery read from the store (no live hand-over), so the second message is
    # also fetched by a store read: the race this test is about.
    b = await running_broker(pki, tmp_path / "broker", live_delivery=False)
    try:
        for code in ("KOR", "USA"):
            await admit(pki, b.port, policy(code))
        slow = SlowReadStore(b.exchange.store)
        b.exchange.store = slow
        async with clients(pki, b.port, "KOR", "USA") as c:
            kor, usa = c["KOR"], c["USA"]
            await usa.register_keys()
            sub = usa.subscribe(["intel.>"])
            got: list[int] = []

            async def receive() -> None:
                async for d in sub:
                    got.append(d.offset)

            task = asyncio.create_task(receive())
            s1 = await kor.seal(b"one", topic=TOPIC, label=LABEL, recipients=["USA"])
            [r1] = await kor.publish([s1.envelope])
            await eventually(lambda: got == [r1.offset] and sub.caught_up.is_set())
            slow.armed = True
            s2 = await kor.seal(b"two", topic=TOPIC, label=LABEL, recipients=["USA"])
            [r2] = await kor.publish([s2.envelope])
            await asyncio.wait_for(slow.snapshot_taken.wait(), 10)  # a read that still sees one
            await sub.ack([r1.offset])  # ... and one is acknowledged before the read returns
            await eventually(lambda: r2.offset in got)
            await sub.ack([r2.offset])
            await eventually(lambda: b.exchange.counters["USA"].delivered >= 2)
            sub.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert got == [r1.offset, r2.offset]  # one was not delivered a second time
    finally:
        await b.stop(grace=1)
