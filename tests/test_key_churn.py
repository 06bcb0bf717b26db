"""Key bundles a partner can send at will are bounded: re-sending the bundle the broker
already holds writes nothing, and new bundles are limited per minute (each is a registry
write and an audit entry). Real gRPC over mTLS, real SQLite."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from coalition.hpke import HpkePrivateKey
from coalition.identity import sign_key_bundle
from coalition.pki import load_partner, make_key_bundle
from coalition.v1 import exchange_pb2
from tests.helpers import admit, now_ms, partner, policy, running_broker

LIMIT = 10


async def test_resent_and_new_key_bundles_are_bounded(
    pki: Path, tmp_path: Path, backend: dict[str, object]
) -> None:
    b = await running_broker(pki, tmp_path / "broker", max_key_changes_per_min=LIMIT, **backend)
    try:
        await admit(pki, b.port, policy("KOR"))
        creds = load_partner(pki / "partners" / "KOR")
        async with partner(pki, "KOR", b.port) as kor:
            # The node's own bundle, sent 200 times: one registration, the rest no-ops.
            for _ in range(200):
                await kor.stub.RegisterKeys(exchange_pb2.RegisterKeysRequest(bundle=creds.bundle))
            registered = await b.audit.query(kind="keys.registered", partner="KOR")
            assert len(registered) == 1
            # New bundles, freshly signed by KOR's certified key: LIMIT per minute in all.
            codes = []
            for _ in range(LIMIT + 5):
                fresh = make_key_bundle(
                    "KOR", HpkePrivateKey.generate(), now_ms(), now_ms() + 3600_000
                )
                req = exchange_pb2.RegisterKeysRequest(
                    bundle=sign_key_bundle(fresh, creds.hybrid_signing_key or creds.signing_key)
                )
                try:
                    await kor.stub.RegisterKeys(req)
                    codes.append("OK")
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code().name)
                    assert "changed its key bundle" in (exc.details() or "")
            assert codes == ["OK"] * (LIMIT - 1) + ["RESOURCE_EXHAUSTED"] * 6
            assert len(await b.audit.query(kind="keys.registered", partner="KOR")) == LIMIT
            refused = await b.audit.query(kind="keys.refused", partner="KOR")
            assert [e.decision for e in refused] == ["rate_limited"] * 6
    finally:
        await b.stop(grace=1)


@pytest.mark.parametrize("limit", [0])
async def test_the_bound_can_be_switched_off(
    pki: Path, tmp_path: Path, limit: int, backend: dict[str, object]
) -> None:
    b = await running_broker(pki, tmp_path / "broker", max_key_changes_per_min=limit, **backend)
    try:
        await admit(pki, b.port, policy("KOR"))
        creds = load_partner(pki / "partners" / "KOR")
        async with partner(pki, "KOR", b.port) as kor:
            for _ in range(LIMIT + 2):
                fresh = make_key_bundle(
                    "KOR", HpkePrivateKey.generate(), now_ms(), now_ms() + 3600_000
                )
                bundle = sign_key_bundle(fresh, creds.hybrid_signing_key or creds.signing_key)
                await kor.stub.RegisterKeys(exchange_pb2.RegisterKeysRequest(bundle=bundle))
        assert len(await b.audit.query(kind="keys.registered", partner="KOR")) == LIMIT + 2
    finally:
        await b.stop(grace=1)


async def test_an_oversized_key_bundle_is_refused_unstored(
    pki: Path, tmp_path: Path, backend: dict[str, object]
) -> None:
    """A bundle the partner signed with a megabyte of unknown fields: refused
    bad_key_bundle before it is verified or written (a registry fact stays small on
    every backend), and audited."""
    b = await running_broker(pki, tmp_path / "broker", **backend)
    try:
        await admit(pki, b.port, policy("KOR"))
        creds = load_partner(pki / "partners" / "KOR")
        fresh = make_key_bundle("KOR", HpkePrivateKey.generate(), now_ms(), now_ms() + 3600_000)
        junk = b"x" * (1 << 20)
        fresh.MergeFromString(b"\x9a\x06" + _varint(len(junk)) + junk)  # field 99, unknown
        req = exchange_pb2.RegisterKeysRequest(
            bundle=sign_key_bundle(fresh, creds.hybrid_signing_key or creds.signing_key)
        )
        async with partner(pki, "KOR", b.port) as kor:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await kor.stub.RegisterKeys(req)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 16384" in (refused.value.details() or "")
        assert await b.audit.query(kind="keys.registered", partner="KOR") == []
        [entry] = await b.audit.query(kind="keys.refused", partner="KOR")
        assert entry.decision == "bad_key_bundle"
    finally:
        await b.stop(grace=1)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
