"""A broker's audit drainer alone, as a process the crash tests can SIGKILL: it drains a
SQLite outbox into the JetStream audit log in small batches (so a kill lands between
or inside appends) and records entries of its own meanwhile.

    python -m tests.audit_drainer_process SERVERS PREFIX OUTBOX_DB TAG

SERVERS is comma-separated. Prints "ready" once the log is open, then works until killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import drainer as drainer_module
from broker.audit.drainer import Drainer
from broker.jetstream.audit import JetStreamAuditLog
from broker.jetstream.connect import ClusterSettings, connect
from broker.store import SqliteMessageStore

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


async def main(servers: str, prefix: str, db: str, tag: str) -> None:
    drainer_module.BATCH = 5  # many small appends
    settings = ClusterSettings(servers=tuple(servers.split(",")), prefix=prefix)
    nc = await connect(settings)
    log = await JetStreamAuditLog.open(nc, settings, KEY, checkpoint_every=5)
    store = await SqliteMessageStore.open(Path(db), max_bytes=1 << 30)
    drainer = Drainer(log)
    drainer.add_source("messages", store)
    await drainer.start()
    print("ready", flush=True)
    i = 0
    while True:
        await asyncio.gather(
            drainer.drain(),
            log.record(kind="deliver", actor=tag, message_id=f"{tag}{i}", now_ms=i),
        )
        print(f"recorded {tag}{i}", flush=True)
        i += 1


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
