"""Broker configuration: a TOML file, overridden by command-line flags."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from broker.revocation import parse_serial


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or has a wrong value."""


@dataclass(frozen=True)
class BrokerConfig:
    """Everything the broker needs to start. Paths are resolved against the config file."""

    listen: str = "127.0.0.1:7443"
    name: str = "broker"
    pki_dir: Path = Path("pki")
    data_dir: Path = Path("data/broker")
    operators: tuple[str, ...] = ()
    max_envelope_bytes: int = 1 << 20
    clock_skew_ms: int = 5 * 60 * 1000
    max_store_bytes: int = 1 << 30
    # Publishes are refused while the data disk has less free space than this, so the
    # audit log and the WAL always have room to record the refusal.
    min_free_bytes: int = 64 << 20
    retention_bytes: int = 512 << 20
    retention_ms: int = 7 * 24 * 3600 * 1000
    # Each sender's quota of stored envelope bytes; 0 = max_store_bytes // 8. Must be
    # below max_store_bytes, so one partner alone can never fill the store.
    sender_store_bytes: int = 0
    retention_interval_ms: int = 60_000
    # Expiry notices kept per partner until it acknowledges them; beyond this the oldest
    # are forgotten (their deliver.expired audit entries remain).
    max_notices_per_partner: int = 10_000
    subscriber_window: int = 256
    # One subscription's topic patterns: at most this many, of at most this many bytes
    # in all (a larger open is refused before any pattern is parsed).
    max_subscribe_patterns: int = 256
    max_subscribe_pattern_bytes: int = 16 * 1024
    # HTTP/2 streams one connection may hold open at once (MAX_CONCURRENT_STREAMS);
    # streams reset by the client count until the broker has released them.
    max_streams_per_connection: int = 32
    # A connection with no call for this long is closed (clients reconnect on demand).
    max_connection_idle_ms: int = 5 * 60 * 1000
    # Shortest interval at which a client may send HTTP/2 keepalive pings on a connection
    # with no data moving (an idle subscription); faster pingers are sent GOAWAY
    # too_many_pings. Below the SDK's 30 s keepalive, so idle node streams stay up.
    min_ping_interval_ms: int = 10_000
    # Connections on which one identity may have calls in progress at once (0 = off).
    max_connections_per_identity: int = 16
    # Hand new messages to caught-up subscribers straight from the publish path instead
    # of each subscriber reading them back from the store (same decisions, same audit).
    live_delivery: bool = True
    default_publish_rate_per_s: int = 2000
    # Key-bundle changes one partner may make in a sliding minute (0 = unbounded).
    max_key_changes_per_min: int = 10
    audit_checkpoint_every: int = 500
    # The audit drainer moves outbox records into the audit log at most once per this
    # interval (records committed meanwhile go in one batch); reads and shutdown drain
    # at once.
    audit_drain_interval_ms: int = 200
    # Refusals a partner can cause at will are audited one by one up to this many per
    # partner and interval (all kinds together); the rest are counted and summarised per
    # kind and reason when the interval closes (0 = every refusal one by one).
    refusal_audit_threshold: int = 100
    refusal_audit_interval_ms: int = 60_000
    # Wire limits. A request (one gRPC message) larger than max_request_bytes is refused
    # by grpc before it is buffered (RESOURCE_EXHAUSTED); one envelope of
    # max_envelope_bytes always fits. A Publish stream stops reading further requests
    # while the requests it has in flight hold max_publish_stream_bytes, and all of a
    # partner's streams while they hold max_publish_partner_bytes (HTTP/2 flow control
    # then holds the client back); a partner may hold max_publish_streams Publish streams.
    max_request_bytes: int = (4 << 20) + (64 << 10)
    max_publish_stream_bytes: int = 16 << 20
    max_publish_partner_bytes: int = 32 << 20
    max_publish_streams: int = 8
    log_json: bool = False
    log_level: str = "info"
    # Prometheus metrics over plain HTTP on this address ("" = off, the default).
    metrics_listen: str = ""
    revoked_serials: tuple[str, ...] = field(default_factory=tuple)
    # Where messages, cursors, the registry and the audit log live: "sqlite" (files in
    # data_dir, the embedded default) or "jetstream" (a NATS JetStream cluster, so several
    # brokers serve the same coalition; docs/cluster.md).
    store_backend: str = "sqlite"
    store_servers: tuple[str, ...] = ()
    store_prefix: str = "COALITION"
    store_replicas: int = 3
    # The servers' monitoring URLs (http://host:8222): where the durability check reads
    # each server's configuration (broker.jetstream.durability).
    store_monitor: tuple[str, ...] = ()
    store_tls_ca: Path | None = None
    store_tls_cert: Path | None = None
    store_tls_key: Path | None = None
    # Start even if the cluster's durability is weaker than the SQLite backend's (no
    # fsync before each acknowledgement, fewer than 3 replicas): acknowledged writes may
    # be lost. Logged and audited when it takes effect.
    allow_data_loss: bool = False
    # Federation (docs/federation.md): the operators' trust file naming this broker's
    # nation, its peer nations' CAs and their brokers' endpoints (None = no federation).
    federation_file: Path | None = None
    # A peer's gateway, as any partner, is bounded (docs/federation.md, *Bounds*): its
    # forwarded envelopes take tokens at its policy's publish_rate_per_s, else at this
    # rate (its Forward stream waits for them); it may hold max_forward_streams Forward
    # streams and make max_federation_directory_per_min Directory calls a minute.
    default_forward_rate_per_s: int = 2000
    max_forward_streams: int = 2
    max_federation_directory_per_min: int = 60

    @property
    def receive_limit(self) -> int:
        """grpc's max_receive_message_length: max_request_bytes, or one largest envelope."""
        return max(self.max_request_bytes, self.max_envelope_bytes + (64 << 10))

    def with_overrides(self, **kw: Any) -> BrokerConfig:
        """A copy with every non-None keyword applied."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    @property
    def sender_quota(self) -> int:
        """Each sender's quota of stored bytes: sender_store_bytes, or an eighth of the store."""
        return self.sender_store_bytes or self.max_store_bytes // 8


_SECTIONS = {
    "broker": {"listen", "name", "data_dir", "operators", "revoked_serials", "live_delivery"},
    "pki": {"dir"},
    "limits": {
        "max_envelope_bytes",
        "clock_skew_ms",
        "max_store_bytes",
        "min_free_bytes",
        "retention_bytes",
        "retention_ms",
        "sender_store_bytes",
        "retention_interval_ms",
        "max_notices_per_partner",
        "subscriber_window",
        "max_subscribe_patterns",
        "max_subscribe_pattern_bytes",
        "max_streams_per_connection",
        "max_connection_idle_ms",
        "min_ping_interval_ms",
        "max_connections_per_identity",
        "default_publish_rate_per_s",
        "max_key_changes_per_min",
        "audit_checkpoint_every",
        "audit_drain_interval_ms",
        "refusal_audit_threshold",
        "refusal_audit_interval_ms",
        "max_request_bytes",
        "max_publish_stream_bytes",
        "max_publish_partner_bytes",
        "max_publish_streams",
        "default_forward_rate_per_s",
        "max_forward_streams",
        "max_federation_directory_per_min",
    },
    "log": {"json", "level"},
    "metrics": {"listen"},
    "store": {
        "backend",
        "servers",
        "prefix",
        "replicas",
        "monitor",
        "tls_ca",
        "tls_cert",
        "tls_key",
        "allow_data_loss",
    },
    "federation": {"file"},
}
BACKENDS = ("sqlite", "jetstream")


def load_config(path: Path | None) -> BrokerConfig:
    """Read a TOML config; unknown keys are errors so typos do not pass silently."""
    if path is None:
        return BrokerConfig()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    base = path.parent
    values: dict[str, Any] = {}
    for section, body in raw.items():
        allowed = _SECTIONS.get(section)
        if allowed is None or not isinstance(body, dict):
            raise ConfigError(f"{path}: unknown section [{section}]")
        for key, value in body.items():
            if key not in allowed:
                raise ConfigError(f"{path}: unknown key {key!r} in [{section}]")
            renamed = {"dir": "pki_dir", "json": "log_json", "level": "log_level"}
            name = f"metrics_{key}" if section == "metrics" else str(renamed.get(key, key))
            if section == "store" and key != "allow_data_loss":
                name = f"store_{key}"
            if section == "federation":
                name = f"federation_{key}"
            values[name] = value
    for key in ("pki_dir", "data_dir"):
        if key in values:
            values[key] = (base / str(values[key])).resolve()
    for key in ("store_tls_ca", "store_tls_cert", "store_tls_key", "federation_file"):
        if key in values:
            if not isinstance(values[key], str) or not values[key]:
                shown = key.removeprefix("store_").removeprefix("federation_")
                raise ConfigError(f"{path}: {shown} must be a file path")
            values[key] = (base / values[key]).resolve()
    for key in ("operators", "revoked_serials", "store_servers", "store_monitor"):
        if key in values:
            # A bare string would otherwise become a tuple of its characters.
            if not isinstance(values[key], list) or not all(
                isinstance(v, str) for v in values[key]
            ):
                shown = key.removeprefix("store_")
                raise ConfigError(f"{path}: {shown} must be a list of strings")
            values[key] = tuple(values[key])
    for entry in values.get("revoked_serials", ()):
        try:
            parse_serial(entry)  # compared as numbers later; a typo must not pass silently
        except ValueError as exc:
            raise ConfigError(f"{path}: revoked_serials: {exc}") from exc
    types = {f.name: f.type for f in fields(BrokerConfig)}
    for key, value in values.items():
        # bool is an int subclass in Python; TOML's true is no size.
        shown = key.removeprefix("store_")
        if types[key] == "int" and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"{path}: {shown} must be an integer, got {value!r}")
        if types[key] == "bool" and not isinstance(value, bool):
            shown = {"log_json": "json"}.get(key, shown)
            raise ConfigError(f"{path}: {shown} must be true or false, got {value!r}")
        if types[key] == "str" and not isinstance(value, str):
            raise ConfigError(f"{path}: {shown} must be a string, got {value!r}")
    cfg = BrokerConfig(**values)
    try:
        check_store(cfg)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if not 0 <= cfg.sender_store_bytes < cfg.max_store_bytes:
        raise ConfigError(
            f"{path}: sender_store_bytes must be below max_store_bytes "
            f"({cfg.sender_store_bytes} >= {cfg.max_store_bytes}), so one partner alone "
            "cannot fill the store"
        )
    for key in ("retention_interval_ms", "max_notices_per_partner"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{path}: {key} must be above 0")
    return cfg


def check_store(cfg: BrokerConfig) -> None:
    """Refuse a [store] section that cannot work, naming the key; raises ValueError."""
    if cfg.store_backend not in BACKENDS:
        raise ValueError(
            f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {cfg.store_backend!r}"
        )
    if cfg.store_replicas < 1 or cfg.store_replicas > 5:
        raise ValueError(f"replicas must be 1..5 (JetStream's range), got {cfg.store_replicas}")
    if not cfg.store_prefix.isascii() or not cfg.store_prefix.replace("_", "").isalnum():
        raise ValueError(
            f"prefix must be letters, digits and _ (it names streams and subjects), "
            f"got {cfg.store_prefix!r}"
        )
    if (cfg.store_tls_cert is None) != (cfg.store_tls_key is None):
        raise ValueError("tls_cert and tls_key go together: give both or neither")
    if cfg.store_backend == "jetstream":
        if not cfg.store_servers:
            raise ValueError('servers is empty: backend "jetstream" needs the NATS server URLs')
        for url in (*cfg.store_servers, *cfg.store_monitor):
            if "://" not in url:
                raise ValueError(f"{url!r} in [store] is not a URL (nats://host:4222, ...)")
