"""`coalition-broker`: run the broker."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from broker.audit import AuditError
from broker.config import BrokerConfig, ConfigError, load_config
from broker.listen import parse_listen
from broker.logs import setup_logging
from broker.store import StoreError
from coalition.cli_common import EXIT_EPILOG, EXIT_ERROR, EXIT_USAGE, add_version, duration_ms
from coalition.pki import BROKER_DIR, PkiError

if TYPE_CHECKING:
    from broker.server import Broker

EPILOG = (
    """examples:
  coalition-broker serve --config broker.toml
  coalition-broker serve --pki pki --data data/broker --listen 127.0.0.1:7443 --operators op1,op2

Send SIGTERM or SIGINT to stop: in-flight publishes are answered, streams are
closed, the stores are flushed, and the process exits 0.

Send SIGHUP to re-read revoked_serials from the --config file: calls made with a newly
revoked certificate, streams included, end at once (UNAUTHENTICATED, cert_revoked).

"""
    + EXIT_EPILOG
    + "\n"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coalition-broker",
        description="The Coalition broker: routes signed, encrypted intelligence between partners "
        "over mutual TLS, enforcing each partner's policy.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(p, "coalition-broker")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "serve",
        help="serve until SIGTERM/SIGINT",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--config", type=Path, help="TOML config file (see docs/broker.md)")
    s.add_argument("--listen", help="address to listen on (default 127.0.0.1:7443)")
    s.add_argument("--pki", type=Path, help="PKI directory made by coalition-keys")
    s.add_argument("--data", type=Path, help="data directory for the SQLite stores")
    s.add_argument("--operators", help="comma-separated operator names allowed to administer")
    s.add_argument("--max-envelope-bytes", type=int)
    s.add_argument("--max-store-bytes", type=int)
    s.add_argument("--min-free-bytes", type=int, help="free disk kept in reserve (default 64 MiB)")
    s.add_argument(
        "--clock-skew-ms",
        type=duration_ms(),
        metavar="DURATION",
        help="clock skew tolerated in envelope times (ms if no unit, e.g. 500 or 2s)",
    )
    s.add_argument("--audit-checkpoint-every", type=int, help="sign a checkpoint every N entries")
    s.add_argument(
        "--refusal-audit-threshold",
        type=int,
        help="refusals audited one by one per partner and interval (default 100; 0 = all)",
    )
    s.add_argument(
        "--refusal-audit-interval-ms",
        type=duration_ms(),
        metavar="DURATION",
        help="refusal summary interval (ms if no unit; default 60000, i.e. 1m)",
    )
    s.add_argument("--log-json", action="store_true", default=None, help="JSON log lines")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    s.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics over plain HTTP here (default: off; docs/metrics.md)",
    )
    s.add_argument(
        "--allow-data-loss",
        action="store_true",
        default=None,
        help="start on a JetStream cluster whose durability is weaker than fsync-before-ack "
        "on 3 replicas (acknowledged messages may be lost; logged and audited)",
    )
    s.add_argument(
        "--event-loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="event loop implementation (default uvloop; asyncio is the standard library's)",
    )
    return p


def _config(ns: argparse.Namespace) -> BrokerConfig:
    cfg = load_config(ns.config)
    return cfg.with_overrides(
        listen=ns.listen,
        pki_dir=ns.pki,
        data_dir=ns.data,
        operators=tuple(o for o in ns.operators.split(",") if o) if ns.operators else None,
        max_envelope_bytes=ns.max_envelope_bytes,
        max_store_bytes=ns.max_store_bytes,
        min_free_bytes=ns.min_free_bytes,
        clock_skew_ms=ns.clock_skew_ms,
        audit_checkpoint_every=ns.audit_checkpoint_every,
        refusal_audit_threshold=ns.refusal_audit_threshold,
        refusal_audit_interval_ms=ns.refusal_audit_interval_ms,
        log_json=ns.log_json,
        log_level=ns.log_level,
        metrics_listen=ns.metrics_listen,
        allow_data_loss=ns.allow_data_loss,
    )


async def _reload(broker: Broker, ns: argparse.Namespace) -> None:
    """SIGHUP: re-read the config file and apply what may change while serving."""
    log = logging.getLogger("coalition.broker")
    if ns.config is None:
        log.warning("SIGHUP ignored: no --config file to re-read")
        return
    try:
        await broker.reload(_config(ns))
    except (ConfigError, ValueError) as exc:
        # The revocations in force stay as they were; the operator must fix the file.
        log.error("reload failed, nothing changed: %s", exc)
    except Exception:
        log.exception("reload failed")


def _missing_pki(cfg: BrokerConfig) -> str | None:
    """The one sentence for a PKI directory that is not there, or None."""
    pki = Path(cfg.pki_dir)
    if pki.exists():
        return None
    if pki.name == BROKER_DIR and pki.parent.is_dir():
        return None  # DIR/broker given: load_broker says what is missing in it
    return (
        f"no PKI directory {pki}: make one with 'coalition-keys dev-pki {pki}' "
        "(or 'make pki' in a checkout), or give --pki DIR"
    )


async def _serve(cfg: BrokerConfig, ns: argparse.Namespace) -> int:
    from broker.server import start_broker

    broker = await start_broker(cfg)
    # Everything loaded so far (modules, keys, caches) lives as long as the process:
    # keep it out of the cyclic collector's full passes, which otherwise walk it all.
    gc.freeze()
    port_file: Path | None = ns.port_file
    if port_file is not None:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(broker.port))
        tmp.replace(port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = loop.create_task(_reload(broker, ns))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await stop.wait()
    await broker.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    try:
        cfg = _config(ns)
    except ConfigError as exc:
        print(f"coalition-broker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:  # what needs nothing started: one line, before any log line
        parse_listen(cfg.listen)
        missing = _missing_pki(cfg)
        if cfg.metrics_listen:
            try:
                parse_listen(cfg.metrics_listen)
            except ValueError as exc:
                missing = f"metrics: {exc}"
    except ValueError as exc:
        missing = str(exc)
    if missing is not None:
        print(f"coalition-broker: cannot start: {missing}", file=sys.stderr)
        return EXIT_ERROR
    setup_logging(as_json=cfg.log_json, level=cfg.log_level)
    if not cfg.operators:
        logging.getLogger("coalition.broker").warning(
            "no operators configured; the Admin service will refuse everyone"
        )
    try:
        if ns.event_loop == "uvloop":
            import uvloop  # libuv event loop: about a third less CPU per message here

            return uvloop.run(_serve(cfg, ns))
        return asyncio.run(_serve(cfg, ns))
    except (OSError, ValueError, sqlite3.Error, AuditError, StoreError, PkiError) as exc:
        # One line, no traceback: what failed is in the message (a full disk says so).
        print(f"coalition-broker: cannot start: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
