"""The ``grpc-relay`` row: the ceiling for any grpc.aio broker in Python on this machine.

Clients use the SDK's mutual-TLS channel and send the same batches our SDK sends
(a serialized ``PublishRequest``; concurrent sends merged by the SDK's rule); the
relay (``bench.relay_server``) forwards the bytes untouched; receivers parse the
batch and ``env.open`` each envelope. No acknowledgements from receivers: the relay
stores nothing to acknowledge.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from bench.relay_server import SERVICE
from bench.rows import OnOpened, RowSpec
from bench.servers import ServerProcess, spawn, wait_port_file
from bench.workload import Opener, Sealed
from clients.sdk import PUBLISH_MAX_INFLIGHT, merge_count, secure_channel
from coalition.pki import load_partner
from coalition.v1 import envelope_pb2, exchange_pb2


async def start_server(pki: Path, workdir: Path) -> ServerProcess:
    port_file = workdir / "relay.port"
    argv = [
        sys.executable,
        "-m",
        "bench.relay_server",
        "--pki",
        str(pki),
        "--port-file",
        str(port_file),
    ]
    proc, log = spawn("grpc-relay", argv, workdir)
    port = await wait_port_file(proc, port_file, workdir / "grpc-relay.log")
    return ServerProcess("grpc-relay", proc, port, log)


def _channel(spec: RowSpec, code: str) -> grpc.aio.Channel:
    c = load_partner(Path(spec.pki) / "partners" / code)
    return secure_channel(spec.target, c.ca_pem, c.tls_cert_pem, c.tls_key_pem)


class RelayPublisher:
    """Publishes like the SDK: while ``PUBLISH_MAX_INFLIGHT`` batches are unanswered,
    further sends wait and are merged (same limits), so the relay sees the batches our
    SDK would send."""

    def __init__(self, spec: RowSpec, sender: str) -> None:
        self.channel = _channel(spec, sender)
        self.pending: list[tuple[Sequence[Sealed], asyncio.Future[None]]] = []
        self.changed = asyncio.Event()
        self.closing = False
        self.waiting: collections.deque[list[asyncio.Future[None]]] = collections.deque()
        self.call: Any = None
        self.reader: asyncio.Task[None] | None = None

    async def _requests(self) -> AsyncIterator[bytes]:
        while True:
            while not self.pending or len(self.waiting) >= PUBLISH_MAX_INFLIGHT:
                if self.closing:
                    return
                self.changed.clear()
                await self.changed.wait()
            take = merge_count((len(b), sum(len(m.data) for m in b)) for b, _ in self.pending)
            chosen, self.pending = self.pending[:take], self.pending[take:]
            self.waiting.append([fut for _, fut in chosen])
            req = exchange_pb2.PublishRequest(
                envelopes=[envelope_pb2.Envelope.FromString(m.data) for b, _ in chosen for m in b]
            )
            yield req.SerializeToString()

    async def _read(self) -> None:
        async for _ in self.call:
            futs = self.waiting.popleft()  # the relay acknowledges batches in order
            self.changed.set()
            for fut in futs:
                if not fut.done():
                    fut.set_result(None)

    async def connect(self) -> None:
        await asyncio.wait_for(self.channel.channel_ready(), 10)
        self.call = self.channel.stream_stream(f"/{SERVICE}/Publish", None, None)(self._requests())
        self.reader = asyncio.create_task(self._read())

    async def send(self, batch: Sequence[Sealed]) -> int:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append((batch, fut))
        self.changed.set()
        await fut
        return len(batch)

    async def close(self) -> None:
        self.closing = True
        self.changed.set()
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader
        await self.channel.close(None)


class RelayReceiver:
    def __init__(self, spec: RowSpec, code: str) -> None:
        self.spec = spec
        self.channel = _channel(spec, code)
        self.opener = Opener(Path(spec.pki), code)
        self.task: asyncio.Task[None] | None = None

    async def start(self, on_opened: OnOpened) -> None:
        await asyncio.wait_for(self.channel.channel_ready(), 10)
        call = self.channel.unary_stream(f"/{SERVICE}/Subscribe", None, None)(b"")
        registered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(self._receive(call, on_opened, registered))
        await asyncio.wait_for(registered, 10)

    async def _receive(
        self, call: Any, on_opened: OnOpened, registered: asyncio.Future[None]
    ) -> None:
        async for data in call:
            if not registered.done():
                registered.set_result(None)  # the relay's empty first message
                continue
            for e in exchange_pb2.PublishRequest.FromString(data).envelopes:
                on_opened(self.opener.open_envelope(e))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        await self.channel.close(None)
