"""JetStream message store appends: ``python -m bench.store_jetstream [--seconds S]``.

A rough micro-benchmark, not a test: starts three nats-server processes clustered on
loopback (R3, fsync always; ``clients.cluster``), opens one JetStreamMessageStore and
appends 1 KiB messages, each append carrying one acceptance record, for S seconds per
row: one caller appending batches of 1 and of 16 messages, then 16 concurrent callers
appending single messages (group commit puts them in one atomic batch). Prints
appends/s, messages/s and atomic batches committed per row. With ``--two``, the same
with two stores (two connections, as two brokers) appending for different senders at
once, which makes them contend for the stream's tail. Each row also prints the pinned
commits refused because another store committed first (lost races) and each append's
time, mean and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from broker.jetstream.connect import ClusterSettings, connect
from broker.jetstream.store import JetStreamMessageStore
from broker.store import NewMessage, StoredMessage
from clients.cluster import NatsCluster


def _message(sender: str, seq: int) -> NewMessage:
    envelope = hashlib.sha256(f"{sender}/{seq}".encode()).digest() * 32  # 1 KiB
    return NewMessage(
        f"{sender}-{seq}", sender, seq, "bench.topic", 1, 1, b"label", 0, 0, envelope,
        hashlib.sha256(envelope).digest(),
    )  # fmt: skip


def _records(stored: Sequence[StoredMessage]) -> list[str]:
    return [f"accepted {m.message_id} at {m.offset}" for m in stored]


async def _writer(
    store: JetStreamMessageStore, sender: str, batch: int, until: float, took: list[float]
) -> int:
    seq = appends = 0
    while time.monotonic() < until:
        msgs = [_message(sender, seq + i + 1) for i in range(batch)]
        seq += batch
        t0 = time.perf_counter()
        await store.append(msgs, now_ms=1, records=_records)
        took.append(time.perf_counter() - t0)
        appends += 1
    return appends


async def _row(
    stores: Sequence[JetStreamMessageStore], name: str, batch: int, callers: int, seconds: float
) -> None:
    before = sum(s.commits for s in stores)
    lost_before = sum(s._committer.lost for s in stores)
    waits: list[float] = []
    until = time.monotonic() + seconds
    started = time.monotonic()
    counts = await asyncio.gather(
        *(
            _writer(stores[i % len(stores)], f"{name}{i}", batch, until, waits)
            for i in range(callers * len(stores))
        )
    )
    took = time.monotonic() - started
    appends = sum(counts)
    commits = sum(s.commits for s in stores) - before
    lost = sum(s._committer.lost for s in stores) - lost_before
    waits.sort()
    mean = sum(waits) / max(len(waits), 1) * 1000
    p99 = waits[int(len(waits) * 0.99)] * 1000 if waits else 0.0
    print(
        f"{len(stores)} store(s), {callers:>2} caller(s) each, batch {batch:>2}: "
        f"{appends / took:8.1f} appends/s  {appends * batch / took:8.1f} messages/s  "
        f"({commits} atomic batches, {lost} lost races; an append {mean:.1f} ms mean, "
        f"{p99:.1f} ms p99)"
    )


async def main(seconds: float, two: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp, NatsCluster(Path(tmp)) as cluster:
        settings = ClusterSettings(servers=tuple(cluster.urls), prefix="BENCH")
        count = 2 if two else 1
        conns = [await connect(settings, name=f"bench-{i}") for i in range(count)]
        stores = [await JetStreamMessageStore.open(nc, settings, max_bytes=1 << 40) for nc in conns]
        try:
            await _row(stores, "a", 1, 1, seconds)
            await _row(stores, "b", 16, 1, seconds)
            await _row(stores, "c", 1, 16, seconds)
        finally:
            for store in stores:
                await store.close()
            for nc in conns:
                await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--two", action="store_true", help="two stores (two brokers)")
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.two))
