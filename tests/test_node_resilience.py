"""The node daemon against refusals, suspension, idle streams, clocks and crashes: real
broker, real `coalition-node run` processes over mutual TLS, counted in the audit log."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509

from broker.server import Broker
from clients.node.inbox import Inbox
from clients.node.parked import summary
from coalition.labels import parse_label
from coalition.pki import make_dev_pki
from coalition.v1 import exchange_pb2, intel_pb2
from tests.helpers import (
    admit,
    eventually,
    now_ms,
    operator,
    partner,
    policy,
    running_broker,
)
from tests.node_helpers import NODE, REPO, node, start_daemon, stop, write_config

LABEL = parse_label("NATO SECRET // REL TO USA")


@pytest.fixture
async def broker(pki: Path, tmp_path: Path) -> AsyncIterator[Broker]:
    b = await running_broker(pki, tmp_path / "broker")
    for code in ("KOR", "USA"):
        await admit(pki, b.port, policy(code))
    try:
        yield b
    finally:
        await b.stop(grace=1)


async def _audit(pki: Path, port: int, code: str, since: int) -> Counter[str]:
    async with operator(pki, "op1", port) as op:
        entries = await op.audit(partner=code, since_ms=since)
    return Counter(e.kind for e in entries)


async def _publish(pki: Path, port: int, n: int = 1) -> list[str]:
    ids = []
    async with partner(pki, "KOR", port) as kor:
        for i in range(n):
            body = intel_pb2.IntelSummary(title=f"report {i}", summary="...")
            s = await kor.seal(body.SerializeToString(), topic="intel.ground", label=LABEL)
            [res] = await kor.publish([s.envelope])
            assert res.outcome == exchange_pb2.ACCEPTED
            ids.append(s.message_id)
    return ids


async def _exit_code(proc: asyncio.subprocess.Process, timeout: float) -> int | None:
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        return None


async def test_a_permanent_refusal_stops_the_daemon_with_one_sentence(
    pki: Path, tmp_path: Path
) -> None:
    # USA was admitted with the first PKI; the PKI is made again and the broker restarted
    # with the new one over the same data: USA's admitted certificate no longer verifies.
    data = tmp_path / "broker"
    b = await running_broker(pki, data)
    await admit(pki, b.port, policy("USA"))
    await b.stop(grace=1)
    pki2 = tmp_path / "pki2"
    make_dev_pki(pki2, ["USA"], ["op1", "op2"], now_ms(), force=True)
    b = await running_broker(pki2, data)
    try:
        start = now_ms()
        cfg = write_config(tmp_path / "usa" / "node.toml", pki2, "USA", b.port)
        log = tmp_path / "usa.log"
        daemon = await start_daemon(cfg, log)
        code = await _exit_code(daemon, 20)
        if code is None:
            await stop(daemon)
        text = log.read_text()
        assert code == 1, text  # before: retried every 0.1-0.2 s, never exited
        assert "does not verify under this broker's CA" in text
        assert "operators must admit USA again" in text
        assert "'USA'" not in text  # not a KeyError's repr
        assert "stopping: retrying cannot help" in text
        refused = (await _audit(pki2, b.port, "USA", start))["keys.refused"]
        assert refused == 1
        status = await node("status", "--config", str(cfg))
        assert "not running: refused at" in status.out
    finally:
        await b.stop(grace=1)


async def test_a_suspended_node_backs_off_and_registers_nothing(
    pki: Path, tmp_path: Path, broker: Broker
) -> None:
    async with operator(pki, "op1", broker.port) as op1, operator(pki, "op2", broker.port) as op2:
        resp = await op1.suspend("USA", "test")
        if resp.WhichOneof("result") == "proposal":
            await op2.approve(resp.proposal.proposal_id, "test")
    start = now_ms()
    cfg = write_config(tmp_path / "usa" / "node.toml", pki, "USA", broker.port)
    log = tmp_path / "usa.log"
    daemon = await start_daemon(cfg, log)
    try:
        await asyncio.sleep(15)
        status = await node("status", "--config", str(cfg))
    finally:
        assert await stop(daemon) == 0
    kinds = await _audit(pki, broker.port, "USA", start)
    # Before: ~100 refusals and ~100 key registrations in 15 s (every 0.1-0.2 s).
    assert kinds["keys.registered"] == 0, kinds
    assert sum(kinds.values()) <= 8, kinds
    assert "suspended by operators since" in status.out, status.out
    assert "retrying every" in status.out
    assert "is suspended" in log.read_text()


async def test_an_idle_subscription_survives_keepalive_pings(pki: Path, tmp_path: Path) -> None:
    # Keepalive shortened to 1 s on the node and 0.5 s accepted by the broker (the same
    # ratio as 30 s and 10 s). Before, the broker kept grpc's 5 min minimum and answered
    # the pings with GOAWAY too_many_pings: the stream dropped, the node reconnected.
    b = await running_broker(pki, tmp_path / "broker", min_ping_interval_ms=500)
    try:
        for code in ("KOR", "USA"):
            await admit(pki, b.port, policy(code))
        start = now_ms()
        cfg = write_config(tmp_path / "usa" / "node.toml", pki, "USA", b.port)
        log = tmp_path / "usa.log"
        daemon = await start_daemon(
            cfg, log, "--log-json", env={"COALITION_KEEPALIVE_TIME_MS": "1000"}
        )
        try:
            await eventually(lambda: "caught up" in log.read_text(), 20)
            await asyncio.sleep(10)  # idle: about ten keepalive intervals
            status = await node("status", "--config", str(cfg))
            assert "connected now (since" in status.out, status.out
            [msg_id] = await _publish(pki, b.port)
            await eventually(lambda: msg_id in _ids(cfg), 10)
        finally:
            assert await stop(daemon) == 0
        text = log.read_text()
        assert "too_many_pings" not in text
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        events = Counter(str(d.get("event")) for d in lines)
        assert events["connected"] == 1, lines  # never dropped, never reconnected
        assert events["retry"] == 0, lines
        kinds = await _audit(pki, b.port, "USA", start)
        assert kinds["keys.registered"] <= 1, kinds
        # --log-json lines carry fields, not only a sentence.
        connected = next(d for d in lines if d.get("event") == "connected")
        assert connected["partner"] == "USA" and connected["broker"].endswith(str(b.port))
        after = await node("status", "--config", str(cfg))
        assert "daemon not running; last connected at" in after.out, after.out
    finally:
        await b.stop(grace=1)


def _ids(cfg: Path) -> list[str]:
    path = cfg.parent / "usa-inbox.db"
    if not path.exists():
        return []
    box = Inbox(path)
    try:
        return [e.message_id for e in box.entries()]
    finally:
        box.close()


async def test_a_slow_node_clock_holds_messages_instead_of_refusing_them(
    pki: Path, tmp_path: Path, broker: Broker
) -> None:
    signing = x509.load_pem_x509_certificate((pki / "ca" / "ca.crt").read_bytes())
    # The node's clock 10 minutes before the PKI was made: every certificate is "not yet
    # valid" to it.
    offset = int(signing.not_valid_before_utc.timestamp() * 1000) - now_ms() - 10 * 60_000
    cfg = write_config(tmp_path / "usa" / "node.toml", pki, "USA", broker.port)
    log = tmp_path / "usa.log"
    daemon = await start_daemon(cfg, log, env={"COALITION_NODE_CLOCK_OFFSET_MS": str(offset)})
    try:
        await eventually(lambda: bool(broker.exchange.live.get("USA")), 20)
        [msg_id] = await _publish(pki, broker.port)
        await eventually(lambda: "held back the delivery" in log.read_text(), 20)
        status = await node("status", "--config", str(cfg))
    finally:
        assert await stop(daemon) == 0
    text = log.read_text()
    assert "KOR's signing certificate" in text and "the node's clock may be wrong" in text
    assert "held back offset" in status.out and "clock" in status.out
    box = Inbox(cfg.parent / "usa-inbox.db")
    try:
        assert box.counts() == (0, 0)  # before: (0, 1), quarantined as unknown_sender
        assert len(summary(box.conn)) == 1
    finally:
        box.close()
    # The clock is right again: the held message reaches the inbox, never quarantined.
    daemon = await start_daemon(cfg, tmp_path / "usa-2.log")
    try:
        await eventually(lambda: msg_id in _ids(cfg), 20)
    finally:
        assert await stop(daemon) == 0
    box = Inbox(cfg.parent / "usa-inbox.db")
    try:
        assert box.counts() == (1, 0)
        assert summary(box.conn) == []
    finally:
        box.close()


# Each run writes one line as it starts (message id, pid, attempt), then works a moment.
HOOK = """import os, sys, time
sys.stdin.read()
with open(sys.argv[1], "a") as f:
    f.write(os.environ["COALITION_MESSAGE_ID"] + " " + str(os.getpid()) + " "
            + os.environ.get("COALITION_HOOK_ATTEMPT", "-") + "\\n")
time.sleep(0.3)
"""


async def _exited(pid: int) -> None:
    """Return the moment process pid exits (a pidfd turns readable), not a poll later."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already gone
    try:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        loop.add_reader(fd, done.set)
        try:
            await asyncio.wait_for(done.wait(), 10)
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


async def test_a_finished_hook_is_not_run_again_after_a_kill(
    pki: Path, tmp_path: Path, broker: Broker
) -> None:
    runs = tmp_path / "runs.txt"
    (tmp_path / "hook.py").write_text(HOOK)
    cfg = write_config(
        tmp_path / "usa" / "node.toml",
        pki,
        "USA",
        broker.port,
        extra=f'[hook]\ncommand = ["{sys.executable}", "{tmp_path / "hook.py"}", "{runs}"]\n',
    )
    log = tmp_path / "usa.log"
    daemon = await start_daemon(cfg, log)
    kills = 10
    try:
        await eventually(lambda: bool(broker.exchange.live.get("USA")), 20)
        for i in range(kills):
            [msg_id] = await _publish(pki, broker.port)
            await eventually(lambda: runs.exists() and msg_id in runs.read_text(), 20)  # noqa: B023
            line = next(x for x in runs.read_text().splitlines() if x.startswith(msg_id))
            pid = int(line.split()[1])
            await _exited(pid)  # the hook has finished its work and exited
            daemon.send_signal(signal.SIGKILL)  # right after: before it could record that
            await daemon.wait()
            daemon = await start_daemon(cfg, log)
            await eventually(lambda: log.read_text().count("connected to") == i + 2, 20)  # noqa: B023
    finally:
        assert await stop(daemon) == 0
    per_message = Counter(line.split()[0] for line in runs.read_text().splitlines())
    assert len(per_message) == kills
    # Before: about half of the messages had their hook run a second time.
    assert set(per_message.values()) == {1}, per_message
    box = Inbox(cfg.parent / "usa-inbox.db")
    try:
        assert {e.hook_status for e in box.entries()} == {"ok"}
    finally:
        box.close()


async def test_inbox_follow_prints_new_messages(pki: Path, tmp_path: Path, broker: Broker) -> None:
    cfg = write_config(tmp_path / "usa" / "node.toml", pki, "USA", broker.port)
    daemon = await start_daemon(cfg, tmp_path / "usa.log")
    follow = None
    try:
        await eventually(lambda: bool(broker.exchange.live.get("USA")), 20)
        follow = await asyncio.create_subprocess_exec(
            *NODE,
            "inbox",
            "--config",
            str(cfg),
            "--follow",
            "--json",
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        await asyncio.sleep(1)  # listing done (empty), now following
        ids = await _publish(pki, broker.port, 2)
        assert follow.stdout is not None
        got = [json.loads(await asyncio.wait_for(follow.stdout.readline(), 15)) for _ in ids]
        assert [g["message_id"] for g in got] == ids
    finally:
        if follow is not None:
            follow.terminate()
            assert await asyncio.wait_for(follow.wait(), 10) == 0
        assert await stop(daemon) == 0


async def test_a_handshake_failing_for_the_clock_names_the_clock(tmp_path: Path) -> None:
    # Every certificate starts 15 minutes from now: to this node (and host) the broker's
    # certificate is not valid yet, as to a node whose clock is 15 minutes slow.
    future = tmp_path / "pki"
    make_dev_pki(future, ["USA"], ["op1", "op2"], now_ms() + 20 * 60_000, force=True)
    b = await running_broker(future, tmp_path / "broker")
    try:
        cfg = write_config(tmp_path / "usa" / "node.toml", future, "USA", b.port)
        log = tmp_path / "usa.log"
        daemon = await start_daemon(cfg, log)
        try:
            await eventually(lambda: "retrying in" in log.read_text(), 20)
        finally:
            assert await stop(daemon) == 0
        text = log.read_text()
        # Before: only "unreachable" and grpc's raw handshake error. The sentence is the
        # SDK's (the same one every client prints), with this host's clock reading.
        assert f"TLS handshake with broker 127.0.0.1:{b.port} failed: " in text, text
        assert "the broker's certificate is not yet valid by this computer's clock" in text
        assert "(it reads 20" in text and "this clock is probably behind" in text
        # Status lines only: no raw gRPC Core log line in between.
        assert all(line.startswith("20") for line in text.splitlines()), text
    finally:
        await b.stop(grace=1)


async def test_a_broker_from_another_ca_stops_the_daemon_with_the_sdk_sentence(
    tmp_path: Path, broker: Broker
) -> None:
    # The node's identity comes from a PKI the session broker was not issued from.
    other = tmp_path / "other-pki"
    make_dev_pki(other, ["USA"], ["op1"], now_ms(), force=True)
    cfg = write_config(tmp_path / "usa" / "node.toml", other, "USA", broker.port)
    log = tmp_path / "usa.log"
    daemon = await start_daemon(cfg, log, "--log-json")
    code = await _exit_code(daemon, 20)
    if code is None:
        await stop(daemon)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert code == 1, lines
    refused = [d for d in lines if d.get("event") == "refused"]
    assert len(refused) == 1, lines
    # One explanation, the SDK's: the same sentence coalition-admin and publish print,
    # and the reason it carries (before: the daemon fetched the certificate itself and
    # wrote its own sentence, with no reason field).
    assert refused[0]["tls_reason"] == "other_ca", refused
    assert (
        f"TLS handshake with broker 127.0.0.1:{broker.port} failed: the broker's certificate "
        "is not signed by this coalition's CA (pki/ca.crt)"
    ) in refused[0]["msg"], refused


def test_the_sdk_reason_decides_whether_the_daemon_retries() -> None:
    from clients.node.daemon import Kind, classify
    from clients.sdk import BrokerTlsError, TlsReason

    kinds = {r: classify(BrokerTlsError("sentence", r)) for r in TlsReason}
    assert kinds == {
        TlsReason.OTHER_CA: Kind.PERMANENT,
        TlsReason.NOT_YET_VALID: Kind.TRANSIENT,
        TlsReason.EXPIRED: Kind.TRANSIENT,
        TlsReason.NAME_MISMATCH: Kind.TRANSIENT,
        TlsReason.UNVERIFIED: Kind.TRANSIENT,
    }


def test_reconnect_caps_are_configurable(tmp_path: Path) -> None:
    from clients.node.config import ConfigError, parse_config

    base = {"broker": "b:1", "identity": "i", "inbox": "x.db"}
    cfg = parse_config(base, tmp_path / "n.toml")
    assert (cfg.max_backoff_s, cfg.operator_max_backoff_s) == (30.0, 300.0)
    cfg = parse_config(
        {**base, "reconnect": {"max_backoff_s": 10, "operator_max_backoff_s": 60}},
        tmp_path / "n.toml",
    )
    assert (cfg.max_backoff_s, cfg.operator_max_backoff_s) == (10.0, 60.0)
    with pytest.raises(ConfigError, match="operator_max_backoff_s must be a number"):
        parse_config({**base, "reconnect": {"operator_max_backoff_s": 0}}, tmp_path / "n.toml")
    with pytest.raises(ConfigError, match="unknown key 'max_s'"):
        parse_config({**base, "reconnect": {"max_s": 5}}, tmp_path / "n.toml")
