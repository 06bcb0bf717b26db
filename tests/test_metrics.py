"""The Prometheus endpoint (docs/metrics.md) of real brokers over mTLS: off by default;
on, it serves the text exposition on its own plain-HTTP address, and its counters match
what partners did (a scrape during a publish burst included), with bounded labels."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.config import BrokerConfig, ConfigError, load_config
from broker.server import Broker
from clients.sdk import PartnerClient
from coalition.labels import parse_label
from coalition.v1 import envelope_pb2, exchange_pb2
from tests.broker_process import ConfiguredBroker
from tests.helpers import admit, eventually, now_ms, partner, policy, running_broker, sqlite_only
from tests.metrics_helpers import Scrape, http_get, scrape
from tests.test_broker_faults import free_port
from tests.v2_batches import forged_signature, seal_v2

LABEL = parse_label("NATO SECRET // REL TO KOR, USA")
TOPIC = "intel.ground"
PUBLISHED = "coalition_envelopes_published_total"


def _listening_inodes() -> set[str]:
    """Socket inodes of this process that listen on TCP (from /proc, as ss would)."""
    listening: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A":  # TCP_LISTEN
                listening.add(cols[9])
    ours: set[str] = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            ours.add(target[len("socket:[") : -1])
    return listening & ours


async def _pair(pki: Path, data: Path, **kw: object) -> Broker:
    b = await running_broker(pki, data, **kw)
    for code in ("KOR", "USA"):
        await admit(pki, b.port, policy(code))
    return b


@pytest.fixture
async def metered(pki: Path, tmp_path: Path, backend: dict[str, object]) -> AsyncIterator[Broker]:
    """An in-process broker with metrics on a port the system picks; KOR, USA admitted."""
    b = await _pair(
        pki,
        tmp_path / "broker",
        metrics_listen="127.0.0.1:0",
        audit_checkpoint_every=5,
        **backend,
    )
    try:
        yield b
    finally:
        await b.stop(grace=1)


async def _seal(kor: PartnerClient, n: int, tag: str) -> list[envelope_pb2.Envelope]:
    return [
        (
            await kor.seal(f"{tag} {i}".encode(), topic=TOPIC, label=LABEL, recipients=["USA"])
        ).envelope
        for i in range(n)
    ]


def _bad_signature(e: envelope_pb2.Envelope) -> envelope_pb2.Envelope:
    return forged_signature(e)  # v1 or v2: refused bad_signature


# -- off by default ---------------------------------------------------------------------


async def test_metrics_are_off_by_default(pki: Path, tmp_path: Path) -> None:
    assert BrokerConfig().metrics_listen == ""
    before = _listening_inodes()
    b = await running_broker(pki, tmp_path / "off")
    try:
        assert b.metrics is None
        # One new listening socket: the gRPC port (mTLS), and no plain-HTTP one.
        assert len(_listening_inodes() - before) == 1
    finally:
        await b.stop(grace=1)
    b = await running_broker(pki, tmp_path / "on", metrics_listen="127.0.0.1:0")
    try:
        assert b.metrics is not None
        assert len(_listening_inodes() - before) == 2
    finally:
        await b.stop(grace=1)


def test_metrics_listen_in_the_config_file(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "broker.toml"
    assert load_config(example).metrics_listen == ""  # the example sets it: off
    cfg = tmp_path / "broker.toml"
    cfg.write_text('[broker]\nlisten = "127.0.0.1:7443"\n[metrics]\nlisten = "127.0.0.1:9464"\n')
    loaded = load_config(cfg)
    assert loaded.metrics_listen == "127.0.0.1:9464"
    assert loaded.listen == "127.0.0.1:7443"
    cfg.write_text("[metrics]\nport = 9464\n")
    with pytest.raises(ConfigError, match="unknown key 'port' in \\[metrics\\]"):
        load_config(cfg)


# -- the endpoint -------------------------------------------------------------------------


async def test_endpoint_serves_text_exposition(metered: Broker) -> None:
    assert metered.metrics is not None
    port = metered.metrics.port
    got = await scrape(port)
    assert got.content_type.startswith("text/plain; version=0.0.4")
    for name in (
        "coalition_partner_policy_version",
        "coalition_partner_lag_messages",
        "coalition_store_commit_duration_seconds_count",
        "process_resident_memory_bytes",
    ):
        assert got.series(name), name
    assert got.value("coalition_partner_policy_version", partner="USA") >= 1
    assert got.value("coalition_audit_entries") > 0
    if metered.backend is not None and metered.backend.files:  # n/a on JetStream
        # A checkpoint was signed during the admissions (every 5 entries here), just now.
        checkpoint_s = got.value("coalition_audit_last_checkpoint_timestamp_seconds")
        assert abs(checkpoint_s - now_ms() / 1000) < 600
    assert got.value("coalition_partner_status", partner="USA", status="active") == 1
    # Both stores' commits are timed (the admissions wrote to both; on JetStream the
    # cursors they start live in a bucket, not in the message stream).
    if metered.backend is not None and metered.backend.files:
        assert got.value("coalition_store_commit_duration_seconds_count", store="messages") > 0
    assert got.value("coalition_store_commit_duration_seconds_count", store="audit") > 0
    assert (await http_get(port, "/"))[0] == 404
    assert (await http_get(port, "/metrics/../admin"))[0] == 404
    # Anything but GET or HEAD is refused; a request head over 8 KiB gets no answer.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 405 ")
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n")
    try:
        answer = await reader.read()
    except ConnectionResetError:  # closed with the head unread: the kernel resets
        answer = b""
    assert answer == b""
    writer.close()


async def test_store_reads_are_cached_between_scrapes(metered: Broker) -> None:
    assert metered.metrics is not None
    collector = metered.metrics.collector
    await scrape(metered.metrics.port)
    reads = collector.refreshes
    for _ in range(5):
        await scrape(metered.metrics.port)
    assert collector.refreshes == reads  # within the cache's 2 s: no further store reads


async def test_counters_match_a_publish_burst_scraped_while_it_runs(
    pki: Path, tmp_path: Path
) -> None:
    """A broker process; KOR publishes batches (some replays and forged signatures) while
    a scraper reads the endpoint; each scrape lies between what was acknowledged before
    it and what was sent after it, and at the end the counters equal what was sent."""
    metrics_port = free_port()
    proc = ConfiguredBroker(
        pki, tmp_path / "data", extra_args=["--metrics-listen", f"127.0.0.1:{metrics_port}"]
    )
    await proc.start()
    kor, usa = partner(pki, "KOR", proc.port), partner(pki, "USA", proc.port)
    try:
        for code in ("KOR", "USA"):
            await admit(pki, proc.port, policy(code))
        await kor.register_keys()
        await usa.register_keys()
        sub = usa.subscribe([TOPIC])
        received: list[str] = []

        async def receive() -> None:
            async for d in sub:
                received.append((await usa.open(d)).header.message_id)
                await sub.ack([d.offset])

        reader = asyncio.create_task(receive())
        await asyncio.wait_for(sub.caught_up.wait(), 10)

        batches, per_batch = 12, 15
        acknowledged = sent = 0  # accepted envelopes answered / handed to publish
        scrapes: list[tuple[int, float, int]] = []  # (acknowledged before, value, sent after)
        bursting = True

        async def scraper() -> None:
            while bursting:
                lo = acknowledged
                got = await scrape(metrics_port)
                scrapes.append(
                    (
                        lo,
                        got.value(PUBLISHED, partner="KOR", result="accepted", reason="none"),
                        sent,
                    )
                )
                await asyncio.sleep(0.005)

        scraping = asyncio.create_task(scraper())
        await eventually(lambda: len(scrapes) >= 1, timeout=10)
        ids: list[str] = []
        replays = forged = 0
        previous: list[envelope_pb2.Envelope] = []
        for b in range(batches):
            envs = await _seal(kor, per_batch, f"burst {b}")
            extra: list[envelope_pb2.Envelope] = []
            if previous:
                extra.append(previous[0])  # a replay of an accepted envelope
                replays += 1
            if b % 3 == 0:
                extra.append(_bad_signature(envs.pop()))  # forged: bad_signature
                forged += 1
            sent += len(envs)
            results = await kor.publish([*envs, *extra])
            outcomes = [r.outcome for r in results]
            assert outcomes == [exchange_pb2.ACCEPTED] * len(envs) + [exchange_pb2.REFUSED] * len(
                extra
            ), results
            acknowledged += len(envs)
            previous = envs
            ids += [r.message_id for r in results[: len(envs)]]
        bursting = False
        await scraping
        during = [s for s in scrapes if s[0] < acknowledged]
        assert len(during) >= 2, scrapes  # scraped while the burst was on
        for lo, value, hi in scrapes:
            assert lo <= value <= hi, (lo, value, hi)
        values = [v for _, v, _ in scrapes]
        assert values == sorted(values)  # a counter never goes down

        await eventually(lambda: len(received) == acknowledged, timeout=30)
        final = await scrape(metrics_port)
        assert final.value(PUBLISHED, partner="KOR", result="accepted", reason="none") == sent
        assert final.value(PUBLISHED, partner="KOR", result="refused", reason="replay") == replays
        assert (
            final.value(PUBLISHED, partner="KOR", result="refused", reason="bad_signature")
            == forged
        )
        assert final.total(PUBLISHED, result="refused") == replays + forged
        assert final.value("coalition_deliveries_total", partner="USA") == sent
        assert final.value("coalition_policy_decisions_total", reason="allow") == sent
        assert final.value("coalition_verify_duration_seconds_count") >= batches
        # Nothing of a message's identity or content is a label or a value.
        assert ids and not any(mid in final.text for mid in ids)
        assert TOPIC not in final.text
        for labels in final.series(PUBLISHED):
            assert labels["partner"] in {"KOR", "USA", "unknown"}
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await sub.aclose()
    finally:
        await kor.close()
        await usa.close()
        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit() == 0
        proc.cleanup()


async def test_lag_and_in_flight_window(metered: Broker, pki: Path) -> None:
    """A subscriber that reads but never acknowledges fills its window; once it stops
    reading, what is stored for it shows as lag."""
    assert metered.metrics is not None
    port = metered.metrics.port
    kor, usa = partner(pki, "KOR", metered.port), partner(pki, "USA", metered.port)
    try:
        await kor.register_keys()
        await usa.register_keys()
        sub = usa.subscribe([TOPIC], window=8)
        seen: list[int] = []

        async def hold() -> None:
            async for d in sub:
                seen.append(d.offset)  # read, never acknowledged

        reader = asyncio.create_task(hold())
        await asyncio.wait_for(sub.caught_up.wait(), 10)
        results = await kor.publish(await _seal(kor, 20, "lag"))
        assert all(r.outcome == exchange_pb2.ACCEPTED for r in results)
        await eventually(lambda: len(seen) == 8, timeout=10)
        got = await scrape(port)
        assert got.value("coalition_partner_inflight_messages", partner="USA") == 8
        assert got.value("coalition_partner_window_messages", partner="USA") == 8
        assert got.value("coalition_partner_live_streams", partner="USA") == 1
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await sub.aclose()
        await eventually(lambda: not metered.exchange.live.get("USA"), timeout=10)
        more = await kor.publish(await _seal(kor, 5, "more"))
        assert all(r.outcome == exchange_pb2.ACCEPTED for r in more)
        last: list[Scrape] = []

        async def lag_is(n: int) -> bool:
            last[:] = [await scrape(port)]
            return last[0].value("coalition_partner_lag_messages", partner="USA") == n

        deadline = asyncio.get_running_loop().time() + 15  # the lag cache is 2 s
        while not await lag_is(25):
            assert asyncio.get_running_loop().time() < deadline, last[0].series(
                "coalition_partner_lag_messages"
            )
            await asyncio.sleep(0.2)
        assert last[0].value("coalition_partner_live_streams", partner="USA") == 0
        assert last[0].value("coalition_partner_inflight_messages", partner="USA") == 0
        assert last[0].value("coalition_store_messages") == 25
    finally:
        await kor.close()
        await usa.close()


async def test_unknown_callers_make_no_label_series(metered: Broker, pki: Path) -> None:
    """ROGUE holds a CA-issued certificate but was never admitted: refused by the
    interceptor, counted by reason only; and the core, asked directly for a partner the
    registry does not hold, counts it as "unknown"."""
    assert metered.metrics is not None
    port = metered.metrics.port
    kor = partner(pki, "KOR", metered.port)
    usa = partner(pki, "USA", metered.port)
    rogue = partner(pki, "ROGUE", metered.port)
    try:
        await kor.register_keys()
        await usa.register_keys()
        envs = await _seal(kor, 3, "rogue")
        before = await scrape(port)
        with pytest.raises(Exception):  # noqa: B017 - refused at the edge: any client error
            await rogue.publish(envs)
        after = await scrape(port)
        refused = "coalition_auth_refusals_total"
        assert (
            after.value(refused, reason="unknown_partner")
            == before.value(refused, reason="unknown_partner") + 1
        )
        assert "ROGUE" not in after.text
        assert sorted(after.samples) == sorted(before.samples)  # no new series at all
        # The core itself, past the edge, with a sender the registry does not hold.
        outcomes = await metered.exchange.publish("ROGUE", envs)
        assert all(o.error.code == "unknown_sender" for o in outcomes)  # type: ignore[union-attr]
        last = await scrape(port)
        assert "ROGUE" not in last.text
        assert (
            last.value(PUBLISHED, partner="unknown", result="refused", reason="unknown_sender") == 3
        )
    finally:
        await kor.close()
        await usa.close()
        await rogue.close()


def test_a_metrics_address_without_port_is_one_line(
    pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from broker.cli import main

    argv = ["serve", "--pki", str(pki), "--data", str(tmp_path / "d")]
    assert main([*argv, "--metrics-listen", "localhost"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("coalition-broker: cannot start: metrics: listen address 'localhost'")
    assert err.count("\n") == 1
    assert not (tmp_path / "d").exists()  # nothing written


async def test_metrics_port_taken_refuses_to_start(pki: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        with pytest.raises(OSError, match="address in use"):
            await running_broker(pki, tmp_path / "b", metrics_listen=f"127.0.0.1:{taken}")


# -- the Grafana dashboard ----------------------------------------------------------------

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "coalition.json"
# Labels Prometheus adds to every scraped series (target labels), not the broker.
TARGET_LABELS = {"instance", "job"}
_NAME = re.compile(r"\b((?:coalition|process)_[a-z0-9_]+)\b")
_SELECTOR = re.compile(r"\b((?:coalition|process)_[a-z0-9_]+)\{([^}]*)\}")
_MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"([^"]*)"\s*')
_BY = re.compile(r"\bby\s*\(([^)]*)\)")


def _dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    assert len(exprs) > 20
    return exprs


@sqlite_only("its last-checkpoint panel reads audit.db: n/a on JetStream")
async def test_dashboard_queries_only_what_the_broker_exposes(metered: Broker, pki: Path) -> None:
    """Every metric, label and literal label value a dashboard query names is in a real
    broker's exposition (after one accepted and one refused publish)."""
    assert metered.metrics is not None
    kor, usa = partner(pki, "KOR", metered.port), partner(pki, "USA", metered.port)
    try:
        await kor.register_keys()
        await usa.register_keys()
        envs = await _seal(kor, 1, "dash")
        assert (await kor.publish(envs))[0].outcome == exchange_pb2.ACCEPTED
        assert (await kor.publish(envs))[0].outcome == exchange_pb2.REFUSED  # replay
    finally:
        await kor.close()
        await usa.close()
    got = await scrape(metered.metrics.port)
    labels_of: dict[str, set[str]] = {}
    values_of: dict[tuple[str, str], set[str]] = {}
    for name, lbl in got.samples:
        labels_of.setdefault(name, set()).update(k for k, _ in lbl)
        for k, v in lbl:
            values_of.setdefault((name, k), set()).add(v)
    problems: list[str] = []
    for expr in _dashboard_queries():
        names = set(_NAME.findall(expr))
        if not names:
            problems.append(f"no broker metric in {expr!r}")
        for name in names:
            if name not in labels_of:
                problems.append(f"{name} is not exposed ({expr!r})")
        known = set().union(*(labels_of.get(n, set()) for n in names)) | TARGET_LABELS
        for by in _BY.findall(expr):
            for label in filter(None, (s.strip() for s in by.split(","))):
                if label not in known:
                    problems.append(f"by ({label}) is no label of {sorted(names)} ({expr!r})")
        for name, body in _SELECTOR.findall(expr):
            for matcher in filter(None, body.split(",")):
                m = _MATCHER.fullmatch(matcher)
                if m is None:
                    problems.append(f"cannot read matcher {matcher!r} in {expr!r}")
                    continue
                label, op, value = m.groups()
                if label in TARGET_LABELS:
                    continue
                if label not in labels_of.get(name, set()):
                    problems.append(f"{name} has no label {label} ({expr!r})")
                elif op == "=" and value not in values_of.get((name, label), set()):
                    problems.append(f'{name}{{{label}="{value}"}} never exposed ({expr!r})')
    assert problems == []


async def test_batch_root_checks_and_cache_hits_are_counted(metered: Broker, pki: Path) -> None:
    # One hybrid root check per v2 batch, whatever its size; its other envelopes, in the
    # same request or a later one, are cache hits; a broken root signature counts as a check.
    assert metered.metrics is not None
    async with partner(pki, "KOR", metered.port) as kor, partner(pki, "USA", metered.port) as usa:
        await usa.register_keys()
        batch = await seal_v2(
            kor, [b"%d" % i for i in range(8)], topic=TOPIC, label=LABEL, recipients=["USA"]
        )
        assert all(r.outcome == exchange_pb2.ACCEPTED for r in await kor.publish(batch[:6]))
        assert all(r.outcome == exchange_pb2.ACCEPTED for r in await kor.publish(batch[6:]))
        other = await seal_v2(kor, [b"x"], topic=TOPIC, label=LABEL, recipients=["USA"])
        other[0].batch.root_signature.ml_dsa_65 = b""
        [bad] = await kor.publish(other)
        assert bad.reason_code == "bad_signature", bad
    got = await scrape(metered.metrics.port)
    assert got.value("coalition_batch_root_checks_total") == 2
    assert got.value("coalition_batch_root_cache_hits_total") == 7
    assert got.value(PUBLISHED, partner="KOR", result="refused", reason="bad_signature") == 1
