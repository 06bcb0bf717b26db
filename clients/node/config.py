"""The node's TOML config file: where the broker is, who we are, what we keep where."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coalition.federation import FederationError, TrustFile, load_trust_file
from coalition.topics import TopicError, validate_pattern

DEFAULT_WINDOW = 64
DEFAULT_HOOK_TIMEOUT_S = 10.0
LOG_LEVELS = ("debug", "info", "warning", "error")

_TOP_KEYS = {
    "broker",
    "identity",
    "inbox",
    "topics",
    "window",
    "hook",
    "log",
    "reconnect",
    "federation",
}
_RECONNECT_KEYS = {"max_backoff_s", "operator_max_backoff_s"}
DEFAULT_MAX_BACKOFF_S = 30.0
DEFAULT_OPERATOR_MAX_BACKOFF_S = 300.0
_HOOK_KEYS = {"command", "timeout_s", "content"}
_LOG_KEYS = {"json", "level"}


class ConfigError(ValueError):
    """The config file is missing or wrong; the message names the file and the key."""


@dataclass(frozen=True)
class HookConfig:
    """A command run once for each new inbox message, fed JSON on stdin."""

    command: tuple[str, ...]
    timeout_s: float = DEFAULT_HOOK_TIMEOUT_S
    # Whether stdin carries the decrypted summary fields, not only metadata.
    content: bool = True


@dataclass(frozen=True)
class NodeConfig:
    """Everything `coalition-node` needs; relative paths are resolved against the file's folder."""

    path: Path
    broker: str
    identity: Path
    inbox: Path
    topics: tuple[str, ...] = ("intel.>",)
    window: int = DEFAULT_WINDOW
    hook: HookConfig | None = None
    log_json: bool = False
    log_level: str = "info"
    # Longest wait between attempts: after a transient failure, and while operators
    # have the partner suspended or not yet admitted.
    max_backoff_s: float = DEFAULT_MAX_BACKOFF_S
    operator_max_backoff_s: float = DEFAULT_OPERATOR_MAX_BACKOFF_S
    # Federation: the trust file naming peer nations' CAs, which verify senders and
    # recipients served by other nations' brokers (None: this coalition's CA only).
    federation_file: Path | None = None


def load_config(path: Path) -> NodeConfig:
    """Read and check a node config. Raises ConfigError with one clear sentence."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return parse_config(raw, path)


def parse_config(raw: dict[str, Any], path: Path) -> NodeConfig:
    """Check the parsed TOML table; see docs/node.md for the keys."""
    where = f"config file {path}"
    _no_unknown(raw, _TOP_KEYS, where)
    base = path.parent
    broker = _str(raw, "broker", where)
    if ":" not in broker:
        raise ConfigError(f"{where}: broker must be host:port, got {broker!r}")
    topics_raw = raw.get("topics", ["intel.>"])
    if not isinstance(topics_raw, list) or not topics_raw:
        raise ConfigError(f"{where}: topics must be a non-empty list of topic patterns")
    try:
        topics = tuple(validate_pattern(str(t)) for t in topics_raw)
    except TopicError as exc:
        raise ConfigError(f"{where}: topics: {exc}") from None
    window = raw.get("window", DEFAULT_WINDOW)
    if not isinstance(window, int) or isinstance(window, bool) or not 1 <= window <= 10_000:
        raise ConfigError(f"{where}: window must be an integer from 1 to 10000")
    log = _table(raw, "log", where)
    _no_unknown(log, _LOG_KEYS, f"{where} [log]")
    level = log.get("level", "info")
    if level not in LOG_LEVELS:
        raise ConfigError(f"{where} [log]: level must be one of {', '.join(LOG_LEVELS)}")
    log_json = log.get("json", False)
    if not isinstance(log_json, bool):
        raise ConfigError(f"{where} [log]: json must be true or false")
    reconnect = _table(raw, "reconnect", where)
    _no_unknown(reconnect, _RECONNECT_KEYS, f"{where} [reconnect]")
    caps = {}
    for key, default in (
        ("max_backoff_s", DEFAULT_MAX_BACKOFF_S),
        ("operator_max_backoff_s", DEFAULT_OPERATOR_MAX_BACKOFF_S),
    ):
        v = reconnect.get(key, default)
        if not isinstance(v, int | float) or isinstance(v, bool) or not 1 <= v <= 3600:
            raise ConfigError(f"{where} [reconnect]: {key} must be a number of seconds, 1 to 3600")
        caps[key] = float(v)
    federation = _table(raw, "federation", where)
    _no_unknown(federation, {"file"}, f"{where} [federation]")
    fed_file = federation.get("file")
    if fed_file is not None and (not isinstance(fed_file, str) or not fed_file):
        raise ConfigError(f"{where} [federation]: file must be the trust file's path")
    return NodeConfig(
        path=path,
        broker=broker,
        identity=base / _str(raw, "identity", where),
        inbox=base / _str(raw, "inbox", where),
        topics=topics,
        window=window,
        hook=_hook(raw, base, where),
        log_json=log_json,
        log_level=level,
        federation_file=base / fed_file if fed_file else None,
        **caps,
    )


def _hook(raw: dict[str, Any], base: Path, where: str) -> HookConfig | None:
    if "hook" not in raw:
        return None
    t = _table(raw, "hook", where)
    _no_unknown(t, _HOOK_KEYS, f"{where} [hook]")
    cmd = t.get("command")
    if isinstance(cmd, str):
        cmd = [cmd]
    if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) and c for c in cmd):
        raise ConfigError(f"{where} [hook]: command must be a program path or a list of arguments")
    # A relative program path is relative to the config file, like the other paths.
    if "/" in cmd[0] and not Path(cmd[0]).is_absolute():
        cmd[0] = str(base / cmd[0])
    timeout = t.get("timeout_s", DEFAULT_HOOK_TIMEOUT_S)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not 0 < timeout <= 600:
        raise ConfigError(f"{where} [hook]: timeout_s must be a number of seconds from 0 to 600")
    content = t.get("content", True)
    if not isinstance(content, bool):
        raise ConfigError(f"{where} [hook]: content must be true or false")
    return HookConfig(tuple(cmd), float(timeout), content)


def _str(raw: dict[str, Any], key: str, where: str) -> str:
    v = raw.get(key)
    if v is None:
        raise ConfigError(f"{where}: missing required key {key!r}")
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}: {key} must be a non-empty string")
    return v


def _table(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    v = raw.get(key, {})
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: [{key}] must be a table")
    return v


def _no_unknown(table: dict[str, Any], known: set[str], where: str) -> None:
    # Unknown keys are almost always typos; ignoring them would hide a wrong setup.
    unknown = sorted(set(table) - known)
    if unknown:
        names = ", ".join(sorted(known))
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {names})")


def load_trust(cfg: NodeConfig) -> TrustFile | None:
    """The federation trust file cfg names, parsed, or None. Raises ConfigError."""
    if cfg.federation_file is None:
        return None
    try:
        return load_trust_file(cfg.federation_file)
    except FederationError as exc:
        raise ConfigError(f"config file {cfg.path} [federation]: {exc}") from None
