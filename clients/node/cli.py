"""`coalition-node`: the partner node daemon and the commands around its inbox."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sqlite3
import sys
from pathlib import Path

from clients.node.config import ConfigError, NodeConfig, load_config, load_trust
from clients.node.content import ContentError, build_summary
from clients.node.inbox import Inbox
from clients.node.views import CommandFailed, inbox_command, show_command, status_command
from coalition.cli_common import (
    EXIT_EPILOG,
    EXIT_ERROR,
    EXIT_USAGE,
    add_version,
    duration_s,
)
from coalition.pki import PartnerCredentials, PkiError, load_partner

PROG = "coalition-node"
EXIT_FAILED = EXIT_ERROR  # nothing matched, or a local file failed

RUN_EPILOG = """examples:
  coalition-node run --config kor.toml
  coalition-node run --config kor.toml --log-json 2>>kor.log

The daemon registers its key bundle (when the broker does not hold it yet), subscribes,
and for each delivery verifies and decrypts it, checks the label the broker routed under
is the signed one, stores it in the inbox and only then acknowledges it. It reconnects
with backoff while the broker is unreachable or busy (up to 30 s), and rarely (up to
5 min) while operators have it suspended or not yet admitted. SIGTERM or SIGINT: finish
the current message, close the stream, exit 0. A refusal retrying cannot fix (a
certificate the broker does not accept, an unknown partner, a refused key bundle):
one line saying why, exit 1.
"""
PUBLISH_EPILOG = """examples:
  echo "Armour moving north of the river" | coalition-node publish --config kor.toml \\
      --topic intel.ground.kor --label "NATO SECRET // REL TO KOR, USA" -
  coalition-node publish --config kor.toml --topic intel.air --precedence FLASH \\
      --label "NATO RESTRICTED // REL TO NATO" --title "Air activity" --area "Sector 4" report.txt
  coalition-node publish --config kor.toml --topic intel.ground \\
      --label "NATO SECRET // REL TO USA" --json summary.json

Input: a JSON object with IntelSummary fields (title, summary, area, window_start_ms,
window_end_ms, reliability "A".."F", credibility 1..6, attachments) or plain UTF-8 text
(the text is the summary, its first line the title). Missing gradings default to F6.
Exit status: 0 published, 2 bad input or config, 3 refused or no eligible recipient,
4 broker unreachable or no answer in time, 1 anything else (the outcome is unknown).
"""
INBOX_EPILOG = """examples:
  coalition-node inbox --config kor.toml
  coalition-node inbox --config kor.toml --topic "intel.ground.>" --since 2025-06-01T08:00
  coalition-node inbox --config kor.toml --since 1717228800000 --json
  coalition-node inbox --config kor.toml --follow      # then new messages as they arrive
"""
SHOW_EPILOG = """examples:
  coalition-node show --config kor.toml 3f9a1c
  coalition-node show --config kor.toml 3f9a1c0e5d7b44a1b2c3d4e5f6a7b8c9 --json
"""
STATUS_EPILOG = """examples:
  coalition-node status --config kor.toml
  coalition-node status --config kor.toml --json
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="The Coalition partner node: receive, verify, decrypt and keep intelligence "
        "summaries; publish your own.",
        epilog="Run '%(prog)s COMMAND --help' for each command's options and examples. "
        "The config file is described in docs/node.md.\n\n" + EXIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(p, PROG)
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name: str, help: str, epilog: str) -> argparse.ArgumentParser:
        s = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=epilog + "\n" + EXIT_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        s.add_argument("--config", type=Path, required=True, help="node TOML config file")
        return s

    r = cmd("run", "run the node daemon until SIGTERM/SIGINT", RUN_EPILOG)
    r.add_argument("--log-json", action="store_true", default=None, help="JSON status lines")
    r.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    pub = cmd("publish", "seal and publish one intelligence summary", PUBLISH_EPILOG)
    pub.add_argument("--topic", required=True, help="topic, e.g. intel.ground.kor")
    pub.add_argument("--label", required=True, help='e.g. "NATO SECRET // REL TO KOR, USA"')
    pub.add_argument(
        "--precedence", default="ROUTINE", help="ROUTINE (default), PRIORITY, IMMEDIATE or FLASH"
    )
    pub.add_argument("--title", help="title (default: from the input)")
    pub.add_argument("--area", help="area of interest name")
    pub.add_argument("--reliability", help="source reliability A..F (default F)")
    pub.add_argument("--credibility", help="information credibility 1..6 (default 6)")
    pub.add_argument(
        "--timeout",
        type=duration_s(),
        default=15.0,
        metavar="DURATION",
        help="how long to wait: 30s, 2m; seconds if no unit (default 15s)",
    )
    pub.add_argument("--json", action="store_true", help="print the result as JSON")
    pub.add_argument("file", help="input file, or - for stdin")

    ib = cmd("inbox", "list messages in the inbox", INBOX_EPILOG)
    ib.add_argument("--topic", help="only topics matching this pattern (* and > wildcards)")
    ib.add_argument(
        "--since",
        help="received at or after: ISO time (UTC if no zone), Unix ms, or an age (15m, 2h, 7d)",
    )
    ib.add_argument("--limit", type=int, help="only the newest N")
    ib.add_argument(
        "--json", action="store_true", help="one JSON array (one object a line with --follow)"
    )
    ib.add_argument(
        "--follow",
        action="store_true",
        help="after the listing, print new messages as they arrive, until Ctrl-C",
    )

    sh = cmd("show", "show one message: metadata and content", SHOW_EPILOG)
    sh.add_argument("id", help="message id, or a unique prefix of at least 6 characters")
    sh.add_argument("--json", action="store_true", help="JSON, attachments base64")

    st = cmd("status", "inbox, quarantine, gaps and connection state", STATUS_EPILOG)
    st.add_argument("--json", action="store_true", help="JSON object")
    return p


def fail(message: str, code: int = EXIT_FAILED) -> int:
    """One line on stderr, and the exit status."""
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    try:
        cfg = load_config(ns.config)
        load_trust(cfg)  # a bad federation trust file is refused before anything runs
    except ConfigError as exc:
        return fail(str(exc), EXIT_USAGE)
    try:
        if ns.command == "run":
            return _run(cfg, ns)
        if ns.command == "publish":
            return _publish(cfg, ns)
        inbox = Inbox(cfg.inbox)
    except PkiError as exc:
        return fail(f"cannot load identity {cfg.identity}: {exc}", EXIT_USAGE)
    except (OSError, sqlite3.Error) as exc:
        return fail(f"inbox {cfg.inbox}: {exc}")
    try:
        if ns.command == "inbox":
            return inbox_command(inbox, ns)
        if ns.command == "show":
            return show_command(inbox, ns)
        return status_command(cfg, inbox, ns)
    except CommandFailed as exc:
        return fail(str(exc), exc.code)
    finally:
        inbox.close()


def _credentials(cfg: NodeConfig) -> PartnerCredentials:
    """The partner's keys, including the TLS pair that load_partner leaves to gRPC."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    creds = load_partner(cfg.identity)
    # gRPC would only say "Invalid private key" at connect time, far from the cause.
    key_path = cfg.identity / "tls.key"
    try:
        key = load_pem_private_key(creds.tls_key_pem, password=None)
    except (ValueError, TypeError):
        raise PkiError(f"{key_path} is not an unencrypted PEM private key") from None
    cert = x509.load_pem_x509_certificate(creds.tls_cert_pem)
    if key.public_key() != cert.public_key():
        raise PkiError(f"{key_path} does not match {cfg.identity / 'tls.crt'}")
    return creds


# -- run ----------------------------------------------------------------------------------


def _run(cfg: NodeConfig, ns: argparse.Namespace) -> int:
    # gRPC Core's own log lines are already silenced for every client command
    # (clients/__init__.py sets GRPC_VERBOSITY before grpc is first imported).
    from clients.node.daemon import NodeDaemon
    from clients.node.logs import setup_logging

    creds = _credentials(cfg)
    setup_logging(
        as_json=cfg.log_json if ns.log_json is None else ns.log_json,
        level=ns.log_level or cfg.log_level,
    )

    async def serve() -> int:
        daemon = NodeDaemon(cfg, creds)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stop.set)
        return await daemon.run()

    return asyncio.run(serve())


# -- publish ------------------------------------------------------------------------------


def _publish(cfg: NodeConfig, ns: argparse.Namespace) -> int:
    from clients.node.publish import PublishError, publish
    from coalition.labels import LabelError, Precedence, parse_label
    from coalition.topics import TopicError, validate_topic

    try:
        label = parse_label(ns.label)
        precedence = Precedence.parse(ns.precedence)
        topic = validate_topic(ns.topic)
        data = sys.stdin.buffer.read() if ns.file == "-" else Path(ns.file).read_bytes()
        summary = build_summary(
            data,
            title=ns.title,
            area=ns.area,
            reliability_code=ns.reliability,
            credibility_code=ns.credibility,
        )
    except (LabelError, TopicError, ContentError) as exc:
        return fail(str(exc), EXIT_USAGE)
    except OSError as exc:
        return fail(f"cannot read {ns.file}: {exc.strerror}", EXIT_USAGE)
    creds = _credentials(cfg)
    try:
        result = asyncio.run(
            publish(
                cfg,
                creds,
                summary,
                topic=topic,
                label=label,
                precedence=precedence,
                timeout=ns.timeout,
            )
        )
    except PublishError as exc:
        if ns.json:
            print(json.dumps({"error": str(exc), **exc.details}))
        return fail(str(exc), exc.code)
    if ns.json:
        print(json.dumps(result))
    else:
        dropped = ", ".join(f"{p} ({why})" for p, why in result["not_sealed_for"].items())
        print(
            f"published {result['message_id']} (offset {result['offset']}, "
            f"envelope {result['envelope']}), sealed for {', '.join(result['recipients'])}"
            + (f"; not for {dropped}" if dropped else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
