"""The [store] section, and the durability check against real nats-server processes:
a cluster that does not fsync before acknowledging, or streams on fewer than three
replicas, are refused by name unless the operator allows data loss."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import pytest
from nats.js.api import StorageType, StreamConfig

from broker import backends
from broker.config import ConfigError, load_config
from broker.jetstream.connect import ClusterSettings, connect
from broker.jetstream.durability import (
    DurabilityError,
    ServerReport,
    check_servers,
    check_streams,
    server_weaknesses,
)
from clients.cluster import NatsCluster
from coalition.cli_common import EXIT_ERROR
from tests.broker_process import ConfiguredBroker
from tests.helpers import operator, running_broker

pytestmark = pytest.mark.asyncio


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(body)
    return path


async def test_store_section_is_read_with_paths_relative_to_the_config(tmp_path: Path) -> None:
    cfg = load_config(
        _write(
            tmp_path,
            '[store]\nbackend = "jetstream"\nservers = ["nats://a:4222", "nats://b:4222"]\n'
            'prefix = "ALLIES"\nreplicas = 3\nmonitor = ["http://a:8222"]\n'
            'tls_ca = "nats/ca.pem"\ntls_cert = "nats/c.pem"\ntls_key = "nats/c.key"\n'
            "allow_data_loss = true\n",
        )
    )
    assert cfg.store_backend == "jetstream"
    assert cfg.store_servers == ("nats://a:4222", "nats://b:4222")
    assert cfg.store_prefix == "ALLIES" and cfg.store_replicas == 3
    assert cfg.store_monitor == ("http://a:8222",)
    assert cfg.store_tls_ca == (tmp_path / "nats/ca.pem").resolve()
    assert cfg.store_tls_key == (tmp_path / "nats/c.key").resolve()
    assert cfg.allow_data_loss is True
    assert load_config(_write(tmp_path, "")).store_backend == "sqlite"  # the default


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('backend = "postgres"', "backend must be one of 'sqlite', 'jetstream'"),
        ('backend = "jetstream"', "servers is empty"),
        ('servers = "nats://a:4222"', "servers must be a list of strings"),
        ('backend = "jetstream"\nservers = ["a:4222"]', "is not a URL"),
        ('replicas = "3"', "replicas must be an integer"),
        ("replicas = 0", "replicas must be 1..5"),
        ('prefix = "a.b"', "prefix must be letters, digits and _"),
        ('tls_cert = "c.pem"', "tls_cert and tls_key go together"),
        ('allow_data_loss = "yes"', "allow_data_loss must be true or false"),
        ('sync = "always"', "unknown key 'sync' in [store]"),
    ],
)
async def test_bad_store_values_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(_write(tmp_path, f"[store]\n{body}\n"))


async def test_the_weaknesses_are_each_named() -> None:
    def varz(name: str, sync: bool, size: int = 3) -> dict[str, object]:
        config: dict[str, object] = {"sync_interval": 120_000_000_000}
        if sync:
            config["sync_always"] = True
        return {
            "server_name": name,
            "jetstream": {"config": config, "meta": {"cluster_size": size}},
        }

    good = [ServerReport(f"http://n{i}", varz(f"n{i}", True)) for i in range(3)]
    assert server_weaknesses(good) == ([], [])
    lazy = [*good[:2], ServerReport("http://n2", varz("n2", False))]
    weak, _ = server_weaknesses(lazy)
    assert weak == [
        "nats-server n2 fsyncs every 120 s, not before each acknowledgement (sync_interval: always)"
    ]
    # One server down: a majority still speaks for the cluster; it is only a warning.
    down = [*good[:2], ServerReport("http://n2", None, "not read (refused)")]
    assert server_weaknesses(down) == ([], ["http://n2: not read (refused)"])
    weak, _ = server_weaknesses(good[:1])
    assert weak and "only 1 of the cluster's 3 servers" in weak[0]
    weak, _ = server_weaknesses([])
    assert weak and "[store] monitor lists no monitoring URL" in weak[0]


def _monitors(cluster: NatsCluster) -> list[str]:
    return [f"http://127.0.0.1:{n.monitor_port}" for n in cluster.nodes]


async def test_a_cluster_without_sync_always_is_refused_unless_allowed(tmp_path: Path) -> None:
    with NatsCluster(tmp_path, sync_always=False) as cluster:
        settings = ClusterSettings(servers=tuple(cluster.urls))
        with pytest.raises(DurabilityError) as info:
            await check_servers(settings, _monitors(cluster))
        said = str(info.value)
        for node in cluster.nodes:
            assert f"nats-server {node.name} fsyncs every 120 s" in said
        assert "--allow-data-loss" in said
        allowed = ClusterSettings(servers=tuple(cluster.urls), allow_data_loss=True)
        weak = await check_servers(allowed, _monitors(cluster))
        assert len(weak) == 3


async def test_a_durable_cluster_passes_and_fewer_replicas_are_refused(
    nats_cluster: NatsCluster,
) -> None:
    prefix = f"T{uuid.uuid4().hex[:12]}"
    settings = ClusterSettings(servers=tuple(nats_cluster.urls), prefix=prefix)
    assert await check_servers(settings, _monitors(nats_cluster)) == []
    r1 = ClusterSettings(servers=tuple(nats_cluster.urls), prefix=prefix, replicas=1)
    with pytest.raises(DurabilityError, match=r"\[store\] replicas = 1"):
        await check_servers(r1, _monitors(nats_cluster))
    # A stream of the deployment made with one replica (by hand, say) is found and named.
    nc = await connect(settings)
    try:
        await nc.jetstream().add_stream(
            StreamConfig(
                name=settings.name("MESSAGES"),
                subjects=[settings.subject("msg", ">")],
                num_replicas=1,
                storage=StorageType.FILE,
            )
        )
        with pytest.raises(DurabilityError, match=f"stream {prefix}_MESSAGES has 1 replicas"):
            await check_streams(settings, nc)
        # Another deployment's streams are not this one's business.
        other = ClusterSettings(servers=tuple(nats_cluster.urls), prefix=prefix + "X")
        assert await check_streams(other, nc) == []
    finally:
        await nc.close()


def _store_toml(path: Path, cluster: NatsCluster, prefix: str) -> Path:
    servers = ", ".join(f'"{u}"' for u in cluster.urls)
    monitor = ", ".join(f'"{u}"' for u in _monitors(cluster))
    path.write_text(
        f'[store]\nbackend = "jetstream"\nservers = [{servers}]\nprefix = "{prefix}"\n'
        f"monitor = [{monitor}]\n"
    )
    return path


async def test_the_broker_refuses_a_lazy_cluster_and_starts_with_the_flag(
    pki: Path, tmp_path: Path
) -> None:
    with NatsCluster(tmp_path / "nats", sync_always=False) as cluster:
        conf = _store_toml(tmp_path / "broker.toml", cluster, "LAZY")
        (tmp_path / "b").mkdir()
        refused = ConfiguredBroker(pki, tmp_path / "b" / "data", extra_args=["--config", str(conf)])
        refused.proc = refused.spawn()
        assert await refused.wait_exit() == EXIT_ERROR
        said = refused.log()
        assert "cannot start: the JetStream cluster is less durable than required" in said
        assert "nats-server n1 fsyncs every 120 s" in said and "--allow-data-loss" in said
        allowed = ConfiguredBroker(
            pki,
            tmp_path / "b" / "data",
            port=refused.port,
            starts=refused.starts,
            extra_args=["--config", str(conf), "--allow-data-loss"],
        )
        try:
            await allowed.start()
            async with operator(pki, "op1", allowed.port) as op1:
                [entry] = await op1.audit(kind="store.durability_weakened")
            weaknesses = json.loads(entry.detail_json)["weaknesses"]
            assert len(weaknesses) == 3 and "sync_interval: always" in weaknesses[0]
            assert "starting with data loss allowed" in allowed.log()
            allowed.signal(signal.SIGTERM)
            assert await allowed.wait_exit() == 0
        finally:
            allowed.cleanup()


async def test_no_nats_server_answering_is_one_line_not_a_retry_loop(
    pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(backends, "CONNECT_WAIT_S", 1.5)
    with pytest.raises(OSError, match=r"no NATS server answered in 2 s \(nats://127.0.0.1:1\)"):
        await running_broker(
            pki,
            tmp_path / "b",
            store_backend="jetstream",
            store_servers=("nats://127.0.0.1:1",),
            allow_data_loss=True,
        )
    refused = [r for r in caplog.records if r.getMessage().startswith("NATS connection:")]
    assert len(refused) == 1  # the same refusal, tried again every 250 ms, said once
