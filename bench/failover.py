"""How long an R3 JetStream stream is unwritable when its leader goes, and whether an
acknowledged write is ever lost: ``python -m bench.failover [--trials 20]``.

A real three-node cluster (``clients.cluster``, ``sync_interval: always``) holds one R3
file stream per scenario. One publisher sends messages one after another, each with its
own ``Nats-Msg-Id``, and retries a timed-out or refused publish with the same id (the
stream's duplicate window makes the retry safe). Once it is publishing steadily, the
stream's leader is SIGKILLed, SIGSTOPped (and resumed after ``--stop-s``), stopped with
SIGTERM (lame duck), or asked to step down (the planned-maintenance path). Per trial:

- ``outage_s``: from the fault to the acknowledgement of the first message first sent
  more than 50 ms after it (what a broker's publisher sees);
- ``stale_info``: whether the first ``stream_info`` read right after that
  acknowledgement reported a ``last_seq`` below the acknowledged sequence (and which
  server it named leader); it is then re-read until the election settles;
- after every trial the node is brought back and the whole stream is read back by
  sequence: every acknowledged id must be stored exactly once, at the sequence its
  acknowledgement named.

Prints a table of percentiles and writes JSON (``--out``). Timings are this machine's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.js.api import StorageType, StreamConfig

from clients.cluster import NatsCluster, NatsNode

FAULTS = ("kill", "stop", "term", "stepdown")
GRACE_S = 0.05
NO_ACK_S = 90.0


@dataclass
class Acked:
    msg_id: str
    seq: int
    duplicate: bool
    sent_at: float  # first attempt, monotonic
    acked_at: float
    attempts: int
    server: str  # the server the client was connected to when the ack arrived


@dataclass
class Trial:
    fault: str
    leader: str
    outage_s: float
    ack_seq: int
    first_info_last_seq: int
    first_info_leader: str
    stale_info: bool
    settled_after_s: float
    retries: int
    ack_via: str = ""  # the server the client was connected to when the first ack came
    stale_during: int = 0  # stream_info answers during the election below the last ack
    stale_example: str = ""


@dataclass
class Scenario:
    fault: str
    client: str  # "on-leader" or "elsewhere"
    publish_timeout_s: float
    trials: list[Trial] = field(default_factory=list)
    acked: int = 0
    lost: int = 0
    misplaced: int = 0
    duplicated: int = 0

    def summary(self) -> dict[str, Any]:
        outs = sorted(t.outage_s for t in self.trials)
        return {
            "fault": self.fault,
            "client": self.client,
            "publish_timeout_s": self.publish_timeout_s,
            "trials": len(outs),
            "outage_s": {
                "min": round(outs[0], 3) if outs else None,
                "p50": round(_pct(outs, 50), 3),
                "p90": round(_pct(outs, 90), 3),
                "max": round(outs[-1], 3) if outs else None,
                "mean": round(statistics.fmean(outs), 3) if outs else None,
            },
            "stale_info": sum(t.stale_info for t in self.trials),
            "stale_during_trials": sum(t.stale_during > 0 for t in self.trials),
            "stale_during_examples": [t.stale_example for t in self.trials if t.stale_example][:5],
            "acked": self.acked,
            "lost": self.lost,
            "misplaced": self.misplaced,
            "duplicated": self.duplicated,
        }


def _pct(xs: list[float], p: int) -> float:
    if not xs:
        return float("nan")
    k = max(0, min(len(xs) - 1, -(-p * len(xs) // 100) - 1))  # nearest rank
    return xs[k]


class Publisher:
    """Publishes one message at a time, retrying each with the same id until acked."""

    def __init__(self, nc: Client, subject: str, timeout: float, tag: str) -> None:
        self.nc = nc
        self.subject = subject
        self.timeout = timeout
        self.tag = tag
        self.acked: list[Acked] = []
        self.retries = 0
        self.last_error = ""
        self.n = 0
        self.stopping = False

    async def run(self) -> None:
        while not self.stopping:
            self.n += 1
            msg_id = f"{self.tag}-{self.n}"
            sent, attempts = time.monotonic(), 0
            while True:
                attempts += 1
                try:
                    reply = await self.nc.request(
                        self.subject,
                        msg_id.encode(),
                        timeout=self.timeout,
                        headers={"Nats-Msg-Id": msg_id},
                    )
                    body = json.loads(reply.data)
                    if "error" in body:  # e.g. 503 no quorum during the election
                        raise RuntimeError(body["error"])
                    info = self.nc._server_info  # the server that carried the reply
                    acked = Acked(
                        msg_id,
                        int(body["seq"]),
                        bool(body.get("duplicate", False)),
                        sent,
                        time.monotonic(),
                        attempts,
                        str(info.get("server_name", "")),
                    )
                except Exception as exc:
                    self.retries += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    await asyncio.sleep(0.05)
                    continue
                self.acked.append(acked)
                break


async def _connect(urls: list[str]) -> Client:
    nc: Client = await nats.connect(
        servers=urls,
        dont_randomize=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.1,
        connect_timeout=2,
        ping_interval=1,
        max_outstanding_pings=2,
    )
    return nc


async def _leader(nc: Client, stream: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = await nc.jetstream().stream_info(stream)
            if info.cluster is not None and info.cluster.leader:
                current = [r for r in info.cluster.replicas or () if r.current and not r.offline]
                if len(current) == 2:
                    return info.cluster.leader
        except Exception:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"stream {stream} has no leader with two current followers")


async def _read_during(rjs: Any, stream: str, acked_seq: int, found: list[str]) -> None:
    """stream_info every 50 ms until cancelled; answers below acked_seq are recorded."""
    while True:
        try:
            info = await rjs.stream_info(
                stream,
            )
            if info.state.last_seq < acked_seq:
                leader = info.cluster.leader if info.cluster else None
                found.append(
                    f"last_seq {info.state.last_seq} < acked {acked_seq} (leader {leader})"
                )
        except asyncio.CancelledError:
            raise
        except Exception:
            pass
        await asyncio.sleep(0.05)


async def _stream_check(nc: Client, stream: str, acked: list[Acked], sc: Scenario) -> None:
    """Read the stream back by sequence; every acked id stored once, at its seq."""
    js = nc.jetstream()
    info = await js.stream_info(stream)
    by_id: dict[str, list[int]] = {}
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        for _ in range(50):
            try:
                m = await js.get_msg(stream, seq)
                break
            except Exception:
                await asyncio.sleep(0.2)
        else:
            raise RuntimeError(f"cannot read seq {seq} of {stream}")
        mid = (m.headers or {}).get("Nats-Msg-Id", "")
        by_id.setdefault(mid, []).append(seq)
    for a in acked:
        seqs = by_id.get(a.msg_id, [])
        sc.acked += 1
        sc.lost += not seqs
        sc.duplicated += len(seqs) > 1
        sc.misplaced += bool(seqs) and a.seq not in seqs


async def _inject(node: NatsNode, fault: str, nc: Client, stream: str) -> None:
    if fault == "kill":
        node.kill()
    elif fault == "stop":
        node.signal(signal.SIGSTOP)
    elif fault == "term":
        node.signal(signal.SIGTERM)
    else:
        await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=10)


async def _heal(cluster: NatsCluster, node: NatsNode, fault: str, stop_s: float, t0: float) -> None:
    if fault == "stop":
        await asyncio.sleep(max(0.0, t0 + stop_s - time.monotonic()))
        node.signal(signal.SIGCONT)
    elif fault in ("kill", "term"):
        if fault == "term":
            await asyncio.to_thread(node.proc.wait if node.proc else (lambda: 0))
            node.kill()  # closes the log
        await asyncio.to_thread(cluster.restart, node)


async def run_scenario(cluster: NatsCluster, sc: Scenario, trials: int, stop_s: float) -> None:
    client = sc.client.upper().replace("-", "_")
    ms = int(sc.publish_timeout_s * 1000)
    stream = f"FAILOVER_{sc.fault.upper()}_{client}_{ms}"
    subject = f"failover.{stream.lower()}"
    admin = await _connect(cluster.urls)
    js = admin.jetstream()
    await js.add_stream(
        StreamConfig(name=stream, subjects=[subject], num_replicas=3, storage=StorageType.FILE)
    )
    acked_all: list[Acked] = []
    try:
        for i in range(trials):
            leader = await _leader(admin, stream)
            node = cluster.node(leader)
            others = [n.url for n in cluster.nodes if n.name != leader]
            urls = [node.url, *others] if sc.client == "on-leader" else [*others, node.url]
            nc = await _connect(urls)
            pub = Publisher(nc, subject, sc.publish_timeout_s, f"{stream}-{i}")
            task = asyncio.create_task(pub.run())
            while len(pub.acked) < 30:  # noqa: ASYNC110 - polls the publisher's list
                await asyncio.sleep(0.02)
            reader = await _connect(others)
            rjs = reader.jetstream()
            t0 = time.monotonic()
            await _inject(node, sc.fault, admin, stream)
            before = max(a.seq for a in pub.acked if a.acked_at < t0)
            # Read stream_info during the election too: does any answer go backwards?
            stale_during: list[str] = []
            during = asyncio.create_task(_read_during(rjs, stream, before, stale_during))
            # A signal takes effect a moment after kill(2) returns: a message sent within
            # GRACE_S of it may still be answered by the old leader.
            while not any(a.sent_at >= t0 + GRACE_S for a in pub.acked):
                if time.monotonic() - t0 > NO_ACK_S:
                    raise RuntimeError(
                        f"{sc.fault} trial {i + 1}: no acknowledgement {NO_ACK_S:.0f} s after "
                        f"the fault (publisher connected: {nc.is_connected}, "
                        f"task done: {task.done()}, last error: {pub.last_error})"
                    )
                await asyncio.sleep(0.005)
            first = next(a for a in pub.acked if a.sent_at >= t0 + GRACE_S)
            during.cancel()
            await asyncio.gather(during, return_exceptions=True)
            # The first read after the ack, through a connection not on the old leader.
            try:
                info = await rjs.stream_info(stream)
                first_seq = info.state.last_seq
                first_leader = (info.cluster.leader if info.cluster else "") or ""
            except Exception:
                first_seq, first_leader = -1, "(no answer)"
            settle0 = time.monotonic()
            settled = -1.0  # stays so if no answer reached the acknowledged sequence
            while time.monotonic() - settle0 < NO_ACK_S:
                try:
                    info = await rjs.stream_info(stream)
                    if info.state.last_seq >= first.seq:
                        settled = time.monotonic() - settle0
                        break
                except Exception:
                    pass
                await asyncio.sleep(0.05)
            await reader.close()
            await _heal(cluster, node, sc.fault, stop_s, t0)
            await asyncio.sleep(0.3)
            pub.stopping = True
            await task
            await nc.close()
            acked_all += pub.acked
            sc.trials.append(
                Trial(
                    sc.fault,
                    leader,
                    first.acked_at - t0,
                    first.seq,
                    first_seq,
                    first_leader,
                    0 <= first_seq < first.seq,
                    settled,
                    pub.retries,
                    first.server,
                    len(stale_during),
                    stale_during[0] if stale_during else "",
                )
            )
            t = sc.trials[-1]
            print(
                f"  {sc.fault:8} {sc.client:9} t={sc.publish_timeout_s:3} trial {i + 1:2}: "
                f"leader {leader} outage {t.outage_s:6.2f} s, ack seq {t.ack_seq}, "
                f"first info last_seq {t.first_info_last_seq} ({t.first_info_leader})",
                file=sys.stderr,
                flush=True,
            )
        await _leader(admin, stream)
        await _stream_check(admin, stream, acked_all, sc)
    finally:
        await admin.close()


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="coalition-failover-") as tmp:
        cluster = NatsCluster(Path(tmp))
        cluster.start()
        try:
            for fault in args.faults.split(","):
                for client in args.clients.split(","):
                    for timeout in (float(t) for t in args.timeouts.split(",")):
                        sc = Scenario(fault, client, timeout)
                        await run_scenario(cluster, sc, args.trials, args.stop_s)
                        s = sc.summary()
                        s["trials_detail"] = [asdict(t) for t in sc.trials]
                        out.append(s)
                        print(
                            json.dumps({k: v for k, v in s.items() if k != "trials_detail"}),
                            file=sys.stderr,
                            flush=True,
                        )
        finally:
            cluster.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="JetStream R3 leader failover on this machine.")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--faults", default="kill,stop,term,stepdown", help=",".join(FAULTS))
    p.add_argument("--clients", default="elsewhere,on-leader")
    p.add_argument("--timeouts", default="2.0,0.5", help="publish timeouts to try, seconds")
    p.add_argument("--stop-s", type=float, default=15.0, help="how long SIGSTOP lasts")
    p.add_argument("--out", type=Path, default=Path("bench/results/failover.json"))
    args = p.parse_args(argv)
    results = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(
        f"{'fault':9} {'client':10} {'timeout':>7} {'n':>3} {'p50':>6} {'p90':>6} "
        f"{'max':>6} {'stale':>5} {'during':>6} {'acked':>6} {'lost':>4} {'dup':>4}"
    )
    for s in results:
        o = s["outage_s"]
        print(
            f"{s['fault']:9} {s['client']:10} {s['publish_timeout_s']:7} {s['trials']:3} "
            f"{o['p50']:6.2f} {o['p90']:6.2f} {o['max']:6.2f} {s['stale_info']:5} "
            f"{s['stale_during_trials']:6} {s['acked']:6} {s['lost']:4} {s['duplicated']:4}"
        )
    return 1 if any(s["lost"] or s["misplaced"] or s["duplicated"] for s in results) else 0


if __name__ == "__main__":
    sys.exit(main())
