"""A coalition on a cluster, as real processes, for the fault tests and the cluster demo
test: three nats-server (``clients.cluster``), two brokers on the JetStream backend
(``[store] backend = "jetstream"``), node daemons that list both brokers, and a
publisher that resends an unanswered batch until every envelope in it is answered.

What the checks need is recorded here: the ids each publish acknowledged (accepted, or
refused as a replay of one stored before its answer was lost), and each node's inbox,
gaps and alarms.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from nats.js.api import StorageType, StreamConfig

from broker.jetstream.connect import ClusterSettings, connect
from clients.cluster import NatsCluster
from clients.sdk import ClientError, OperatorClient, PartnerClient, Sealed, Sequencer
from coalition.labels import Classification, parse_label
from coalition.pki import load_operator, load_partner
from coalition.v1 import exchange_pb2, intel_pb2
from tests.broker_process import ConfiguredBroker
from tests.helpers import admit, eventually, policy
from tests.node_helpers import start_daemon, stop, write_config

# KOR publishes to USA, GBR and UKR; the label releases to all three, but UKR is cleared
# only to CONFIDENTIAL: the broker must withhold every one of them from UKR (the key
# wrapped for it would let it open them).
LABEL = parse_label("NATO SECRET // REL TO USA, GBR, UKR")
TOPIC = "intel.ground"
ELIGIBLE = ("USA", "GBR")
INELIGIBLE = ("UKR",)
ALARM = "the broker may be withholding messages"
# A request refused as a whole while the broker cannot record or store (during a
# JetStream election, a shutdown): nothing of it was stored, the same envelopes may go again.
RETRY_LATER = {"audit_unavailable", "shutting_down", "cluster_unavailable", "registry_unavailable"}


def broker_toml(path: Path, cluster: NatsCluster, prefix: str) -> Path:
    """A broker config on the JetStream backend: the cluster's servers and monitors."""
    servers = ", ".join(f'"{u}"' for u in cluster.urls)
    monitor = ", ".join(f'"http://127.0.0.1:{n.monitor_port}"' for n in cluster.nodes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "[store]\n"
        'backend = "jetstream"\n'
        f"servers = [{servers}]\n"
        f"monitor = [{monitor}]\n"
        f'prefix = "{prefix}"\n'
    )
    return path


def broker_list(brokers: list[ConfiguredBroker], first: int = 0) -> str:
    """A client target naming every broker, starting with brokers[first]."""
    ports = [b.port for b in brokers[first:] + brokers[:first]]
    return "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)


@dataclass
class Node:
    """One partner's node daemon (a real `coalition-node run`)."""

    code: str
    config: Path
    log: Path
    proc: asyncio.subprocess.Process | None = None

    @property
    def db(self) -> Path:
        return self.config.parent / f"{self.code.lower()}-inbox.db"

    def rows(self, sql: str) -> list[tuple[object, ...]]:
        if not self.db.exists():
            return []
        with contextlib.closing(sqlite3.connect(self.db)) as c:
            return list(c.execute(sql))

    def inbox_ids(self) -> list[str]:
        return [str(r[0]) for r in self.rows("SELECT message_id FROM inbox")]

    def gaps(self) -> list[tuple[object, ...]]:
        return self.rows("SELECT sender, first_seq, last_seq FROM gaps")

    def alarms(self) -> list[str]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line for line in text.splitlines() if ALARM in line]


@dataclass
class Rig:
    """The cluster, the brokers and the nodes of one test."""

    pki: Path
    work: Path
    nats: NatsCluster
    prefix: str = field(default_factory=lambda: f"T{uuid.uuid4().hex[:10].upper()}")
    brokers: list[ConfiguredBroker] = field(default_factory=list)
    nodes: dict[str, Node] = field(default_factory=dict)

    async def placement_ready(self, timeout: float = 30) -> None:
        """Wait until the cluster can place an R3 stream (a freshly started cluster may
        still count a peer offline for a moment, and the first broker creates R3 streams)."""
        settings = ClusterSettings(servers=tuple(self.nats.urls), prefix=f"{self.prefix}_PROBE")
        nc = await connect(settings)
        try:
            js = nc.jetstream()
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                try:
                    await js.add_stream(
                        StreamConfig(
                            name=settings.name("PLACE"),
                            subjects=[settings.subject("place")],
                            num_replicas=3,
                            storage=StorageType.FILE,
                        )
                    )
                    await js.delete_stream(settings.name("PLACE"))
                    return
                except Exception:
                    if asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        finally:
            await nc.close()

    async def start_brokers(self, n: int = 2) -> None:
        await self.placement_ready()
        for i in range(n):
            toml = broker_toml(self.work / f"broker{i}" / "broker.toml", self.nats, self.prefix)
            b = ConfiguredBroker(
                self.pki, self.work / f"broker{i}" / "data", extra_args=["--config", str(toml)]
            )
            self.brokers.append(b)
            await b.start()

    async def admit_all(self) -> None:
        for code in ("KOR", *ELIGIBLE):
            await admit(self.pki, self.brokers[0].port, policy(code))
        for code in INELIGIBLE:
            pol = policy(code, level=Classification.CONFIDENTIAL)
            await admit(self.pki, self.brokers[0].port, pol)

    async def start_nodes(self) -> None:
        for i, code in enumerate((*ELIGIBLE, *INELIGIBLE)):
            d = self.work / "nodes" / code
            cfg = write_config(d / "node.toml", self.pki, code, 0)
            # Each node lists both brokers, starting with a different one.
            text = cfg.read_text().replace(
                'broker = "127.0.0.1:0"', f'broker = "{broker_list(self.brokers, i)}"'
            )
            cfg.write_text(text)
            node = Node(code, cfg, d / "node.log")
            node.proc = await start_daemon(cfg, node.log)
            self.nodes[code] = node
        for node in self.nodes.values():
            await eventually(lambda n=node: "caught up" in _text(n.log), 60)

    def operator(self, name: str, broker: int = 0) -> OperatorClient:
        return OperatorClient(
            load_operator(self.pki / "operators" / name), broker_list(self.brokers, broker)
        )

    async def close(self) -> None:
        for node in self.nodes.values():
            if node.proc is not None and node.proc.returncode is None:
                with contextlib.suppress(AssertionError):
                    await stop(node.proc)
        for b in self.brokers:
            b.cleanup()
        await asyncio.to_thread(self.nats.stop)


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def report(i: int) -> bytes:
    return intel_pb2.IntelSummary(title=f"report {i}", summary="cluster").SerializeToString()


@dataclass
class Publisher:
    """KOR publishing batches through the broker list; an unanswered batch is sent again,
    the same envelopes, until each is answered: accepted, or refused as a replay (it was
    stored before the answer was lost). A request refused as a whole for a while
    (``RETRY_LATER``: the audit stream electing a leader...) goes again too; any other
    refusal is recorded."""

    rig: Rig
    sequencer: Sequencer = field(default_factory=lambda: Sequencer(per_recipient=True))
    acked: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    retried_later: list[str] = field(default_factory=list)  # whole-request refusals
    resends: int = 0
    n: int = 0

    def client(self) -> PartnerClient:
        creds = load_partner(self.rig.pki / "partners" / "KOR")
        return PartnerClient(creds, broker_list(self.rig.brokers), sequencer=self.sequencer)

    async def run(self, count: int, batch: int = 5, deadline_s: float = 120) -> None:
        """Publish count more messages (all acknowledged when this returns)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        kor = self.client()
        try:
            goal = len(self.acked) + count
            retry: list[Sealed] = []
            while len(self.acked) < goal:
                sealed, retry = retry, []
                if len(sealed) < batch:
                    # One seal_many: one v2 batch, one signature for the request's envelopes.
                    first, self.n = self.n + 1, self.n + batch - len(sealed)
                    sealed += await kor.seal_many(
                        [report(i) for i in range(first, self.n + 1)],
                        topic=TOPIC,
                        label=LABEL,
                        recipients=[*ELIGIBLE, *INELIGIBLE],
                    )
                while True:
                    assert loop.time() < end, f"publishing stalled: {self.resends} resends"
                    try:
                        results = await asyncio.wait_for(
                            kor.publish([s.envelope for s in sealed]), 30
                        )
                        break
                    except (ClientError, TimeoutError):
                        self.resends += 1
                        await kor.close()
                        await asyncio.sleep(0.2)
                        kor = self.client()
                if any(r.reason_code in RETRY_LATER for r in results):
                    # Refused as a whole (nothing stored): the same envelopes again.
                    self.retried_later.extend(r.reason_code for r in results[:1])
                    await asyncio.sleep(0.3)
                    retry = sealed
                    continue
                for r in results:
                    if r.outcome == exchange_pb2.ACCEPTED or r.reason_code == "replay":
                        self.acked.append(r.message_id)
                    else:
                        self.refused.append(f"{r.message_id}: {r.reason_code} {r.reason}")
        finally:
            await kor.close()


async def check_delivered(rig: Rig, acked: list[str], timeout: float = 90) -> None:
    """Every acknowledged message in every eligible inbox exactly once, none in an
    ineligible one, no gap alarm, and the audit chain verifies through each broker."""
    want = set(acked)
    assert len(want) == len(acked), "an id was acknowledged twice"
    for code in ELIGIBLE:
        node = rig.nodes[code]
        try:
            await eventually(lambda n=node: want <= set(n.inbox_ids()), timeout)
        except AssertionError:
            missing = [m for m in acked if m not in set(node.inbox_ids())]
            raise AssertionError(
                f"{code} lacks {len(missing)} of {len(acked)} acknowledged messages "
                f"(first {missing[:3]}, at positions {[acked.index(m) for m in missing[:3]]}); "
                f"see {node.log}"
            ) from None
    await asyncio.sleep(1.5)  # one judgement round of the nodes' gap checks
    for code in ELIGIBLE:
        node = rig.nodes[code]
        ids = node.inbox_ids()
        assert len(ids) == len(set(ids)), f"{code}'s inbox holds a duplicate"
        assert set(ids) <= want, f"{code} holds a message never acknowledged"
        assert node.gaps() == [], f"{code}: {node.gaps()}"
        assert node.alarms() == [], node.alarms()
    for node in rig.nodes.values():
        held = node.rows("SELECT message_id, reason FROM quarantine")
        assert held == [], f"{node.code} was sent what it could not accept: {held[:3]}"
    for code in INELIGIBLE:
        assert rig.nodes[code].inbox_ids() == [], f"{code} received what it may not"
    for i, b in enumerate(rig.brokers):
        if b.proc is None or b.proc.poll() is not None:
            continue
        async with rig.operator("op1", i) as op:
            verdict = await op.verify_audit()
            assert verdict.ok, verdict
