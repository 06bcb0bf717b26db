"""The node's withholding alarm is true: real broker and node processes.

A hole in a sender's per-recipient numbers is only suspicious once it cannot be
explained by delivery order (a backlog, or a stream fallen behind, arrives FLASH first)
or by the sender's own refused publishes (their numbers are reused). A message the
broker really withholds still raises the alarm.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from clients.node.inbox import GAP_GRACE_S
from clients.node.sequences import DurableSequencer
from clients.sdk import PartnerClient, Sealed, Sequencer
from coalition.labels import Precedence, parse_label
from coalition.pki import load_partner
from coalition.v1 import exchange_pb2, intel_pb2
from tests.broker_process import ConfiguredBroker
from tests.helpers import admit, eventually, policy
from tests.node_helpers import start_daemon, stop, write_config

LABEL = parse_label("NATO SECRET // REL TO USA")
ALARM = "the broker may be withholding messages"


@pytest.fixture
def broker_toml(tmp_path: Path) -> Path:
    return tmp_path / "broker.toml"


@pytest.fixture
def broker(pki: Path, tmp_path: Path, broker_toml: Path) -> Iterator[ConfiguredBroker]:
    if not broker_toml.exists():
        broker_toml.write_text("[limits]\n")
    b = ConfiguredBroker(pki, tmp_path / "data", extra_args=["--config", str(broker_toml)])
    try:
        yield b
    finally:
        b.cleanup()


def report(i: int, pad: int = 0) -> bytes:
    return intel_pb2.IntelSummary(title=f"report {i}", summary="x" * pad).SerializeToString()


def inbox_rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as c:
        return list(c.execute(sql))


def alarms(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if ALARM in line]


async def start_node(pki: Path, tmp_path: Path, port: int) -> tuple[Path, Path, Path]:
    cfg = write_config(tmp_path / "usa" / "node.toml", pki, "USA", port)
    return cfg, cfg.parent / "usa-inbox.db", tmp_path / "usa.log"


async def wait_caught_up(log: Path, times: int = 1) -> None:
    await eventually(lambda: log.exists() and log.read_text().count("caught up") >= times, 30)


async def test_a_backlog_with_flash_first_raises_no_false_alarm(
    pki: Path, tmp_path: Path, broker: ConfiguredBroker
) -> None:
    """A node stopped during a 2,000-message burst (every fifth FLASH) and restarted
    while it goes on, then frozen for 1,100 of them: the backlog, and the live feed it
    fell behind on, arrive FLASH first; no hole is reported, and none is left."""
    await broker.start()
    for code in ("KOR", "USA"):
        await admit(pki, broker.port, policy(code))
    cfg, db, log = await start_node(pki, tmp_path, broker.port)
    proc = await start_daemon(cfg, log)
    kor = PartnerClient(
        load_partner(pki / "partners" / "KOR"),
        f"127.0.0.1:{broker.port}",
        sequencer=Sequencer(per_recipient=True),
    )
    total, batch = 2000, 50
    accepted = 0
    try:
        await wait_caught_up(log)
        for b in range(total // batch):
            envs = []
            for i in range(b * batch, (b + 1) * batch):
                prec = Precedence.FLASH if i % 5 == 4 else Precedence.ROUTINE
                s = await kor.seal(
                    report(i),
                    topic="intel.ground",
                    label=LABEL,
                    precedence=prec,
                    recipients=["USA"],
                )
                envs.append(s.envelope)
            results = await kor.publish(envs)
            assert all(r.outcome == exchange_pb2.ACCEPTED for r in results)
            accepted += len(results)
            if accepted == 300:
                assert await stop(proc) == 0
            elif accepted == 500:
                proc = await start_daemon(cfg, log)
            elif accepted == 800:
                # Caught up again, then frozen: the broker's live feed for it overflows
                # and, once it runs again, the store is read FLASH first.
                await wait_caught_up(log, times=2)
                proc.send_signal(signal.SIGSTOP)
            elif accepted == 1900:
                proc.send_signal(signal.SIGCONT)
        await eventually(lambda: inbox_rows(db, "SELECT COUNT(*) FROM inbox")[0][0] == total, 60)
        await asyncio.sleep(1.5)  # a judgement round of the running daemon
    finally:
        await kor.close()
        rc = await stop(proc)
    assert rc == 0
    assert len(alarms(log)) == 0  # before: hundreds
    text = log.read_text()
    assert "fell behind" in text and "caught up again" in text  # the case was exercised
    assert inbox_rows(db, "SELECT * FROM gaps") == []
    assert inbox_rows(db, "SELECT COUNT(*) FROM quarantine") == [(0,)]


@pytest.mark.parametrize("durable", [True, False], ids=["node-db", "in-memory"])
async def test_refused_publishes_mid_stream_raise_no_false_alarm(
    pki: Path, tmp_path: Path, broker: ConfiguredBroker, broker_toml: Path, durable: bool
) -> None:
    """quota_exceeded in the middle of a pipelined stream: big envelopes are refused while
    small ones still fit; the refused numbers are reused, so the recipient sees no hole."""
    # 181 small v2 reports (5.1 KB each) and one big one (905 KB) fit; a second big does not.
    broker_toml.write_text("[limits]\nsender_store_bytes = 1865000\n")  # noqa: ASYNC240
    await broker.start()
    for code in ("KOR", "USA"):
        await admit(pki, broker.port, policy(code))
    cfg, db, log = await start_node(pki, tmp_path, broker.port)
    proc = await start_daemon(cfg, log)
    seq = DurableSequencer(tmp_path / "kor-node.db") if durable else Sequencer(per_recipient=True)
    kor = PartnerClient(
        load_partner(pki / "partners" / "KOR"), f"127.0.0.1:{broker.port}", sequencer=seq
    )
    refused = accepted = 0

    async def seal_batch(k: int) -> list[Sealed]:
        # Nine small reports (5.1 KB sealed as v2, most of it the batch root's two
        # signatures), then a big one (905 KB): the quota takes the first big one, refuses
        # every later one, and keeps storing the small ones.
        return [
            await kor.seal(
                report(k * 10 + j, 900_000 if j == 9 else 100),
                topic="intel.ground",
                label=LABEL,
                recipients=["USA"],
            )
            for j in range(10)
        ]

    async def publish(sealed: list[Sealed]) -> None:
        nonlocal accepted, refused
        results = await kor.publish([s.envelope for s in sealed])
        for s, r in zip(sealed, results, strict=True):
            if r.outcome == exchange_pb2.ACCEPTED:
                accepted += 1
            else:
                assert r.reason_code == "quota_exceeded", r.reason
                kor.discard(s)
                refused += 1

    try:
        await wait_caught_up(log)
        pending = await seal_batch(0)
        for k in range(1, 20):
            # Pipelined: the next batch is sealed (numbers taken) before this one's answer.
            following = await seal_batch(k)
            await publish(pending)
            pending = following
        await publish(pending)
        # The sender's stream goes on: its next report takes the last number given back.
        await publish(
            [await kor.seal(report(200), topic="intel.ground", label=LABEL, recipients=["USA"])]
        )
        assert (refused, accepted) == (19, 182)  # refusals in the middle of the stream
        await eventually(lambda: inbox_rows(db, "SELECT COUNT(*) FROM inbox")[0][0] == accepted, 30)
        await asyncio.sleep(1.5)
    finally:
        await kor.close()
        if isinstance(seq, DurableSequencer):
            seq.close()
        rc = await stop(proc)
    assert rc == 0
    assert len(alarms(log)) == 0  # before: one per refused big report
    assert inbox_rows(db, "SELECT * FROM gaps") == []
    highs = inbox_rows(db, "SELECT high FROM rx_senders WHERE sender = 'KOR'")
    assert highs == [(accepted,)]  # contiguous 1..accepted


async def test_a_withheld_message_still_raises_the_alarm(
    pki: Path, tmp_path: Path, broker: ConfiguredBroker
) -> None:
    """A broker that silently drops a stored message (its row deleted) is caught."""
    await broker.start()
    for code in ("KOR", "USA"):
        await admit(pki, broker.port, policy(code))
    cfg, db, log = await start_node(pki, tmp_path, broker.port)
    proc = await start_daemon(cfg, log)
    await wait_caught_up(log)
    assert await stop(proc) == 0
    kor = PartnerClient(
        load_partner(pki / "partners" / "KOR"),
        f"127.0.0.1:{broker.port}",
        sequencer=Sequencer(per_recipient=True),
    )
    try:
        offsets = []
        for i in range(6):
            s = await kor.seal(report(i), topic="intel.ground", label=LABEL, recipients=["USA"])
            [r] = await kor.publish([s.envelope])
            assert r.outcome == exchange_pb2.ACCEPTED
            offsets.append(r.offset)
    finally:
        await kor.close()
    with sqlite3.connect(tmp_path / "data" / "messages.db") as c:
        c.execute("DELETE FROM messages WHERE msg_offset = ?", (offsets[2],))
    proc = await start_daemon(cfg, log)
    try:
        await wait_caught_up(log, times=2)
        await eventually(lambda: bool(alarms(log)), 20)
    finally:
        assert await stop(proc) == 0
    [line] = alarms(log)
    assert "gap from KOR: sequence 3 missing" in line
    assert inbox_rows(db, "SELECT COUNT(*) FROM inbox") == [(5,)]


async def test_a_hole_in_a_live_stream_is_reported_after_the_grace_period(
    pki: Path, tmp_path: Path, broker: ConfiguredBroker
) -> None:
    """Caught up and live: the message numbered 3 for USA never reaches the broker (as if
    withheld); the hole is reported once it outlived the grace period, and only then."""
    await broker.start()
    for code in ("KOR", "USA"):
        await admit(pki, broker.port, policy(code))
    cfg, db, log = await start_node(pki, tmp_path, broker.port)
    proc = await start_daemon(cfg, log)
    kor = PartnerClient(
        load_partner(pki / "partners" / "KOR"),
        f"127.0.0.1:{broker.port}",
        sequencer=Sequencer(per_recipient=True),
    )
    try:
        await wait_caught_up(log)
        for i in range(1, 6):
            s = await kor.seal(report(i), topic="intel.ground", label=LABEL, recipients=["USA"])
            if i != 3:  # sealed (numbered 3 for USA) but never published
                [r] = await kor.publish([s.envelope])
                assert r.outcome == exchange_pb2.ACCEPTED
        await eventually(lambda: inbox_rows(db, "SELECT COUNT(*) FROM inbox") == [(4,)], 20)
        assert alarms(log) == []  # not yet: it may still come (within the grace period)
        await eventually(lambda: bool(alarms(log)), GAP_GRACE_S + 10)
    finally:
        await kor.close()
        assert await stop(proc) == 0
    [line] = alarms(log)
    assert "gap from KOR: sequence 3 missing" in line
