"""Broker configuration: a TOML file, overridden by command-line flags."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


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
    subscriber_window: int = 256
    # Hand new messages to caught-up subscribers straight from the publish path instead
    # of each subscriber reading them back from the store (same decisions, same audit).
    live_delivery: bool = True
    default_publish_rate_per_s: int = 2000
    audit_checkpoint_every: int = 500
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
    revoked_serials: tuple[str, ...] = field(default_factory=tuple)

    @property
    def receive_limit(self) -> int:
        """grpc's max_receive_message_length: max_request_bytes, or one largest envelope."""
        return max(self.max_request_bytes, self.max_envelope_bytes + (64 << 10))

    def with_overrides(self, **kw: Any) -> BrokerConfig:
        """A copy with every non-None keyword applied."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


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
        "subscriber_window",
        "default_publish_rate_per_s",
        "audit_checkpoint_every",
        "max_request_bytes",
        "max_publish_stream_bytes",
        "max_publish_partner_bytes",
        "max_publish_streams",
    },
    "log": {"json", "level"},
}


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
            name = str(renamed.get(key, key))
            values[name] = value
    for key in ("pki_dir", "data_dir"):
        if key in values:
            values[key] = (base / str(values[key])).resolve()
    for key in ("operators", "revoked_serials"):
        if key in values:
            # A bare string would otherwise become a tuple of its characters.
            if not isinstance(values[key], list) or not all(
                isinstance(v, str) for v in values[key]
            ):
                raise ConfigError(f"{path}: {key} must be a list of strings")
            values[key] = tuple(values[key])
    types = {f.name: f.type for f in fields(BrokerConfig)}
    for key, value in values.items():
        # bool is an int subclass in Python; TOML's true is no size.
        if types[key] == "int" and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"{path}: {key} must be an integer, got {value!r}")
        if types[key] == "bool" and not isinstance(value, bool):
            shown = {"log_json": "json"}.get(key, key)
            raise ConfigError(f"{path}: {shown} must be true or false, got {value!r}")
        if types[key] == "str" and not isinstance(value, str):
            raise ConfigError(f"{path}: {key} must be a string, got {value!r}")
    return BrokerConfig(**values)
