"""gRPC's cost per delivery response and per delivery: ``python -m bench.response_cost``.

One grpc.aio server over mutual TLS (a development PKI in a temporary directory) streams
delivery batches, serialized as the broker serializes them (``broker.grpc.deliveries``),
of v2 envelopes like the bench's (1 KiB payload, 3 recipients, batches of 16 under one
hybrid-signed root, epoch encapsulations carried: about 8.8 KB each) to three subscriber
processes, each parsing every response as the SDK does. For each number of deliveries
per response it measures the server process's CPU (all its threads) per delivery, and
fits ``per_response / k + per_delivery`` over them: what one more response costs the
broker's gRPC edge, against what one more delivery in a response costs. No store, no
audit, no routing: only the edge and gRPC.

Run it with no other benchmark on the host (docs/bench.md, "Method"): the numbers are
CPU time, but two cores shared with another run still move them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.synchronize import Barrier
from pathlib import Path

import grpc

from broker.exchange import DeliveryBatch
from broker.exchange.headers import routing_header
from broker.grpc.deliveries import delivery_batch_bytes
from broker.store import StoredMessage
from coalition import envelope_v2
from coalition.envelope import INTEL_SUMMARY, Recipient
from coalition.epoch import SenderEpochs
from coalition.hpke import HpkePrivateKey
from coalition.hybrid import HybridSigningKey
from coalition.pki import load_broker, load_partner, make_dev_pki
from coalition.v1 import envelope_pb2, exchange_pb2, label_pb2

PER_RESPONSE = (1, 4, 16)
SUBSCRIBERS = 3
DELIVERIES = 6000  # per subscriber and number per response
METHOD = "/bench.ResponseCost/Stream"
LABEL = label_pb2.Label(
    policy="NATO",
    classification=label_pb2.SECRET,
    categories=[label_pb2.Category(name="REL TO", type=label_pb2.PERMISSIVE, values=["NATO"])],
)


@dataclass(frozen=True)
class Row:
    per_response: int
    deliveries: int  # delivered in all (every subscriber)
    responses: int  # counted at the subscribers
    bytes_per_delivery: float
    server_us_per_delivery: float


@dataclass(frozen=True)
class Result:
    rows: list[Row]
    per_response_us: float  # fitted: one more response
    per_delivery_us: float  # fitted: one more delivery in a response


def sealed(count: int) -> list[bytes]:
    """count serialized v2 envelopes of one sender, 16 to a root, for 3 recipients."""
    key = HybridSigningKey.generate()
    recipients = [
        Recipient(p, p, HpkePrivateKey.generate().public_key()) for p in ("GBR", "UKR", "NATO")
    ]
    epochs = SenderEpochs("KOR")
    out: list[bytes] = []
    payload = os.urandom(1024)
    while len(out) < count:
        batch = [
            envelope_v2.Message(payload, "intel.a", LABEL, 1, INTEL_SUMMARY, recipients, n + 1, 1)
            for n in range(len(out), len(out) + 16)
        ]
        out += [
            e.SerializeToString()
            for e in envelope_v2.seal_batch(
                batch,
                sender="KOR",
                signing_key=key,
                signing_key_id="k",
                epochs=epochs,
                created_ms=1,
            )
        ]
    return out[:count]


def _stored(offset: int, raw: bytes) -> tuple[StoredMessage, envelope_pb2.Header]:
    h = routing_header(envelope_pb2.Envelope.FromString(raw))
    m = StoredMessage(
        offset=offset,
        stored_ms=1,
        message_id=h.message_id,
        sender=h.sender,
        sequence=h.sequence,
        topic=h.topic,
        precedence=int(h.precedence),
        classification=int(h.label.classification),
        label=h.label.SerializeToString(),
        created_ms=1,
        expiry_ms=0,
        envelope=raw,
        digest=b"",
    )
    return m, h


def _subscriber(
    target: str,
    tls: tuple[bytes, bytes, bytes],
    per_response: int,
    deliveries: int,
    ready: Barrier,
    got: multiprocessing.SimpleQueue[tuple[int, int]],
) -> None:
    """One subscriber process: a short stream to warm up, then the measured one."""

    async def stream(channel: grpc.aio.Channel, n: int) -> tuple[int, int]:
        call = channel.unary_stream(
            METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )(f"{per_response},{n}".encode())
        count = responses = 0
        async for raw in call:
            count += len(exchange_pb2.SubscribeResponse.FromString(raw).batch.deliveries)
            responses += 1
        return count, responses

    async def run() -> tuple[int, int]:
        ca, cert, key = tls
        creds = grpc.ssl_channel_credentials(ca, key, cert)
        async with grpc.aio.secure_channel(
            target, creds, options=[("grpc.max_receive_message_length", 64 << 20)]
        ) as channel:
            await stream(channel, per_response * 4)
            await asyncio.get_running_loop().run_in_executor(None, ready.wait)
            return await stream(channel, deliveries)

    got.put(asyncio.run(run()))


async def measure(
    per_response: Sequence[int], deliveries: int, subscribers: int = SUBSCRIBERS
) -> Result:
    with tempfile.TemporaryDirectory() as tmp:
        make_dev_pki(tmp, ["USA"], [], int(time.time() * 1000), broker_hosts=["localhost"])
        broker, partner = load_broker(tmp), load_partner(Path(tmp) / "partners" / "USA")
    pool = [_stored(i + 1, raw) for i, raw in enumerate(sealed(256))]

    async def handler(request: bytes, context: object) -> AsyncIterator[bytes]:
        k, n = (int(x) for x in request.decode().split(","))
        for start in range(0, n, k):
            j = start % (len(pool) - k)
            chunk = pool[j : j + min(k, n - start)]
            yield delivery_batch_bytes(DeliveryBatch([m for m, _ in chunk], [h for _, h in chunk]))

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "bench.ResponseCost",
                {
                    "Stream": grpc.unary_stream_rpc_method_handler(
                        handler, request_deserializer=lambda b: b, response_serializer=lambda b: b
                    )
                },
            )
        ]
    )
    port = server.add_secure_port(
        "localhost:0",
        grpc.ssl_server_credentials(
            [(broker.tls_key_pem, broker.tls_cert_pem)],
            root_certificates=broker.ca_pem,
            require_client_auth=True,
        ),
    )
    await server.start()
    loop = asyncio.get_running_loop()
    ctx = multiprocessing.get_context("spawn")
    tls = (partner.ca_pem, partner.tls_cert_pem, partner.tls_key_pem)
    rows: list[Row] = []
    try:
        for k in per_response:
            ready = ctx.Barrier(subscribers + 1)
            got: multiprocessing.SimpleQueue[tuple[int, int]] = ctx.SimpleQueue()
            procs = [
                ctx.Process(
                    target=_subscriber,
                    args=(f"localhost:{port}", tls, k, deliveries, ready, got),
                )
                for _ in range(subscribers)
            ]
            for p in procs:
                p.start()
            await loop.run_in_executor(None, ready.wait)
            started = time.process_time()
            for p in procs:
                await loop.run_in_executor(None, p.join)
            cpu = time.process_time() - started
            counts = [got.get() for _ in procs]
            total = sum(c for c, _ in counts)
            size = sum(len(m.envelope) for m, _ in pool) / len(pool)
            rows.append(Row(k, total, subscribers * -(-deliveries // k), size, cpu / total * 1e6))
    finally:
        await server.stop(0)
    a, b = _fit([(1 / r.per_response, r.server_us_per_delivery) for r in rows])
    return Result(rows, a, b)


def _fit(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = a x + b; (0, mean y) for fewer than two distinct x."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    if var == 0:
        return 0.0, my
    a = sum((x - mx) * (y - my) for x, y in points) / var
    return a, my - a * mx


def table(r: Result) -> str:
    lines = [
        "deliveries/response  server µs/delivery  bytes/delivery  responses",
        *(
            f"{row.per_response:>19}  {row.server_us_per_delivery:>18.1f}  "
            f"{row.bytes_per_delivery:>14.0f}  {row.responses:>9}"
            for row in r.rows
        ),
        f"fitted: {r.per_response_us:.1f} µs per response + "
        f"{r.per_delivery_us:.1f} µs per delivery",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.response_cost", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny run for tests; not for numbers")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ns = p.parse_args(argv)
    n = 64 if ns.smoke else DELIVERIES
    result = asyncio.run(measure(PER_RESPONSE, n, 1 if ns.smoke else SUBSCRIBERS))
    print(json.dumps(asdict(result), indent=2) if ns.json else table(result))


if __name__ == "__main__":
    main()
