"""The key fault test: restart the broker while two node daemons are receiving.

Every message the broker accepted must end up in both inboxes exactly once, with no
quarantine and no sequence gap, across a SIGKILL of the broker mid-burst.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from clients.sdk import ClientError, PartnerClient, Sequencer
from coalition.labels import parse_label
from coalition.pki import load_partner
from coalition.v1 import exchange_pb2, intel_pb2
from tests.helpers import admit, broker_argv, eventually, policy
from tests.node_helpers import REPO, free_port, start_daemon, stop, write_config

LABEL = parse_label("NATO SECRET // REL TO USA, GBR")
BURST = 40
KILL_AFTER = 15


class BrokerProcess:
    """`python -m broker.cli serve` on a fixed port, so a restart reuses it."""

    def __init__(self, pki: Path, data: Path, port: int) -> None:
        self.pki, self.data, self.port = pki, data, port
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        port_file = self.data.parent / "broker.port"
        port_file.unlink(missing_ok=True)
        log = (self.data.parent / "broker.log").open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            *broker_argv(self.pki, self.data, self.port, port_file),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        log.close()
        await eventually(port_file.exists, 20)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()


@pytest.fixture
async def broker(pki: Path, tmp_path: Path) -> AsyncIterator[BrokerProcess]:
    b = BrokerProcess(pki, tmp_path / "broker", free_port())
    await b.start()
    try:
        yield b
    finally:
        if b.proc is not None and b.proc.returncode is None:
            await stop(b.proc)


def report(i: int) -> bytes:
    return intel_pb2.IntelSummary(title=f"report {i}", summary="movement").SerializeToString()


async def publish_burst(kor: PartnerClient, accepted: list[str], n: int) -> None:
    """Publish n messages one by one, retrying each envelope until the broker decides."""
    for i in range(n):
        sealed = None
        while sealed is None:
            try:
                sealed = await kor.seal(report(i), topic="intel.ground", label=LABEL)
            except ClientError:
                await asyncio.sleep(0.2)
        ambiguous = False
        while True:
            try:
                [res] = await asyncio.wait_for(kor.publish([sealed.envelope]), 5)
            except (ClientError, TimeoutError):
                ambiguous = True  # it may have been stored before the broker died
                await asyncio.sleep(0.2)
                continue
            if res.outcome == exchange_pb2.ACCEPTED:
                accepted.append(sealed.message_id)
            elif ambiguous and res.reason_code in ("replay", "sequence_not_increasing"):
                accepted.append(sealed.message_id)  # the lost answer was an acceptance
            else:
                raise AssertionError(f"refused: {res.reason_code}: {res.reason}")
            break


def inbox_ids(db: Path) -> list[str]:
    with sqlite3.connect(db) as c:
        return [r[0] for r in c.execute("SELECT message_id FROM inbox")]


def table_count(db: Path, table: str) -> int:
    with sqlite3.connect(db) as c:
        return int(c.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


async def test_broker_restart_loses_and_duplicates_nothing(
    pki: Path, tmp_path: Path, broker: BrokerProcess
) -> None:
    for code in ("KOR", "USA", "GBR"):
        await admit(pki, broker.port, policy(code))
    nodes = {}
    for code in ("USA", "GBR"):
        cfg = write_config(tmp_path / code / "node.toml", pki, code, broker.port)
        log = tmp_path / f"{code}.log"
        nodes[code] = (cfg.parent / f"{code.lower()}-inbox.db", log, await start_daemon(cfg, log))
    try:
        for _, log, _ in nodes.values():
            await eventually(lambda log=log: log.exists() and "caught up" in log.read_text(), 20)
        kor = PartnerClient(
            load_partner(pki / "partners" / "KOR"),
            f"127.0.0.1:{broker.port}",
            sequencer=Sequencer(per_recipient=True),
        )
        accepted: list[str] = []
        try:
            burst = asyncio.create_task(publish_burst(kor, accepted, BURST))
            await eventually(lambda: len(accepted) >= KILL_AFTER, 20)
            await broker.kill()
            for _, log, _ in nodes.values():
                await eventually(lambda log=log: "unreachable" in log.read_text(), 20)
            await broker.start()
            await asyncio.wait_for(burst, 40)
        finally:
            await kor.close()
        assert len(accepted) == BURST

        for db, _, _ in nodes.values():
            await eventually(lambda db=db: set(accepted) <= set(inbox_ids(db)), 30)
    finally:
        codes = [await stop(proc) for _, _, proc in nodes.values()]
    assert codes == [0, 0]
    for code, (db, log, _) in nodes.items():
        ids = inbox_ids(db)
        assert sorted(ids) == sorted(accepted), code  # each exactly once, nothing else
        assert table_count(db, "quarantine") == 0
        assert table_count(db, "gaps") == 0  # per-recipient sequences arrived contiguous
        text = log.read_text()
        assert "retrying in" in text and text.count("connected to") >= 2
