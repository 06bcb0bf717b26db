"""A stream the broker ends while the client is still writing fails as UNAVAILABLE.

grpcio's asyncio client reports a request write that loses the race with the server
ending the stream as INTERNAL "Internal error from Core" (grpc/grpc#36066). The SDK
reports it as UNAVAILABLE, the retryable status the broker itself uses for shutdown.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import grpc

from clients.sdk import ClientError, client_error
from coalition.labels import parse_label
from coalition.v1 import envelope_pb2
from tests.helpers import admit, partner, policy, running_broker

LABEL = parse_label("NATO SECRET // REL TO KOR, USA")
ATTEMPTS = 20


async def test_publishes_cut_off_by_a_closing_broker_fail_as_unavailable(
    pki: Path, tmp_path: Path, backend: dict[str, object]
) -> None:
    """Publishers keep writing while the real broker starts closing (each Publish stream
    then ends cleanly once its requests are answered), twenty times over: every call is
    accepted or fails UNAVAILABLE; none INTERNAL. Without the SDK's translation this saw
    INTERNAL 9-24 times per run."""
    b = await running_broker(pki, tmp_path / "broker", **backend)
    for code in ("KOR", "USA"):
        await admit(pki, b.port, policy(code))
    kor = partner(pki, "KOR", b.port)
    usa = partner(pki, "USA", b.port)
    await usa.register_keys()
    seen: Counter[str] = Counter()

    async def one(e: envelope_pb2.Envelope) -> None:
        try:
            await kor.publish([e])
            seen["accepted"] += 1
        except ClientError as exc:
            seen[exc.status.name] += 1

    try:
        for attempt in range(ATTEMPTS):
            envs = [
                (
                    await kor.seal(b"x", topic="intel.ground", label=LABEL, recipients=["USA"])
                ).envelope
                for _ in range(60)
            ]

            async def publish_all(envs: list[envelope_pb2.Envelope] = envs) -> None:
                for i in range(0, len(envs), 3):
                    await asyncio.gather(*(one(e) for e in envs[i : i + 3]))

            task = asyncio.create_task(publish_all())
            await asyncio.sleep(0.01 + 0.002 * (attempt % 10))
            b.exchange.closing = True  # what Broker.stop does first
            await asyncio.wait_for(task, 30)
            b.exchange.closing = False  # open again for the next attempt
    finally:
        await kor.close()
        await usa.close()
        await b.stop(grace=1)
    assert set(seen) <= {"accepted", "UNAVAILABLE"}, dict(seen)
    assert seen["accepted"] > 0 and seen["UNAVAILABLE"] > 0, dict(seen)  # both sides ran


def _rpc_error(code: grpc.StatusCode, details: str, debug: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details, debug_error_string=debug
    )


def test_only_the_core_write_failure_is_translated() -> None:
    lost_write = _rpc_error(
        grpc.StatusCode.INTERNAL,
        "Internal error from Core",
        'Failed "execute_batch": (<grpc._cython.cygrpc.SendMessageOperation object>,)',
    )
    assert client_error(lost_write).status is grpc.StatusCode.UNAVAILABLE
    # A genuine INTERNAL from the broker, and every other status, pass through as sent.
    broker_fault = _rpc_error(grpc.StatusCode.INTERNAL, "store failed", "")
    assert client_error(broker_fault).status is grpc.StatusCode.INTERNAL
    assert client_error(broker_fault).message == "store failed"
    denied = _rpc_error(grpc.StatusCode.PERMISSION_DENIED, "suspended", "")
    assert client_error(denied).status is grpc.StatusCode.PERMISSION_DENIED
