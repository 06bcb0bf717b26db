"""Fault: the broker's disk fills up. Publishes are refused clearly (RESOURCE_EXHAUSTED),
nothing accepted is lost or corrupted, other calls keep working, and once space is
freed publishing resumes. Uses a real, small tmpfs (needs root, as CI has)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from broker.server import Broker
from clients.sdk import ClientError, OperatorClient, PartnerClient
from coalition.labels import parse_label
from coalition.v1 import envelope_pb2, exchange_pb2
from tests.helpers import admit, broker_argv, operator, partner, policy, running_broker
from tests.test_broker_faults import ROOT, BrokerProcess

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


@contextlib.contextmanager
def tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A tmpfs of the given size mounted at mnt for the duration."""
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
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
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk", "6m") as mnt:
        yield mnt


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


# -- a refusal flood on a full disk, and restarts there (real broker processes) ----------

FLOOD_RESERVE = 8 << 20
FLOOD_S = 20.0


@dataclass
class DiskBroker(BrokerProcess):
    """A broker process with its data on a small tmpfs; its log and port file live
    elsewhere (a full disk would swallow them)."""

    logs: Path = Path()
    reserve: int = FLOOD_RESERVE

    @property
    def port_file(self) -> Path:
        return self.logs / f"port-{self.starts}"

    def log(self) -> str:
        return (self.logs / f"broker-{self.starts}.log").read_text(errors="replace")

    def spawn(self) -> subprocess.Popen[bytes]:
        self.starts += 1
        argv = broker_argv(self.pki, self.data, self.port, self.port_file)
        argv += ["--min-free-bytes", str(self.reserve), "--audit-checkpoint-every", "10000"]
        with (self.logs / f"broker-{self.starts}.log").open("wb") as log:
            return subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def disk_lines(self) -> list[str]:
        """The log lines of the current run that speak of the disk."""
        return [line for line in self.log().splitlines() if "data disk" in line]


async def _flood(
    client: PartnerClient,
    envs: list[envelope_pb2.Envelope],
    stop: asyncio.Event,
    tally: Counter[tuple[str, str]],
) -> None:
    """Publish the same envelopes again and again, as a publisher retrying would."""
    while not stop.is_set():
        for r in await client.publish(envs):
            tally[(r.status, r.reason_code)] += 1


async def _flood_for(
    clients: list[PartnerClient], envs: dict[str, list[envelope_pb2.Envelope]], seconds: float
) -> Counter[tuple[str, str]]:
    """Each client floods with four requests in flight for seconds; the outcomes counted."""
    tally: Counter[tuple[str, str]] = Counter()
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(_flood(c, envs[c.code], stop, tally)) for c in clients for _ in range(4)
    ]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    return tally


async def _audited_refusals(op: OperatorClient) -> tuple[int, int, int]:
    """Refusals in the audit log: (one by one, in summaries, summary entries)."""
    single = await op.audit(kind="publish.refused")
    summaries = [e for e in single if e.kind == "publish.refused.summary"]
    counted = sum(json.loads(e.detail_json)["count"] for e in summaries)
    return len(single) - len(summaries), counted, len(summaries)


async def test_refusal_flood_on_a_full_disk_keeps_the_reserve(pki: Path, tmp_path: Path) -> None:
    """Two publishers retrying as fast as they can on a full disk must not eat the free
    space the broker keeps for its audit log.

    Scale: one such flood used up the default 64 MiB reserve in 108 s (0.6 MiB/s, ~360 B
    of audit log per refusal, 1,700 refusals/s). Here the reserve is 8 MiB, which that rate
    spends in 14 s, and the flood lasts 20 s (before the fix this machine spent it in
    under 2 s: the audit log's WAL grows by whole pages per commit, and after that every
    publish was refused audit_unavailable, unaudited). After the fix each partner's
    refusals cost a bounded number of entries per minute (100 one by one, then one
    summary per reason) and its requests beyond its rate are refused before any work, so
    free space stays above half the reserve, every refusal is store_full or rate_limited,
    and the audit log accounts for every one of them exactly.

    Then the broker is restarted on the full disk (SIGTERM, then SIGKILL during a second
    flood): it starts, says once in its log that the disk is nearly full, delivers what it
    had stored, serves admin reads and refuses publishes clearly.
    """
    with tmpfs(tmp_path / "disk", "24m") as disk:
        logs = tmp_path / "logs"
        logs.mkdir()
        b = DiskBroker(pki, disk / "broker", logs=logs)
        try:
            await _flood_and_restart(pki, b, disk)
        finally:
            b.cleanup()


async def _flood_and_restart(pki: Path, b: DiskBroker, disk: Path) -> None:
    await b.start()
    for code in ("KOR", "GBR", "USA"):
        await admit(pki, b.port, policy(code))
    async with partner(pki, "USA", b.port) as usa, partner(pki, "KOR", b.port) as kor:
        await usa.register_keys()
        stored = []
        for i in range(3):
            s = await kor.seal(b"before the disk filled %d" % i, topic="intel.a", label=LABEL)
            [res] = await kor.publish([s.envelope])
            assert res.outcome == exchange_pb2.ACCEPTED, res
            stored.append(res.message_id)
    fill_disk(disk, leave=FLOOD_RESERVE - (256 << 10))  # every publish is refused
    await asyncio.sleep(0.2)  # the broker's free-space reading is at most 100 ms old
    async with partner(pki, "KOR", b.port) as kor, partner(pki, "GBR", b.port) as gbr:
        envs = {
            c.code: [
                (await c.seal(b"x" * 64, topic="intel.a", label=LABEL)).envelope for _ in range(8)
            ]
            for c in (kor, gbr)
        }
        tally = await _flood_for([kor, gbr], envs, FLOOD_S)
    free = shutil.disk_usage(disk).free
    refusals = sum(tally.values())
    assert refusals > 10_000, tally  # a sustained flood (~5x the reserve's worth before)
    assert set(tally) <= {
        ("RESOURCE_EXHAUSTED", "store_full"),
        ("RESOURCE_EXHAUSTED", "rate_limited"),
    }, tally
    assert free > FLOOD_RESERVE // 2, f"reserve eaten: {free} bytes left; {tally}"
    # A clean stop writes the summaries still pending; a restart on the full disk works.
    b.signal(signal.SIGTERM)
    assert await b.wait_exit() == 0, b.log()
    await b.start()
    async with operator(pki, "op1", b.port) as op:
        single, counted, entries = await _audited_refusals(op)
        assert single + counted == refusals, (single, counted, entries, tally)
        assert single <= 2 * 2 * 100  # per partner and 1-minute interval (20 s touch two)
        assert (await op.verify_audit()).ok
    # A crash during a second flood, then a start on the still-full disk.
    async with partner(pki, "KOR", b.port) as kor, partner(pki, "GBR", b.port) as gbr:
        flood = asyncio.create_task(_flood_for([kor, gbr], envs, 3.0))
        await asyncio.sleep(1.5)
        b.signal(signal.SIGKILL)
        assert await b.wait_exit() == -signal.SIGKILL
        with contextlib.suppress(ClientError):
            await flood
    await b.start()
    assert "Traceback" not in b.log(), b.log()
    [line] = b.disk_lines()
    assert "nearly full" in line and "publishes are refused" in line, line
    async with operator(pki, "op1", b.port) as op, partner(pki, "USA", b.port) as usa:
        assert {p.partner for p in await op.partners()} == {"KOR", "GBR", "USA"}
        assert await op.audit(kind="broker.started")
        assert (await op.verify_audit()).ok
        got = await _receive_all(usa, len(stored))
        assert got == [b"before the disk filled %d" % i for i in range(3)]
    async with partner(pki, "KOR", b.port) as kor:
        [res] = await kor.publish([envs["KOR"][0]])
        assert (res.status, res.reason_code) == ("RESOURCE_EXHAUSTED", "store_full"), res
        assert "full" in res.reason
    b.signal(signal.SIGTERM)
    assert await b.wait_exit() == 0, b.log()
    assert "Traceback" not in b.log(), b.log()


async def test_restart_on_a_completely_full_disk(
    pki: Path, tiny_disk: Path, tmp_path: Path
) -> None:
    """Not a byte free: a broker killed there starts again all the same. It says once,
    in one line, that the disk is full and what it cannot record; admin reads work;
    publishes and registry writes are refused RESOURCE_EXHAUSTED with a sentence that
    names the full disk (key registration used to fail UNKNOWN, "cannot rollback - no
    transaction is active", and the start a traceback); a node re-registering the key
    bundle the broker already has gets in."""
    b = DiskBroker(pki, tiny_disk / "broker", logs=tmp_path, reserve=512 << 10)
    try:
        await b.start()
        for code in ("KOR", "USA"):
            await admit(pki, b.port, policy(code))
        async with partner(pki, "USA", b.port) as usa, partner(pki, "KOR", b.port) as kor:
            await usa.register_keys()
            for i in range(3):
                s = await kor.seal(b"report %d" % i, topic="intel.a", label=LABEL)
                [res] = await kor.publish([s.envelope])
                assert res.outcome == exchange_pb2.ACCEPTED, res
            later = (await kor.seal(b"later", topic="intel.a", label=LABEL)).envelope
        b.signal(signal.SIGKILL)
        await b.wait_exit()
        fill_disk(tiny_disk, leave=0)
        await b.start()
        assert "Traceback" not in b.log(), b.log()
        [line] = b.disk_lines()
        assert "disk is full" in line and "refusing publishes" in line, line
        async with operator(pki, "op1", b.port) as op:
            assert {p.partner for p in await op.partners()} == {"KOR", "USA"}
            assert len(await op.audit(kind="publish.accepted")) == 3
            assert (await op.verify_audit()).ok
        async with partner(pki, "KOR", b.port) as kor, partner(pki, "USA", b.port) as usa:
            [res] = await kor.publish([later])
            assert res.status == "RESOURCE_EXHAUSTED", res
            assert "full" in res.reason, res
            # A new key bundle cannot be recorded; a node reconnecting with the bundle
            # the broker already has is let in.
            with pytest.raises(ClientError) as err:
                await kor.register_keys()
            assert err.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
            assert "disk is full" in str(err.value), err.value
            await usa.register_keys()
            # A delivery is audited before it leaves: as long as the audit log has room
            # (SQLite may reuse its write-ahead log's space) the stored messages arrive,
            # and once it has none the stream ends, saying why.
            try:
                got = await asyncio.wait_for(_receive_all(usa, 3), 20)
                assert got == [b"report 0", b"report 1", b"report 2"]
            except ClientError as exc:
                assert exc.status == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                assert "audit log cannot be written" in str(exc), exc
        b.signal(signal.SIGTERM)
        assert await b.wait_exit() == 0, b.log()
        assert "Traceback" not in b.log(), b.log()
    finally:
        b.cleanup()
