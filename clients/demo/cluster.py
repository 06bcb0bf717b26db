"""`coalition-demo --cluster`: the same scenario served by two brokers over a three-node
NATS JetStream cluster, then a machine lost of each kind in the middle of an exchange.

Three ``nats-server`` (``clients.cluster``: JetStream, file storage, ``sync_interval:
always``, clustered on loopback) hold the messages, cursors, registry and audit log; two
brokers on the JetStream backend serve them. Operators and nodes list both brokers and
start with different ones, so the five nations are spread over them and move to the
other when theirs goes. After the eight steps, KOR publishes a burst; one nats-server and
one broker are SIGKILLed in the middle of it; an unanswered batch is sent again (the
same envelopes: a replay refusal means it was stored before its answer was lost). Then:
every acknowledged message is in every eligible inbox, no inbox holds a duplicate, no
node raised a gap alarm, and the audit chain verifies through the surviving broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from clients.cluster import NatsCluster
from clients.demo.procs import Proc, python_module, wait_for_file
from clients.demo.scenario import OPERATORS, PARTNERS, Demo
from clients.node.sequences import DurableSequencer
from clients.sdk import ClientError, PartnerClient
from coalition.labels import parse_label
from coalition.pki import load_partner
from coalition.v1 import exchange_pb2, intel_pb2

BROKERS = 2
BURST = 60  # messages KOR publishes in the failover step
BATCH = 5
FAILOVER_LABEL = "NATO SECRET // REL TO NATO, KOR, UKR"
FAILOVER_ELIGIBLE = ("USA", "UKR", "NATO")  # GBR was suspended in step 6
ALARM = "the broker may be withholding messages"
# Whole-request refusals that say "not now" (nothing stored): the same envelopes go again.
RETRY_LATER = {"audit_unavailable", "shutting_down", "cluster_unavailable", "registry_unavailable"}


class ClusterDemo(Demo):
    """The scenario on two brokers over three nats-server, plus the failover step."""

    def __init__(self, work: Path, *, out: Callable[[str], None], deadline_ms: int) -> None:
        super().__init__(work, out=out, deadline_ms=deadline_ms)
        self.nats: NatsCluster | None = None
        self.brokers: list[Proc] = []
        self.ports: list[int] = []

    def targets(self, first: int) -> str:
        """Every broker, starting with brokers[first] (a gRPC address list)."""
        ports = self.ports[first:] + self.ports[:first]
        return "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)

    def start_broker(self) -> None:
        self.nats = NatsCluster(self.work / "nats")
        self.nats.start()
        self.say(
            "nats",
            "3 nats-server clustered on loopback (JetStream, sync_interval always, R3): "
            + ", ".join(f"{n.name} pid {n.pid}" for n in self.nats.nodes),
        )
        for i in range(BROKERS):
            self.brokers.append(self._start_one(i))
        self.address = self.targets(0)
        self.broker = self.brokers[0]  # the base class's shutdown stops it too

    def _start_one(self, i: int, port: int = 0) -> Proc:
        assert self.nats is not None
        conf = self.work / f"broker{i}.toml"
        servers = ", ".join(f'"{u}"' for u in self.nats.urls)
        monitor = ", ".join(f'"http://127.0.0.1:{n.monitor_port}"' for n in self.nats.nodes)
        conf.write_text(
            f'[store]\nbackend = "jetstream"\nservers = [{servers}]\nmonitor = [{monitor}]\n'
        )
        port_file = self.work / f"broker{i}.port"
        port_file.unlink(missing_ok=True)
        proc = Proc(
            f"broker {i + 1}",
            python_module(
                "broker.cli",
                "serve",
                "--config",
                str(conf),
                "--pki",
                str(self.pki),
                "--data",
                str(self.work / f"broker{i}"),
                "--listen",
                f"127.0.0.1:{port}",
                "--operators",
                ",".join(OPERATORS),
                "--audit-checkpoint-every",
                "25",
                "--port-file",
                str(port_file),
            ),
            self.work / "logs" / f"broker{i}.log",
        )
        proc.start()
        bound = int(wait_for_file(port_file, proc, timeout=60))
        if i < len(self.ports):
            self.ports[i] = bound
        else:
            self.ports.append(bound)
        self.say(
            "broker",
            f"{proc.name} serving on 127.0.0.1:{bound}, JetStream backend (pid {proc.pid})",
        )
        return proc

    def node_config(self, code: str) -> Path:
        cfg = self.work / "nodes" / code / "node.toml"
        if not cfg.exists():
            first = PARTNERS.index(code) % BROKERS
            cfg.parent.mkdir(parents=True, exist_ok=True)
            cfg.write_text(
                f'broker = "{self.targets(first)}"\n'
                f'identity = "{self.pki / "partners" / code}"\n'
                f'inbox = "{cfg.parent / "inbox.db"}"\n'
                'topics = ["intel.>"]\n'
            )
        return cfg

    async def run(self) -> None:
        await super().run()
        await self.step9_failover()

    async def step9_failover(self) -> None:
        assert self.nats is not None
        self.out(f"\n9. KOR publishes {BURST} reports; one nats-server and one broker die mid-way")
        seq = DurableSequencer(self.work / "nodes" / "KOR" / "inbox.db")
        creds = load_partner(self.pki / "partners" / "KOR")
        label = parse_label(FAILOVER_LABEL)
        acked: list[str] = []
        resends = later = 0
        kor = PartnerClient(creds, self.targets(1), sequencer=seq)
        nats_victim = self.nats.nodes[0]
        try:
            for b in range(BURST // BATCH):
                if b == 3:
                    nats_victim.kill()
                    self.say("fault", f"SIGKILL nats-server {nats_victim.name}")
                if b == 6:
                    assert self.brokers[1].popen is not None
                    self.brokers[1].popen.send_signal(signal.SIGKILL)
                    self.brokers[1].popen.wait()
                    self.say("fault", f"SIGKILL {self.brokers[1].name} (KOR's broker)")
                sealed = []
                for j in range(BATCH):
                    body = intel_pb2.IntelSummary(
                        title=f"Northern corridor update {b * BATCH + j + 1}",
                        summary="Convoy movement observed.",
                    ).SerializeToString()
                    sealed.append(
                        await kor.seal(
                            body,
                            topic="intel.ground",
                            label=label,
                            recipients=list(FAILOVER_ELIGIBLE),
                        )
                    )
                results: list[exchange_pb2.PublishResult] = []
                for _ in range(120):
                    try:
                        results = await asyncio.wait_for(
                            kor.publish([s.envelope for s in sealed]), 30
                        )
                    except (ClientError, TimeoutError):
                        resends += 1
                        await kor.close()
                        await asyncio.sleep(0.5)
                        kor = PartnerClient(creds, self.targets(1), sequencer=seq)
                        continue
                    if not any(r.reason_code in RETRY_LATER for r in results):
                        break
                    # Refused as a whole while the cluster elects a leader: nothing of it
                    # was stored, so the same envelopes go again.
                    later += 1
                    await asyncio.sleep(0.5)
                for r in results:
                    if r.outcome == exchange_pb2.ACCEPTED or r.reason_code == "replay":
                        acked.append(r.message_id)
        finally:
            await kor.close()
            seq.close()
        self.say(
            "publish",
            f"{len(acked)}/{BURST} acknowledged to KOR; {resends} batch(es) sent again "
            f"after the broker died, {later} after a refusal while the cluster elected a leader",
        )
        self.expect("9", f"every one of KOR's {BURST} reports acknowledged", len(acked) == BURST)
        await self._check_failover(acked)
        await asyncio.to_thread(self.nats.restart, nats_victim)
        self.say("nats", f"nats-server {nats_victim.name} restarted; it catches up from the others")

    async def _check_failover(self, acked: list[str]) -> None:
        want = set(acked)
        deadline = time.monotonic() + 90
        missing: dict[str, int] = {}
        while time.monotonic() < deadline:
            missing = {
                c: len(want - {e.message_id for e in self.inbox(c)}) for c in FAILOVER_ELIGIBLE
            }
            if not any(missing.values()):
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)  # one round of the nodes' gap judgement
        for code in FAILOVER_ELIGIBLE:
            self.expect(
                "9",
                f"{code} holds every acknowledged report",
                missing.get(code, 1) == 0,
                f"{missing.get(code)} missing" if missing.get(code) else "",
            )
        self.expect(
            "9",
            "GBR (suspended) holds none of them",
            not want & {e.message_id for e in self.inbox("GBR")},
        )
        dupes = {c: _duplicates(self.work / "nodes" / c / "inbox.db") for c in PARTNERS}
        self.expect(
            "9",
            "no inbox holds a duplicate",
            not any(dupes.values()),
            ", ".join(f"{c}: {n}" for c, n in dupes.items() if n),
        )
        alarms = {c: _alarms(p.log) for c, p in self.nodes.items()}
        self.expect(
            "9",
            "no node raised a gap alarm",
            not any(alarms.values()),
            ", ".join(f"{c}: {n}" for c, n in alarms.items() if n),
        )
        async with self.operator("op2") as op:
            res = await op.verify_audit()
        self.expect(
            "9",
            "the audit chain verifies through the surviving broker",
            res.ok,
            f"{res.entries} entries, {res.checkpoints} checkpoints"
            + (f"; {res.problem}" if res.problem else ""),
        )

    def shutdown(self) -> None:
        for proc in self.brokers[1:]:
            proc.stop()
        super().shutdown()
        if self.nats is not None:
            self.nats.stop()
            self.say("nats", "stopped")


def _duplicates(db: Path) -> int:
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(db)) as c:
        row = c.execute(
            "SELECT COUNT(*) - COUNT(DISTINCT sender || '/' || message_id) FROM inbox"
        ).fetchone()
    return int(row[0])


def _alarms(log: Path) -> int:
    if not log.exists():
        return 0
    return sum(ALARM in line for line in log.read_text(errors="replace").splitlines())
