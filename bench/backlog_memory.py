"""An idle subscriber must cost bounded broker memory: ``python -m bench.backlog_memory``.

Starts the broker in its own process, admits the bench partners, opens one
subscription (NATO, window 256) that is never read nor acknowledged after its
first status message, then publishes ``--messages`` sealed envelopes (1 KiB, 3
recipients) from KOR and USA. Reports broker RSS (VmRSS) before and after and the
peak (VmHWM), plus the store's size on disk; writes
bench/results/backlog_memory.json. The broker's design says a slow subscriber
costs store rows, not memory: RSS growth should not scale with the backlog.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.procstat import peak_rss_mb, rss_mb
from bench.rows import coalition
from bench.workload import (
    OPERATORS,
    PARTNERS,
    PUBLISHERS,
    SUBSCRIBE_TOPIC,
    Sealed,
    load_workload,
    seal_workload,
)
from clients.sdk import PartnerClient
from coalition.pki import load_partner, make_dev_pki
from coalition.v1 import envelope_pb2, exchange_pb2

ROOT = Path(__file__).resolve().parent.parent
IDLE = "NATO"
BATCH = 256


def progress(msg: str) -> None:
    print(f"[backlog {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def _publish(client: PartnerClient, messages: list[Sealed]) -> int:
    accepted = 0
    for i in range(0, len(messages), BATCH):
        envs = [envelope_pb2.Envelope.FromString(m.data) for m in messages[i : i + BATCH]]
        results = await client.publish(envs)
        accepted += sum(1 for r in results if r.outcome == exchange_pb2.ACCEPTED)
    return accepted


async def measure(count: int, window: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="coalition-backlog-") as tmp:
        work = Path(tmp)
        pki = work / "pki"
        make_dev_pki(pki, PARTNERS, OPERATORS, time.time_ns() // 1_000_000)
        t = time.monotonic()
        seal_workload(pki, count, work / "workload.pkl")
        messages = load_workload(work / "workload.pkl")
        progress(f"sealed {count} v2 envelopes in {time.monotonic() - t:.1f} s")
        server = await coalition.start_server(pki, work)
        try:
            idle = PartnerClient(load_partner(pki / "partners" / IDLE), server.target)
            await idle.wait_ready()
            await idle.register_keys()
            sub = idle.subscribe([SUBSCRIBE_TOPIC], window=window)
            never = asyncio.Event()

            async def read_one_then_stall() -> None:
                async for _ in sub:
                    await never.wait()  # hold the stream open; never read or ack again

            holder = asyncio.create_task(read_one_then_stall())
            await asyncio.wait_for(sub.caught_up.wait(), 30)
            pubs = {
                s: PartnerClient(load_partner(pki / "partners" / s), server.target)
                for s in PUBLISHERS
            }
            for p in pubs.values():
                await p.wait_ready()
                await p.register_keys()
            await asyncio.sleep(0.5)
            before = rss_mb(server.pid)
            progress(f"broker RSS before: {before:.1f} MiB; publishing {count} messages")
            t = time.monotonic()
            accepted = sum(
                await asyncio.gather(
                    *(_publish(pubs[s], [m for m in messages if m.sender == s]) for s in PUBLISHERS)
                )
            )
            elapsed = time.monotonic() - t
            await asyncio.sleep(1.0)
            after = rss_mb(server.pid)
            peak = peak_rss_mb(server.pid)
            store = sum(f.stat().st_size for f in (work / "broker-data").glob("messages.db*"))
            progress(f"accepted {accepted} in {elapsed:.1f} s; RSS after {after:.1f} MiB")
            sub.close()  # the stalled reader then sees the stream end and leaves cleanly
            never.set()
            # The closed call ends the reader with CancelledError (or an error): either way
            # it is done.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(holder, 10)
            for c in (idle, *pubs.values()):
                await c.close()
        finally:
            server.stop()
    return {
        "benchmark": "backlog memory (bench.backlog_memory)",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "messages": count,
        "accepted": accepted,
        "subscriber_window": window,
        "publish_s": round(elapsed, 2),
        "rss_before_mb": round(before, 1),
        "rss_after_mb": round(after, 1),
        "rss_growth_mb": round(after - before, 1),
        "peak_rss_mb": round(peak, 1),
        "store_on_disk_mb": round(store / 2**20, 1),
        "backlog_payload_mb": round(sum(len(m.data) for m in messages) / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Broker memory with a subscriber that never reads.")
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "backlog_memory.json")
    args = p.parse_args(argv)
    doc = asyncio.run(measure(args.messages, args.window))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(
        f"{doc['accepted']} of {doc['messages']} messages backlogged for an idle subscriber "
        f"(window {doc['subscriber_window']}; {doc['backlog_payload_mb']} MiB of envelopes, "
        f"store {doc['store_on_disk_mb']} MiB on disk)\n"
        f"broker RSS before {doc['rss_before_mb']} MiB, after {doc['rss_after_mb']} MiB "
        f"(growth {doc['rss_growth_mb']} MiB), peak {doc['peak_rss_mb']} MiB\nwrote {args.out}"
    )


if __name__ == "__main__":
    main()
