"""``coalition-console``: serve one operator's web console on loopback.

It talks to the broker only through the Admin gRPC API with the operator's own mTLS
identity; it holds no authority of its own. It prints an access link once it listens:
only a browser that opened that link may use the console.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import socket
import sys
from collections.abc import Sequence

from coalition.cli_common import EXIT_OK, EXIT_USAGE, add_version
from coalition.pki import PkiError, load_operator

PROG = "coalition-console"
DEFAULT_BROKER = "127.0.0.1:7443"
DEFAULT_LISTEN = "127.0.0.1:8470"

EPILOG = """examples:
  coalition-console --identity pki/operators/op1 --broker 127.0.0.1:7443
  coalition-console --identity pki/operators/op2 --listen 127.0.0.1:8471 --json

It prints the access link to open (http://127.0.0.1:8470/enter?token=...). See
docs/console.md.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Serve an operator's web console over the broker's Admin service.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--identity",
        help="operator credential directory, e.g. pki/operators/op1 (env COALITION_OPERATOR)",
    )
    p.add_argument(
        "--broker",
        help=f"broker address HOST:PORT (env COALITION_BROKER, default {DEFAULT_BROKER})",
    )
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help=f"address to serve the console on (default {DEFAULT_LISTEN}; port 0 picks one). "
        "Anything but loopback exposes the operator's authority to that network.",
    )
    p.add_argument(
        "--json", action="store_true", help="print the listening address and link as JSON"
    )
    add_version(p, PROG)
    return p


def _split(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen {listen!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    try:
        import uvicorn

        from clients.console.app import Console, build_app
        from clients.sdk import OperatorClient
    except ImportError as exc:  # installed without the console's extra
        print(
            f"{PROG}: the console needs its dependencies ({exc.name}): "
            "pip install 'coalition[console]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    identity = ns.identity or os.environ.get("COALITION_OPERATOR")
    if not identity:
        print(f"{PROG}: --identity (or COALITION_OPERATOR) is required", file=sys.stderr)
        return EXIT_USAGE
    target: str = ns.broker or os.environ.get("COALITION_BROKER") or DEFAULT_BROKER
    try:
        creds = load_operator(identity)
        host, port = _split(ns.listen)
    except (PkiError, ValueError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not _loopback(host):
        print(
            f"{PROG}: warning: serving on {host}, not loopback: anyone who reaches it with "
            "the access link acts as operator " + creds.name,
            file=sys.stderr,
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        print(f"{PROG}: cannot listen on {ns.listen}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    sock.listen(64)
    bound = sock.getsockname()[1]
    console = Console(creds.name, target, lambda: OperatorClient(creds, target))
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    hosts = sorted({"127.0.0.1", "localhost", "[::1]", "::1", host, shown})
    app = build_app(console, allowed_hosts=hosts)
    url = f"http://{shown}:{bound}/"
    link = f"{url}enter?token={console.access_token}"
    if ns.json:
        print(json.dumps({"operator": creds.name, "broker": target, "url": url, "link": link}))
    else:
        print(f"console for operator {creds.name} (broker {target}) at {url}")
        print(f"open: {link}")
    sys.stdout.flush()
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    except KeyboardInterrupt:
        pass
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
