"""``coalition-admin``: the operators' command line over the broker's Admin service.

Exit status: the table in coalition/cli_common.py (0 done, 2 usage or local input,
3 the broker refused, 4 unreachable or no answer in time, 5 ``audit verify`` found the
chain broken). Never prints private keys.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from clients.admin import audit, context, federation
from clients.admin import commands as cmd
from clients.admin.policy_flags import add_policy_flags
from clients.admin.rekey_args import add_rekey
from clients.sdk import BrokerTlsError, ClientError, OperatorClient
from coalition.cli_common import (
    EXIT_AUDIT_BROKEN,
    EXIT_EPILOG,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    add_version,
    duration_s,
)
from coalition.pki import PkiError, load_operator

PROG = "coalition-admin"
DEFAULT_BROKER = "127.0.0.1:7443"
DEFAULT_TIMEOUT = 10.0
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# The broker failed rather than refused: the call may be retried once it is fixed.
BROKER_FAILED = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS)

EPILOG = (
    """examples:
  export COALITION_BROKER=127.0.0.1:7443 COALITION_OPERATOR=pki/operators/op1
  coalition-admin partners list
  coalition-admin partners admit KOR --signing-cert pki/partners/KOR/signing.crt \\
      --clearance NATO=SECRET --ceiling NATO=SECRET --group NATO \\
      --publish 'intel.>' --subscribe 'intel.>' --reason "MoU 2025-14"
  coalition-admin --identity pki/operators/op2 policy approve <PROPOSAL_ID>
  coalition-admin policy set UKR --clearance NATO=RESTRICTED --reason "downgrade per J2"
  coalition-admin who-receives --label "NATO SECRET // REL TO KOR" --topic intel.ground
  coalition-admin audit verify

See docs/admin.md.
"""
    + EXIT_EPILOG
    + "\n"
)

_RAW = argparse.RawDescriptionHelpFormatter


def _common(*, suppress: bool) -> argparse.ArgumentParser:
    """Global options, accepted before and after the command."""
    p = argparse.ArgumentParser(add_help=False)
    d = argparse.SUPPRESS if suppress else None
    g = p.add_argument_group("connection and output")
    g.add_argument(
        "--broker",
        metavar="HOST:PORT",
        default=d,
        help=f"broker address (env COALITION_BROKER, default {DEFAULT_BROKER})",
    )
    g.add_argument(
        "--identity",
        metavar="DIR",
        type=Path,
        default=d,
        help="operator credential directory, e.g. pki/operators/op1 (env COALITION_OPERATOR)",
    )
    g.add_argument(
        "--timeout",
        metavar="DURATION",
        type=duration_s(),
        default=d,
        help=f"give up on a broker call after this long: 30s, 500ms; seconds if no unit "
        f"(default {DEFAULT_TIMEOUT:g})",
    )
    g.add_argument(
        "--json",
        action="store_true",
        default=d if suppress else False,
        help="machine-readable JSON instead of tables",
    )
    return p


def _leaf(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    func: context.Command,
    help: str,
    examples: str,
    aliases: Sequence[str] = (),
) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        aliases=list(aliases),
        help=help,
        description=help,
        epilog=f"examples:\n{examples}",
        formatter_class=_RAW,
        parents=[_common(suppress=True)],
    )
    p.set_defaults(func=func)
    return p


def _group(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    p = sub.add_parser(name, help=help, description=help, epilog=EPILOG, formatter_class=_RAW)
    return p.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


def _partners(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = _group(sub, "partners", "list, show, admit and rekey partners")
    _leaf(
        g,
        "list",
        cmd.partners_list,
        "list registered partners",
        "  coalition-admin partners list --json",
    )
    p = _leaf(
        g,
        "show",
        cmd.partners_show,
        "show one partner: policy, keys, certificate",
        "  coalition-admin partners show KOR",
    )
    p.add_argument("partner", metavar="CODE", help="partner code, e.g. KOR")
    p = _leaf(
        g,
        "admit",
        cmd.partners_admit,
        "register a partner and propose its policy; a second operator must approve",
        "  coalition-admin partners admit KOR --signing-cert pki/partners/KOR/signing.crt \\\n"
        "      --clearance NATO=SECRET --ceiling NATO=SECRET --group NATO \\\n"
        "      --publish 'intel.>' --subscribe 'intel.>' --reason 'MoU 2025-14'\n"
        "  # then, as another operator:\n"
        "  coalition-admin --identity pki/operators/op2 policy approve <PROPOSAL_ID>",
    )
    p.add_argument("partner", metavar="CODE", help="partner code, e.g. KOR")
    p.add_argument(
        "--signing-cert",
        type=Path,
        required=True,
        metavar="FILE",
        help="the partner's signing certificate (PEM or DER), issued by the CA",
    )
    p.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
    add_policy_flags(p)
    add_rekey(g, _leaf)


def _policy(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = _group(sub, "policy", "show, change, approve and review partner policy")
    p = _leaf(
        g,
        "show",
        cmd.policy_show,
        "show the current policy of a partner",
        "  coalition-admin policy show KOR --json",
    )
    p.add_argument("partner", metavar="CODE", help="partner code, e.g. KOR")
    set_examples = (
        "  coalition-admin policy set UKR --clearance NATO=RESTRICTED --reason 'downgrade'\n"
        "  coalition-admin policy set KOR --category OPS=ALPHA --subscribe 'intel.sea.>' "
        "--reason 'op ALPHA'\n"
        "  coalition-admin policy set KOR --remove-group NATO --expected-version 3 --reason x"
    )
    for name, text in (
        ("set", "change a policy: lowering applies at once, raising becomes a proposal"),
        ("propose", "same as set; a privilege-raising change needs a second operator's approval"),
    ):
        p = _leaf(g, name, cmd.policy_set, text, set_examples.replace(" set ", f" {name} "))
        p.add_argument("partner", metavar="CODE", help="partner code, e.g. KOR")
        p.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
        p.add_argument(
            "--expected-version",
            type=int,
            metavar="N",
            help="refuse if the policy is no longer at version N "
            "(default: the version this change started from)",
        )
        add_policy_flags(p)
    p = _leaf(
        g,
        "approve",
        cmd.policy_approve,
        "approve a proposal made by a different operator; it applies at once",
        "  coalition-admin --identity pki/operators/op2 policy approve 3f2a... --reason ok",
    )
    p.add_argument("proposal_id", metavar="PROPOSAL_ID")
    p.add_argument("--reason", help="why (recorded in the audit trail)")
    p = _leaf(
        g,
        "reject",
        cmd.policy_reject,
        "reject a pending proposal",
        "  coalition-admin policy reject 3f2a... --reason 'not agreed'",
    )
    p.add_argument("proposal_id", metavar="PROPOSAL_ID")
    p.add_argument("--reason", help="why (recorded in the audit trail)")
    p = _leaf(
        g,
        "proposals",
        cmd.policy_proposals,
        "list pending proposals",
        "  coalition-admin policy proposals\n  coalition-admin policy proposals --all --json",
    )
    p.add_argument("--all", action="store_true", help="include approved and rejected ones")
    p = _leaf(
        g,
        "impact",
        cmd.policy_impact,
        "which labels and topics a pending proposal grants or withdraws",
        "  coalition-admin policy impact 3f2a...\n  coalition-admin policy impact 3f2a... --json",
    )
    p.add_argument("proposal_id", metavar="PROPOSAL_ID")
    p = _leaf(
        g,
        "history",
        cmd.policy_history,
        "every policy version of a partner",
        "  coalition-admin policy history KOR",
    )
    p.add_argument("partner", metavar="CODE", help="partner code, e.g. KOR")


def _status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _leaf(
        sub,
        "suspend",
        cmd.suspend,
        "suspend a partner at once; its streams close",
        "  coalition-admin suspend UKR --reason 'suspected compromise'",
    )
    p.add_argument("partner", metavar="CODE", help="partner code, e.g. KOR")
    p.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
    p = _leaf(
        sub,
        "reinstate",
        cmd.reinstate,
        "propose reinstating a suspended partner (a second operator approves)",
        "  coalition-admin reinstate UKR --reason 'keys rotated'",
    )
    p.add_argument("partner", metavar="CODE", help="partner code, e.g. KOR")
    p.add_argument("--reason", required=True, help="why (recorded in the audit trail)")


def _audit(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = _group(sub, "audit", "read, verify and export the hash-chained audit log")
    p = _leaf(
        g,
        "tail",
        audit.audit_tail,
        "the newest audit entries",
        "  coalition-admin audit tail -n 50\n  coalition-admin audit tail --follow",
    )
    p.add_argument("-n", type=int, default=20, metavar="N", help="how many (default 20)")
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing new entries until interrupted (JSON lines with --json)",
    )
    p.add_argument(
        "--interval",
        type=duration_s(),
        default=1.0,
        metavar="DURATION",
        help="how often --follow polls: 500ms, 5s; seconds if no unit (default 1s)",
    )
    p = _leaf(
        g,
        "query",
        audit.audit_query,
        "entries matching filters, oldest first",
        "  coalition-admin audit query --partner KOR --kind policy --since 2h\n"
        "  coalition-admin audit query --since 2025-05-01T00:00:00Z --until 2025-05-02 "
        "--limit 100 --json",
    )
    p.add_argument("--partner", metavar="CODE")
    p.add_argument("--kind", help="prefix of the entry kind, e.g. policy, publish.refused")
    p.add_argument(
        "--since",
        metavar="TIME",
        help="ISO-8601 (UTC unless a zone is given), Unix ms, or an age (30s, 15m, 2h, 7d)",
    )
    p.add_argument("--until", metavar="TIME", help="as --since; exclusive")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="at most N (default all)")
    p = _leaf(
        g,
        "verify",
        audit.audit_verify,
        "recompute the hash chain and check the signed checkpoints (exit 5 if broken)",
        "  coalition-admin audit verify\n"
        "  coalition-admin audit verify --file audit.jsonl --ca pki/ca/ca.crt   # offline",
    )
    p.add_argument(
        "--file",
        type=Path,
        metavar="EXPORT",
        help="verify this export (from `audit export`) offline, without a broker",
    )
    p.add_argument(
        "--ca", type=Path, metavar="CA_CERT", help="with --file: the coalition CA certificate"
    )
    p.add_argument(
        "--audit-cert",
        type=Path,
        metavar="CERT",
        help="with --file: the broker's audit.crt, for exports that do not carry it",
    )
    p = _leaf(
        g,
        "export",
        audit.audit_export,
        "every entry and checkpoint as JSON lines (hashes in hex)",
        "  coalition-admin audit export --out audit.jsonl",
    )
    p.add_argument("--out", type=Path, metavar="FILE", help="write here instead of stdout")


def parser() -> argparse.ArgumentParser:
    """The full command line."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Operate a Coalition broker: partners, policy (two-person rule), audit.",
        epilog=EPILOG,
        formatter_class=_RAW,
        parents=[_common(suppress=False)],
    )
    add_version(p, PROG)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _partners(sub)
    _policy(sub)
    _status(sub)
    _audit(sub)
    federation.add_federation(sub, _leaf, _group)
    _leaf(
        sub,
        "stats",
        cmd.stats,
        "broker totals and per-partner counters",
        "  coalition-admin stats --json",
    )
    p2 = _leaf(
        sub,
        "who-receives",
        cmd.who_receives,
        "which partners would receive a label on a topic, and why not",
        '  coalition-admin who-receives --label "NATO SECRET // REL TO KOR" --topic intel.x',
    )
    p2.add_argument("--label", required=True, help='human form, e.g. "NATO SECRET // REL TO KOR"')
    p2.add_argument("--topic", required=True, help="e.g. intel.ground.kor")
    return p


def _target(ns: argparse.Namespace) -> str:
    target: str = ns.broker or os.environ.get("COALITION_BROKER") or DEFAULT_BROKER
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise context.UsageError(f"--broker {target!r}: expected HOST:PORT")
    return target


def _identity(ns: argparse.Namespace) -> Path:
    if ns.identity is not None:
        return Path(ns.identity)
    env = os.environ.get("COALITION_OPERATOR")
    if not env:
        raise context.UsageError(
            "no operator identity: pass --identity DIR or set COALITION_OPERATOR"
        )
    return Path(env)


async def _run(ns: argparse.Namespace) -> None:
    if getattr(ns, "file", None) is not None:  # audit verify --file: offline, no broker
        audit.audit_verify_file(ns, bool(ns.json))
        return
    target = _target(ns)
    timeout = DEFAULT_TIMEOUT if ns.timeout is None else ns.timeout
    if timeout <= 0:
        raise context.UsageError("--timeout must be positive")
    path = _identity(ns)
    try:
        creds = load_operator(path)
    except PkiError as exc:
        raise context.UsageError(f"cannot use operator identity {path}: {exc}") from None
    async with OperatorClient(creds, target) as client:
        await ns.func(context.Ctx(client, ns, timeout, bool(ns.json)))


def _fail(message: str) -> None:
    print(f"{PROG}: {' '.join(message.split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    ns = parser().parse_args(argv)
    try:
        asyncio.run(_run(ns))
    except context.UsageError as exc:
        _fail(str(exc))
        return EXIT_USAGE
    except context.Unreachable as exc:
        _fail(f"broker unreachable: {exc}")
        return EXIT_UNREACHABLE
    except context.AuditBroken:
        return EXIT_AUDIT_BROKEN
    except BrokerTlsError as exc:  # one sentence: retrying will not help
        _fail(
            f"broker at {ns.broker or os.environ.get('COALITION_BROKER') or DEFAULT_BROKER}: {exc}"
        )
        return EXIT_UNREACHABLE
    except ClientError as exc:
        if exc.status in UNREACHABLE:
            target = ns.broker or os.environ.get("COALITION_BROKER") or DEFAULT_BROKER
            _fail(f"broker at {target} unreachable: {exc}")
            return EXIT_UNREACHABLE
        _fail(str(exc))
        return EXIT_ERROR if exc.status in BROKER_FAILED else EXIT_REFUSED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); keep Python from complaining at exit.
        sys.stdout = open(os.devnull, "w")
        return EXIT_OK
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
