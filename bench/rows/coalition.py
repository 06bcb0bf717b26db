"""The ``coalition`` and ``coalition-cluster`` rows: our broker (``coalition-broker
serve``) end to end.

Mutual TLS, signature verification, policy, durable SQLite store with group commit,
hash-chained audit; clients are ``clients.sdk.PartnerClient``: publish in batches on
one stream, subscribe with a window, open through the SDK, acknowledge in batches.
coalition-cluster: two brokers on the JetStream backend over three clustered
nats-server (R3, sync always), each partner's connections on one of the brokers.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.rows import OnOpened, RowSpec
from bench.servers import ServerGroup, ServerProcess, spawn, wait_port_file
from bench.workload import OPERATORS, PARTNERS, SUBSCRIBE_TOPIC, Sealed
from clients.cluster import NatsCluster
from clients.sdk import OperatorClient, PartnerClient, Subscription
from coalition.labels import Classification
from coalition.pki import load_operator, load_partner
from coalition.policy import PartnerPolicy, PartnerStatus, policy_to_proto
from coalition.v1 import envelope_pb2, exchange_pb2

# The envelopes are sealed before the rows run, so created_ms may be minutes old by
# the last row; the bench widens the broker's skew window rather than re-sealing.
CLOCK_SKEW_MS = 3_600_000
# High enough that the per-partner rate limit never shapes the measurement.
BENCH_RATE_PER_S = 1_000_000
WINDOW = 256  # the broker's maximum subscriber window (BrokerConfig.subscriber_window)
ACK_EVERY = 32
ACK_FLUSH_S = 0.005


def bench_policy(code: str) -> PartnerPolicy:
    """Everyone may publish and subscribe intel.>; no groups, so REL TO names exactly 3."""
    return PartnerPolicy(
        partner=code,
        status=PartnerStatus.ACTIVE,
        clearances={"NATO": Classification.SECRET},
        publish_topics=("intel.>",),
        subscribe_topics=("intel.>",),
        origination_ceilings={"NATO": Classification.SECRET},
        publish_rate_per_s=BENCH_RATE_PER_S,
    )


async def start_server(
    pki: Path, workdir: Path, *, name: str = "coalition", admit: bool = True, **extra: str
) -> ServerProcess:
    """Start the broker in its own process and admit the 5 partners (two operators)."""
    data = workdir / f"{name}-data"
    port_file = workdir / f"{name}.port"
    argv = [
        sys.executable,
        "-m",
        "broker.cli",
        "serve",
        "--pki",
        str(pki),
        "--data",
        str(data),
        "--listen",
        "127.0.0.1:0",
        "--operators",
        ",".join(OPERATORS),
        "--clock-skew-ms",
        str(CLOCK_SKEW_MS),
        "--log-level",
        "warning",
        "--port-file",
        str(port_file),
    ]
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", v]
    proc, log = spawn(name, argv, workdir)
    port = await wait_port_file(proc, port_file, workdir / f"{name}.log", timeout=60)
    server = ServerProcess(name, proc, port, log)
    if admit:
        await admit_all(pki, server.target)
    return server


async def start_cluster(pki: Path, workdir: Path, brokers: int = 2) -> ServerGroup:
    """Three clustered nats-server and ``brokers`` brokers on the JetStream backend; the
    partners are admitted through the first (the registry is shared)."""
    cluster = NatsCluster(workdir / "nats")
    await asyncio.to_thread(cluster.start)
    servers = ", ".join(f'"{u}"' for u in cluster.urls)
    monitor = ", ".join(f'"http://127.0.0.1:{n.monitor_port}"' for n in cluster.nodes)
    conf = workdir / "cluster.toml"
    conf.write_text(
        f'[store]\nbackend = "jetstream"\nservers = [{servers}]\nmonitor = [{monitor}]\n'
    )
    started: list[ServerProcess] = []
    try:
        for i in range(brokers):
            started.append(
                await start_server(
                    pki, workdir, name=f"coalition-{i + 1}", admit=i == 0, config=str(conf)
                )
            )
    except BaseException:
        for b in started:
            b.stop()
        cluster.stop()
        raise

    def stop() -> int | None:
        codes = [b.stop() for b in started]
        cluster.stop()
        return next((c for c in codes if c not in (0, -15, None)), 0)

    pids = [b.pid for b in started] + [n.pid for n in cluster.nodes]
    kinds = ["broker"] * len(started) + ["nats-server"] * len(cluster.nodes)
    return ServerGroup("coalition-cluster", pids, [b.target for b in started], stop, kinds)


def broker_for(spec: RowSpec, code: str) -> str:
    """The broker a partner uses: a cluster row's brokers are shared out by partner."""
    targets = spec.target.split(",")
    return targets[PARTNERS.index(code) % len(targets)]


async def admit_all(pki: Path, target: str) -> None:
    op1 = OperatorClient(load_operator(pki / "operators" / OPERATORS[0]), target)
    op2 = OperatorClient(load_operator(pki / "operators" / OPERATORS[1]), target)
    async with op1, op2:
        for code in PARTNERS:
            creds = load_partner(pki / "partners" / code)
            pol = policy_to_proto(bench_policy(code))
            resp = await op1.admit(code, creds.signing_cert_der, pol, "bench")
            if resp.WhichOneof("result") == "proposal":
                await op2.approve(resp.proposal.proposal_id, "bench")


class CoalitionPublisher:
    def __init__(self, spec: RowSpec, sender: str) -> None:
        self.sender = sender
        self.client = PartnerClient(
            load_partner(Path(spec.pki) / "partners" / sender), broker_for(spec, sender)
        )

    async def connect(self) -> None:
        await self.client.wait_ready()
        await self.client.register_keys()

    async def send(self, batch: Sequence[Sealed]) -> int:
        envelopes = [envelope_pb2.Envelope.FromString(m.data) for m in batch]
        results = await self.client.publish(envelopes)
        refused = [r.reason_code for r in results if r.outcome != exchange_pb2.ACCEPTED]
        if refused:  # say why, once per batch: a refusal is not a benchmark result
            reasons = ", ".join(f"{c} x{refused.count(c)}" for c in sorted(set(refused)))
            print(f"[bench] {self.sender}: refused {reasons}", file=sys.stderr, flush=True)
        return len(results) - len(refused)

    async def close(self) -> None:
        await self.client.close()


class CoalitionReceiver:
    def __init__(self, spec: RowSpec, code: str) -> None:
        self.client = PartnerClient(
            load_partner(Path(spec.pki) / "partners" / code), broker_for(spec, code)
        )
        self.sub: Subscription | None = None
        self.pending: list[int] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, on_opened: OnOpened) -> None:
        await self.client.wait_ready()
        await self.client.register_keys()
        await self.client.directory(refresh=True)
        self.sub = self.client.subscribe([SUBSCRIBE_TOPIC], window=WINDOW)
        self.tasks = [
            asyncio.create_task(self._receive(self.sub, on_opened)),
            asyncio.create_task(self._flush(self.sub)),
        ]
        await asyncio.wait_for(self.sub.caught_up.wait(), 30)

    async def _receive(self, sub: Subscription, on_opened: OnOpened) -> None:
        async for d in sub:
            opened = await self.client.open(d)
            on_opened(opened.header.message_id)
            self.pending.append(d.offset)
            if len(self.pending) >= ACK_EVERY:
                offsets, self.pending = self.pending, []
                await sub.ack(offsets)

    async def _flush(self, sub: Subscription) -> None:
        while True:
            await asyncio.sleep(ACK_FLUSH_S)
            if self.pending:
                offsets, self.pending = self.pending, []
                await sub.ack(offsets)

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.sub is not None:
            self.sub.close()
        await self.client.close()
