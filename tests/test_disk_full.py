"""Fault: the broker's disk fills up. Publishes are refused clearly (RESOURCE_EXHAUSTED),
nothing accepted is lost or corrupted, other calls keep working, and once space is
freed publishing resumes. Uses a real, small tmpfs (needs root, as CI has)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from broker.server import Broker
from clients.sdk import PartnerClient
from coalition.labels import parse_label
from coalition.v1 import exchange_pb2
from tests.helpers import admit, operator, partner, policy, running_broker

LABEL = parse_label("NATO SECRET // REL TO USA")


def fill_disk(mnt: Path, *, leave: int) -> Path:
    """Fill the filesystem at mnt with a file, then free about leave bytes of it."""
    filler = mnt / "filler"
    # Unbuffered: a buffered file would still hold the part of its last write that did
    # not fit, and fail again when closed.
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    os.truncate(filler, max(filler.stat().st_size - leave, 0))
    return filler


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
async def broker(pki: Path, tiny_disk: Path) -> AsyncIterator[Broker]:
    # The store's own quota is far above the disk: the disk runs out first. The broker
    # keeps 512 KiB in reserve so the audit log can still record every refusal.
    b = await running_broker(
        pki,
        tiny_disk / "broker",
        max_store_bytes=1 << 30,
        min_free_bytes=512 * 1024,
        audit_checkpoint_every=10_000,
    )
    for code in ("KOR", "USA"):
        await admit(pki, b.port, policy(code))
    try:
        yield b
    finally:
        await b.stop(grace=1)


async def test_disk_full_refuses_cleanly_and_recovers(
    pki: Path, broker: Broker, tiny_disk: Path
) -> None:
    async with partner(pki, "KOR", broker.port) as kor, partner(pki, "USA", broker.port) as usa:
        await kor.register_keys()
        await usa.register_keys()
        # Fill the disk with a file we can delete later, leaving a little room.
        filler = fill_disk(tiny_disk, leave=2 * 1024 * 1024)

        accepted: list[exchange_pb2.PublishResult] = []
        refused: list[exchange_pb2.PublishResult] = []
        for _ in range(200):
            s = await kor.seal(os.urandom(8 * 1024), topic="intel.a", label=LABEL)
            [res] = await kor.publish([s.envelope])
            (accepted if res.outcome == exchange_pb2.ACCEPTED else refused).append(res)
            if len(refused) >= 3:
                break
        assert accepted, "some messages fit before the disk filled"
        assert refused, "the disk never filled"
        for r in refused:
            assert (r.status, r.reason_code) == ("RESOURCE_EXHAUSTED", "store_full")
            assert "full" in r.reason

        # The broker keeps serving other calls.
        directory = await usa.directory(refresh=True)
        assert "KOR" in directory.peers

        # Space comes back: publishing resumes, and everything accepted is intact.
        filler.unlink()
        s = await kor.seal(b"after recovery", topic="intel.a", label=LABEL)
        [res] = await kor.publish([s.envelope])
        assert res.outcome == exchange_pb2.ACCEPTED, res
        assert await broker.store.verify_integrity() == []
        got = await _receive_all(usa, len(accepted) + 1)
        assert got[-1] == b"after recovery"
    async with operator(pki, "op1", broker.port) as op:
        verdict = await op.verify_audit()
    assert verdict.ok, verdict.problem


async def test_fast_publishers_cannot_outrun_the_reserve(
    pki: Path, broker: Broker, tiny_disk: Path
) -> None:
    """Publishes arriving faster than the free-space check refreshes, past a WAL
    checkpoint: the reserve must still hold, so every refusal is store_full and the audit
    log never runs out of room. (A stored message takes ~5x its size on disk at first:
    its WAL pages, the index pages around it and its audit entry; and a checkpoint later
    copies the WAL into the database file at once. Counting only the message's size, or
    not the WAL, let the disk fill: each mutation fails this test.)"""
    async with partner(pki, "KOR", broker.port) as kor, partner(pki, "USA", broker.port) as usa:
        await kor.register_keys()
        await usa.register_keys()
        sealed = [
            (await kor.seal(os.urandom(8 * 1024), topic="intel.a", label=LABEL)).envelope
            for _ in range(160)
        ]
        filler = fill_disk(tiny_disk, leave=2 * 1024 * 1024)
        outcomes: list[exchange_pb2.PublishResult] = []
        for i in range(0, len(sealed), 2):  # two at a time, as fast as they are answered
            pair = await asyncio.gather(*(kor.publish([e]) for e in sealed[i : i + 2]))
            outcomes += [r for results in pair for r in results]
        refused = [r for r in outcomes if r.outcome == exchange_pb2.REFUSED]
        assert refused, "the disk never filled"
        assert {(r.status, r.reason_code) for r in refused} == {
            ("RESOURCE_EXHAUSTED", "store_full")
        }
        assert not broker.exchange.audit_failed
        filler.unlink()
    async with operator(pki, "op1", broker.port) as op:
        verdict = await op.verify_audit()
    assert verdict.ok, verdict.problem


async def _receive_all(client: PartnerClient, n: int) -> list[bytes]:
    out: list[bytes] = []
    sub = client.subscribe(["intel.>"])
    async for d in sub:
        out.append((await client.open(d)).plaintext)
        await sub.ack([d.offset])
        if len(out) == n:
            break
    await sub.aclose()
    return out


async def test_disk_full_without_reserve_fails_closed(pki: Path, tiny_disk: Path) -> None:
    """No reserve: SQLite itself reports the full disk. Publishes are refused (store_full,
    or audit_unavailable while the audit log cannot record decisions); nothing crashes,
    and after space is freed publishing resumes with the store and the chain intact."""
    b = await running_broker(
        pki, tiny_disk / "broker", min_free_bytes=0, audit_checkpoint_every=10_000
    )
    try:
        for code in ("KOR", "USA"):
            await admit(pki, b.port, policy(code))
        async with partner(pki, "KOR", b.port) as kor, partner(pki, "USA", b.port) as usa:
            await kor.register_keys()
            await usa.register_keys()
            filler = fill_disk(tiny_disk, leave=512 * 1024)
            codes = set()
            for _ in range(300):
                s = await kor.seal(os.urandom(8 * 1024), topic="intel.a", label=LABEL)
                [res] = await kor.publish([s.envelope])
                if res.outcome == exchange_pb2.REFUSED:
                    assert res.status == "RESOURCE_EXHAUSTED", res
                    codes.add(res.reason_code)
                    if len(codes) == 2 or res.reason_code == "audit_unavailable":
                        break
            assert codes <= {"store_full", "audit_unavailable"} and codes
            filler.unlink()
            s = await kor.seal(b"after recovery", topic="intel.a", label=LABEL)
            [res] = await kor.publish([s.envelope])
            assert res.outcome == exchange_pb2.ACCEPTED, res
            assert await b.store.verify_integrity() == []
            await usa.directory(refresh=True)
    finally:
        await b.stop(grace=1)
    assert not b.exchange.audit_failed


async def test_stopping_on_a_full_disk_closes_cleanly(pki: Path, tiny_disk: Path) -> None:
    """The disk fills up completely and the broker is stopped: stop() completes (a final
    audit checkpoint that cannot be written is logged, not raised), and after space is
    freed a new broker on the same files has every message and a verifying chain."""
    data = tiny_disk / "broker"
    b = await running_broker(pki, data, min_free_bytes=0, audit_checkpoint_every=10_000)
    for code in ("KOR", "USA"):
        await admit(pki, b.port, policy(code))
    async with partner(pki, "KOR", b.port) as kor, partner(pki, "USA", b.port) as usa:
        await kor.register_keys()
        await usa.register_keys()
        for i in range(3):
            s = await kor.seal(b"report %d" % i, topic="intel.a", label=LABEL)
            [res] = await kor.publish([s.envelope])
            assert res.outcome == exchange_pb2.ACCEPTED, res
    filler = fill_disk(tiny_disk, leave=0)
    await b.stop(grace=1)
    filler.unlink()
    b = await running_broker(pki, data, min_free_bytes=0, audit_checkpoint_every=10_000)
    try:
        assert await b.store.verify_integrity() == []
        async with partner(pki, "USA", b.port) as usa:
            got = await _receive_all(usa, 3)
        assert got == [b"report 0", b"report 1", b"report 2"]
        async with operator(pki, "op1", b.port) as op:
            verdict = await op.verify_audit()
        assert verdict.ok, verdict.problem
    finally:
        await b.stop(grace=1)
