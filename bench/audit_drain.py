"""What the audit drain costs per record: ``python -m bench.audit_drain``.

Outbox rows like the broker's at load (per message: one ``publish.accepted`` and three
``deliver`` records, as broker.audit.items and broker.exchange.live make them) are
written to a real SQLite message store's outbox, then drained by the real Drainer into
a real AuditLog (its own SQLite file, fsync on commit), ``--rows`` rows a drain, the
size of one drain at 500 msg/s. For each part it prints the median over ``--repeat``
runs of:

- encode: making the outbox text of a record (at decision time, in the request's path);
- decode + build: the drainer turning outbox rows into entries (``_entries``);
- append: the audit log chaining and inserting them, one transaction and its commit;
- drain: the whole drain (read the outbox, decode, append, forget the rows), wall time
  and CPU time of the process (every thread), and its CPU per record.

It uses only what every version of the drainer has (encode, _entries, append_outbox,
Drainer.drain), so the same script measures an older checkout: run it there with that
checkout's interpreter. Run it with no other benchmark on the host (docs/bench.md,
"Method").
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.report import at_least_one
from broker.audit import AuditItem, AuditLog
from broker.audit.drainer import Drainer, _entries
from broker.audit.items import encode
from broker.store import SqliteMessageStore


def records(n: int) -> list[AuditItem]:
    """n records as the broker writes them at load: per message, its acceptance and its
    delivery to three partners."""
    out: list[AuditItem] = []
    for i in range(n // 4 + 1):
        mid = f"KOR-{i:08d}-{i * 7919 % 100000:05d}"
        out.append(
            AuditItem(
                "publish.accepted",
                "KOR",
                "KOR",
                mid,
                "allow",
                {
                    "offset": 10_000 + i,
                    "topic": "intel.ground.sector-7",
                    "sequence": i,
                    "digest": hashlib.sha256(mid.encode()).hexdigest(),
                    "classification": "SECRET",
                },
            )
        )
        for partner in ("USA", "GBR", "FRA"):
            detail = {"offsets": [10_000 + i], "message_ids": [mid], "window": 256}
            out.append(AuditItem("deliver", "broker", partner, mid, "allow", detail))
    return out[:n]


def _median_us(times: list[float], per: int) -> float:
    return statistics.median(times) / per * 1e6


class _Clock:
    """Wall and process CPU time (every thread) since start()."""

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


async def run(rows: int, repeat: int) -> dict[str, float]:
    items = records(rows)
    texts = [encode(i) for i in items]
    out: dict[str, list[float]] = {k: [] for k in ("encode", "entries", "append", "wall", "cpu")}
    clock = _Clock()
    for _ in range(repeat):
        clock.start()
        for i in items:
            encode(i)
        out["encode"].append(clock.read()[0])
    key = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory() as tmp:
        audit = await AuditLog.open(Path(tmp) / "audit.db", key, checkpoint_every=500)
        store = await SqliteMessageStore.open(Path(tmp) / "messages.db", max_bytes=1 << 32)
        drainer = Drainer(audit)
        drainer.add_source("messages", store)
        await drainer.start()
        try:
            t = 1_000
            for _ in range(repeat):
                # decode + build, then append, by hand; the drain then only forgets them
                t += 1
                await store.record(texts, t)
                mark = await audit.drained_through("messages")
                got = await store.read_outbox(mark, rows)
                clock.start()
                entries = _entries("messages", got)
                out["entries"].append(clock.read()[0])
                clock.start()
                await audit.append_outbox("messages", entries)
                out["append"].append(clock.read()[0])
                await drainer.drain()
                # the whole drain
                t += 1
                await store.record(texts, t)
                clock.start()
                assert await drainer.drain() == rows
                wall, cpu = clock.read()
                out["wall"].append(wall)
                out["cpu"].append(cpu)
            assert (await audit.verify(key.public_key())).ok
        finally:
            await drainer.close()
            await store.close()
            await audit.close()
    return {
        "rows": rows,
        "encode_us_per_record": _median_us(out["encode"], rows),
        "decode_build_us_per_record": _median_us(out["entries"], rows),
        "append_us_per_record": _median_us(out["append"], rows),
        "drain_wall_ms": statistics.median(out["wall"]) * 1e3,
        "drain_cpu_ms": statistics.median(out["cpu"]) * 1e3,
        "drain_cpu_us_per_record": _median_us(out["cpu"], rows),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=at_least_one, default=400, help="outbox rows per drain")
    p.add_argument("--repeat", type=at_least_one, default=41, help="drains measured (median)")
    args = p.parse_args()
    result = asyncio.run(run(args.rows, args.repeat))
    print(json.dumps({k: round(v, 2) for k, v in result.items()}))


if __name__ == "__main__":
    main()
