"""A no-op grpc.aio relay, the ``grpc-relay`` ceiling: ``python -m bench.relay_server``.

Mutual TLS with the broker's certificate (the same TLS work as our broker), two
generic methods on raw bytes: ``Publish`` (stream of batches in, one empty ack per
batch out once every subscriber's queue took it) and ``Subscribe`` (an empty first
message once registered, then every batch as published). No parsing, no crypto, no
policy, no storage; per-subscriber queues are bounded, so a slow subscriber slows
publishers instead of growing memory.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from coalition.pki import load_broker

SERVICE = "bench.Relay"
QUEUE_BATCHES = 64


class Hub:
    def __init__(self) -> None:
        self.subscribers: set[asyncio.Queue[bytes]] = set()

    async def publish(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        async for batch in requests:
            for q in list(self.subscribers):
                await q.put(batch)
            yield b""

    async def subscribe(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        q: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_BATCHES)
        self.subscribers.add(q)
        try:
            yield b""
            while True:
                yield await q.get()
        finally:
            self.subscribers.discard(q)


async def serve(pki: Path, port_file: Path) -> None:
    creds = load_broker(pki / "broker")
    hub = Hub()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Publish": grpc.stream_stream_rpc_method_handler(hub.publish),
                    "Subscribe": grpc.unary_stream_rpc_method_handler(hub.subscribe),
                },
            ),
        )
    )
    tls = grpc.ssl_server_credentials(
        [(creds.tls_key_pem, creds.tls_cert_pem)],
        root_certificates=creds.ca_pem,
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", tls)
    await server.start()
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.replace(port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="No-op gRPC relay (benchmark ceiling).")
    p.add_argument("--pki", type=Path, required=True)
    p.add_argument("--port-file", type=Path, required=True)
    args = p.parse_args(argv)
    asyncio.run(serve(args.pki, args.port_file))


if __name__ == "__main__":
    main()
