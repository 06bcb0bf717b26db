"""Broker end-to-end rate: ``python -m bench.broker_rate [--messages N] [--batch B] [--json]``.

One process, one event loop: a broker on 127.0.0.1 port 0 (temporary PKI and SQLite
files, mutual TLS, fsync on commit), five partners admitted by two operators, two
publishers each sending N sealed 1 KiB messages releasable to (and sealed for) three
partners, in batches, and three subscribers that verify, decrypt and acknowledge every
delivery. Envelopes are sealed before the clock starts, so the publish rate is the
broker's; the latency is from handing a batch to the client until a subscriber opened
the message (p50/p99 over every message x subscriber). Everything shares one CPU core
(the GIL), so these are floors for a broker on its own machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from broker.config import BrokerConfig
from broker.server import start_broker
from clients.sdk import OperatorClient, PartnerClient
from coalition.labels import Classification, parse_label
from coalition.pki import load_operator, load_partner, make_dev_pki
from coalition.policy import PartnerPolicy, PartnerStatus, policy_to_proto
from coalition.v1 import envelope_pb2, exchange_pb2

PUBLISHERS = ("KOR", "USA")
SUBSCRIBERS = ("GBR", "UKR", "FRA")
LABEL = parse_label("NATO SECRET // REL TO GBR, UKR, FRA")
TOPIC = "intel.ground"


@dataclass(frozen=True)
class Result:
    messages: int  # accepted, over all publishers
    deliveries: int  # opened, over all subscribers
    publish_per_s: float
    delivery_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    seconds: float
    batch: int
    window: int
    python: str
    grpc: str


def _ms() -> float:
    return time.perf_counter() * 1000


async def _admit(pki: Path, target: str, code: str) -> None:
    pol = PartnerPolicy(
        partner=code,
        status=PartnerStatus.ACTIVE,
        clearances={"NATO": Classification.SECRET},
        publish_topics=("intel.>",),
        subscribe_topics=("intel.>",),
        origination_ceilings={"NATO": Classification.SECRET},
    )
    creds = load_partner(pki / "partners" / code)
    async with (
        OperatorClient(load_operator(pki / "operators" / "op1"), target) as op1,
        OperatorClient(load_operator(pki / "operators" / "op2"), target) as op2,
    ):
        resp = await op1.admit(code, creds.signing_cert_der, policy_to_proto(pol), "bench")
        await op2.approve(resp.proposal.proposal_id, "bench")


async def run(messages: int, batch: int, window: int = 256) -> Result:
    with tempfile.TemporaryDirectory(prefix="coalition-bench-") as tmp:
        root = Path(tmp)
        pki = root / "pki"
        make_dev_pki(pki, (*PUBLISHERS, *SUBSCRIBERS), ("op1", "op2"), time.time_ns() // 10**6)
        cfg = BrokerConfig(
            listen="127.0.0.1:0",
            pki_dir=pki,
            data_dir=root / "data",
            operators=("op1", "op2"),
            default_publish_rate_per_s=1_000_000,  # measure the broker, not the rate limit
        )
        broker = await start_broker(cfg)
        target = f"127.0.0.1:{broker.port}"
        try:
            for code in (*PUBLISHERS, *SUBSCRIBERS):
                await _admit(pki, target, code)
            pubs = [PartnerClient(load_partner(pki / "partners" / c), target) for c in PUBLISHERS]
            subs = [PartnerClient(load_partner(pki / "partners" / c), target) for c in SUBSCRIBERS]
            for s in subs:
                await s.register_keys()
            # Seal everything first (each: three ML-KEM-768+X25519 encapsulations).
            sealed: list[list[envelope_pb2.Envelope]] = []
            for p in pubs:
                envs = []
                for i in range(messages):
                    payload = os.urandom(1016) + i.to_bytes(8, "big")
                    one = await p.seal(payload, topic=TOPIC, label=LABEL, recipients=SUBSCRIBERS)
                    envs.append(one.envelope)
                sealed.append(envs)
            sent_at: dict[str, float] = {}
            latencies: list[float] = []
            opened = 0
            expected = len(pubs) * messages * len(subs)
            all_opened = asyncio.Event()

            async def subscribe(client: PartnerClient) -> None:
                nonlocal opened
                sub = client.subscribe(["intel.>"], window=window)
                async for d in sub:
                    o = await client.open(d)
                    latencies.append(_ms() - sent_at[o.header.message_id])
                    await sub.ack([d.offset])
                    opened += 1
                    if opened == expected:
                        all_opened.set()

            async def publish(client: PartnerClient, envs: list[envelope_pb2.Envelope]) -> int:
                accepted = 0
                for i in range(0, len(envs), batch):
                    chunk = envs[i : i + batch]
                    now = _ms()
                    for e in chunk:
                        sent_at[envelope_pb2.Header.FromString(e.header).message_id] = now
                    results = await client.publish(chunk)
                    accepted += sum(r.outcome == exchange_pb2.ACCEPTED for r in results)
                return accepted

            readers = [asyncio.create_task(subscribe(s)) for s in subs]
            start = _ms()
            counts = await asyncio.gather(
                *(publish(p, e) for p, e in zip(pubs, sealed, strict=True))
            )
            published_ms = _ms() - start
            await asyncio.wait_for(all_opened.wait(), 600)
            delivered_ms = _ms() - start
            for t in readers:
                t.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            for c in (*pubs, *subs):
                await c.close()
        finally:
            await broker.stop(grace=1)
    q = statistics.quantiles(latencies, n=100)
    return Result(
        messages=sum(counts),
        deliveries=len(latencies),
        publish_per_s=round(sum(counts) / (published_ms / 1000), 1),
        delivery_per_s=round(len(latencies) / (delivered_ms / 1000), 1),
        latency_p50_ms=round(q[49], 1),
        latency_p99_ms=round(q[98], 1),
        seconds=round(delivered_ms / 1000, 2),
        batch=batch,
        window=window,
        python=platform.python_version(),
        grpc=grpc.__version__,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--messages", type=int, default=1000, help="per publisher (default 1000)")
    ap.add_argument("--batch", type=int, default=50, help="envelopes per Publish request")
    ap.add_argument("--window", type=int, default=256, help="subscriber window (default 256)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ns = ap.parse_args(argv)
    res = asyncio.run(run(ns.messages, ns.batch, ns.window))
    if ns.json:
        print(json.dumps(asdict(res)))
        return
    print(
        f"{res.messages} messages x {len(SUBSCRIBERS)} subscribers, batch {res.batch}, "
        f"window {res.window}, "
        f"{res.seconds} s (Python {res.python}, grpcio {res.grpc})"
    )
    print(f"  publish   {res.publish_per_s:>9.1f} accepted msgs/s")
    print(f"  delivery  {res.delivery_per_s:>9.1f} opened deliveries/s")
    print(
        f"  latency   p50 {res.latency_p50_ms} ms, p99 {res.latency_p99_ms} ms (publish -> opened)"
    )


if __name__ == "__main__":
    main()
