"""``coalition-keys``: make and inspect the coalition PKI directory.

The only place in the key tooling that reads the clock; ``coalition.pki`` takes ``now_ms``.
Never prints private key material. Errors: one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509

from clients.keys.describe import PROG, CliError, collect, inspect_file, iso, read_cert
from coalition import pki
from coalition.cli_common import EXIT_EPILOG, EXIT_ERROR, EXIT_OK, add_version, duration_days
from coalition.clock import wall_clock_ms
from coalition.identity import IdentityError, signing_key_id

DEFAULT_PARTNERS = "KOR,USA,GBR,UKR,NATO"
DEFAULT_OPERATORS = "op1,op2"


def _now_ms() -> int:
    return wall_clock_ms()


# --- commands ------------------------------------------------------------------------


def _cmd_init_ca(args: argparse.Namespace) -> None:
    ca = pki.init_ca(args.dir, _now_ms(), valid_days=args.valid_days, force=args.force)
    print(f"created CA in {Path(args.dir) / pki.CA_DIR} (serial {signing_key_id(ca.cert)})")


def _cmd_issue_partner(args: argparse.Namespace) -> None:
    d = pki.issue_partner(
        args.dir,
        args.code,
        _now_ms(),
        valid_days=args.valid_days,
        hpke_valid_days=args.hpke_valid_days,
        force=args.force,
        ml_dsa=not args.no_ml_dsa,
    )
    creds = pki.load_partner(d)
    kind = "Ed25519 only" if creds.hybrid_signing_key is None else "Ed25519 + ML-DSA-65"
    print(
        f"issued partner {creds.code} in {d} (signing key id {creds.signing_key_id}, "
        f"{kind}; HPKE key id {creds.current_key_id})"
    )


def _cmd_reissue_signing(args: argparse.Namespace) -> None:
    d = pki.reissue_signing(
        args.dir,
        args.code,
        _now_ms(),
        valid_days=args.valid_days,
        hpke_valid_days=args.hpke_valid_days,
        ml_dsa=not args.no_ml_dsa,
    )
    creds = pki.load_partner(d)
    kind = "Ed25519 only" if creds.hybrid_signing_key is None else "Ed25519 + ML-DSA-65"
    print(
        f"new signing key for partner {creds.code} in {d} (signing key id "
        f"{creds.signing_key_id}, {kind}; HPKE key id {creds.current_key_id}); operators "
        f"propose {d / 'signing.crt'} with: coalition-admin partners rekey {creds.code} "
        "--signing-cert FILE"
    )


def _cmd_issue_operator(args: argparse.Namespace) -> None:
    d = pki.issue_operator(
        args.dir, args.name, _now_ms(), valid_days=args.valid_days, force=args.force
    )
    print(f"issued operator {args.name} in {d}")


def _cmd_issue_gateway(args: argparse.Namespace) -> None:
    d = pki.issue_gateway(
        args.dir, args.nation, _now_ms(), valid_days=args.valid_days, force=args.force
    )
    print(
        f"issued gateway {args.nation} in {d}; peer nations trust it through this PKI's "
        "ca/ca.crt in their federation trust file"
    )


def _cmd_issue_broker(args: argparse.Namespace) -> None:
    d = pki.issue_broker(
        args.dir,
        _now_ms(),
        name=args.name,
        valid_days=args.valid_days,
        force=args.force,
        hosts=args.host,
        ips=args.ip,
    )
    print(f"issued broker {args.name} in {d} for {_broker_names(d)}")


def _broker_names(d: Path) -> str:
    """The DNS names and addresses the broker's TLS certificate was issued for."""
    cert = read_cert(d / "tls.crt")
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = [*sans.get_values_for_type(x509.DNSName)]
    names += [str(a) for a in sans.get_values_for_type(x509.IPAddress)]
    return ", ".join(names)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _cmd_dev_pki(args: argparse.Namespace) -> None:
    partners, operators = _split(args.partners), _split(args.operators)
    pki.make_dev_pki(
        args.dir,
        partners,
        operators,
        _now_ms(),
        force=args.force,
        broker_hosts=args.broker_host,
        broker_ips=args.broker_ip,
        ml_dsa=not args.no_ml_dsa,
    )
    print(
        f"development PKI in {args.dir}: CA, broker "
        f"({_broker_names(Path(args.dir) / pki.BROKER_DIR)}), "
        f"partners {', '.join(partners) or '-'}, operators {', '.join(operators) or '-'}"
    )


def _cert_line(label: str, c: dict[str, Any] | None) -> str:
    if c is None:
        return f"  {label:<8} (missing)"
    return (
        f"  {label:<8} serial {c['serial']}  {c['not_before']} .. {c['not_after']}"
        f"  {c['key_type']}  [{c['status']}]"
    )


def _cmd_show(args: argparse.Namespace) -> None:
    info = collect(Path(args.dir), _now_ms())
    if args.json:
        print(json.dumps(info, indent=2))
        return
    ca = info["ca"]
    print(f"PKI {info['dir']}")
    print(f"CA {ca['subject']}")
    print(_cert_line("ca", ca))
    if info["broker"] is not None:
        tls = info["broker"]["tls"]
        print(f"broker {tls['identity'] if tls else '?'}")
        print(_cert_line("tls", tls))
        print(_cert_line("audit", info["broker"]["audit"]))
    for p in info["partners"]:
        print(f"partner {p['code']}")
        print(_cert_line("tls", p["tls"]))
        print(_cert_line("signing", p["signing"]))
        bundle = p["bundle"]
        if bundle is not None:
            print(
                f"  {'bundle':<8} key id {bundle['key_id']}  {bundle['not_before']} .. "
                f"{bundle['not_after']}  {bundle['kem']}  [{bundle['status']}]"
            )
        print(f"  {'hpke':<8} key ids {', '.join(p['hpke_key_ids']) or '-'}")
    for o in info["operators"]:
        print(f"operator {o['name']}")
        print(_cert_line("tls", o["tls"]))


def _cmd_inspect(args: argparse.Namespace) -> None:
    info = inspect_file(Path(args.file), _now_ms())
    if args.json:
        print(json.dumps(info, indent=2))
        return
    width = max(20, *(len(k) + 1 for k in info))
    for k, v in info.items():
        print(f"{k + ':':<{width}} {v}")


def _cmd_rotate_hpke(args: argparse.Namespace) -> None:
    bundle = pki.rotate_hpke(args.dir, args.code, _now_ms(), valid_days=args.valid_days)
    print(
        f"rotated {args.code}: new HPKE key id {bundle.key_id}, valid until "
        f"{iso(bundle.not_after_ms)}; older keys kept so earlier messages still open"
    )


# --- parser --------------------------------------------------------------------------

_MAIN_EPILOG = f"""\
examples:
  {PROG} dev-pki pki/                       # a whole development PKI in one step
  {PROG} show pki/
  {PROG} inspect pki/partners/KOR/bundle.bin
  {PROG} rotate-hpke pki/ KOR

See keys/README.md for the trust model and the directory layout.
"""


def _sub(
    subs: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help: str,
    epilog: str,
) -> argparse.ArgumentParser:
    return subs.add_parser(
        name,
        help=help,
        description=help,
        epilog="examples:\n" + epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _validity(p: argparse.ArgumentParser, default: int, what: str) -> None:
    p.add_argument(
        "--valid-days",
        type=duration_days,
        default=default,
        metavar="DAYS",
        help=f"{what} validity: days, or 90d, 48h (default {default})",
    )


def _broker_name_options(p: argparse.ArgumentParser, host: str, ip: str) -> None:
    p.add_argument(
        host,
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name clients reach the broker by, added to localhost (repeatable)",
    )
    p.add_argument(
        ip,
        action="append",
        default=[],
        metavar="ADDR",
        help="an IP address clients reach the broker by, added to 127.0.0.1 and ::1 (repeatable)",
    )


def _force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace existing keys")


def _no_ml_dsa(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-ml-dsa",
        action="store_true",
        help="Ed25519-only signing keys (v1 envelopes only; for testing the upgrade path)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Create and inspect the Coalition PKI: CA, TLS certificates, "
        "Ed25519 + ML-DSA-65 signing keys and signed HPKE key bundles.",
        epilog=_MAIN_EPILOG + "\n" + EXIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(parser, PROG)
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _sub(subs, "init-ca", "create the coalition CA (ECDSA P-256)", f"  {PROG} init-ca pki/\n")
    p.add_argument("dir", metavar="DIR", help="PKI directory (created if missing)")
    _validity(p, pki.DEFAULT_CA_DAYS, "CA certificate")
    _force(p)
    p.set_defaults(func=_cmd_init_ca)

    p = _sub(
        subs,
        "issue-partner",
        "issue a partner's TLS cert, Ed25519 + ML-DSA-65 signing key + cert, HPKE key and "
        "signed bundle",
        f"  {PROG} issue-partner pki/ KOR\n  {PROG} issue-partner pki/ USA --valid-days 90\n",
    )
    p.add_argument("dir", metavar="DIR", help="PKI directory holding ca/")
    p.add_argument("code", metavar="CODE", help="partner code, e.g. KOR")
    _validity(p, pki.DEFAULT_CERT_DAYS, "certificate")
    p.add_argument(
        "--hpke-valid-days",
        type=duration_days,
        default=pki.DEFAULT_HPKE_DAYS,
        metavar="DAYS",
        help=f"HPKE key bundle validity: days, or 30d (default {pki.DEFAULT_HPKE_DAYS})",
    )
    _no_ml_dsa(p)
    _force(p)
    p.set_defaults(func=_cmd_issue_partner)

    p = _sub(
        subs,
        "reissue-signing",
        "replace an existing partner's signing key and certificate (Ed25519 + ML-DSA-65) "
        "and sign a new HPKE bundle under it; the TLS key and old HPKE keys stay",
        f"  {PROG} reissue-signing pki/ KOR\n"
        "\nThen operators replace the certificate the broker holds (two operators):\n"
        "  coalition-admin partners rekey KOR --signing-cert pki/partners/KOR/signing.crt\n",
    )
    p.add_argument("dir", metavar="DIR", help="PKI directory holding ca/")
    p.add_argument("code", metavar="CODE", help="partner code, e.g. KOR")
    _validity(p, pki.DEFAULT_CERT_DAYS, "certificate")
    p.add_argument(
        "--hpke-valid-days",
        type=duration_days,
        default=pki.DEFAULT_HPKE_DAYS,
        metavar="DAYS",
        help=f"HPKE key bundle validity: days, or 30d (default {pki.DEFAULT_HPKE_DAYS})",
    )
    _no_ml_dsa(p)
    p.set_defaults(func=_cmd_reissue_signing)

    p = _sub(
        subs,
        "issue-operator",
        "issue an operator's TLS client certificate",
        f"  {PROG} issue-operator pki/ op1\n",
    )
    p.add_argument("dir", metavar="DIR", help="PKI directory holding ca/")
    p.add_argument("name", metavar="NAME", help="operator name, e.g. op1")
    _validity(p, pki.DEFAULT_CERT_DAYS, "certificate")
    _force(p)
    p.set_defaults(func=_cmd_issue_operator)

    p = _sub(
        subs,
        "issue-gateway",
        "issue this nation's gateway TLS client certificate (federation between brokers)",
        f"  {PROG} issue-gateway pki/ KOR\n",
    )
    p.add_argument("dir", metavar="DIR", help="PKI directory holding ca/ (this nation's)")
    p.add_argument("nation", metavar="NATION", help="this nation's code, e.g. KOR")
    _validity(p, pki.DEFAULT_CERT_DAYS, "certificate")
    _force(p)
    p.set_defaults(func=_cmd_issue_gateway)

    p = _sub(
        subs,
        "issue-broker",
        "issue the broker's TLS server/client certificate and Ed25519 audit key",
        f"  {PROG} issue-broker pki/\n  {PROG} issue-broker pki/ --name broker-eu\n"
        f"  {PROG} issue-broker pki/ --force --host broker.kor.example --ip 10.0.0.5\n"
        "\nThe certificate always names localhost, 127.0.0.1 and ::1; --host and --ip add\n"
        "the names clients use to reach the broker from other hosts (they verify it).\n",
    )
    p.add_argument("dir", metavar="DIR", help="PKI directory holding ca/")
    p.add_argument("--name", default="broker", help="broker identity name (default broker)")
    _broker_name_options(p, "--host", "--ip")
    _validity(p, pki.DEFAULT_CERT_DAYS, "certificate")
    _force(p)
    p.set_defaults(func=_cmd_issue_broker)

    p = _sub(
        subs,
        "dev-pki",
        "make a whole development PKI: CA, broker, partners and operators",
        f"  {PROG} dev-pki pki/\n  {PROG} dev-pki pki/ --partners KOR,USA --operators op1\n",
    )
    p.add_argument("dir", metavar="DIR", help="PKI directory (created if missing)")
    p.add_argument(
        "--partners",
        default=DEFAULT_PARTNERS,
        help=f"comma-separated partner codes (default {DEFAULT_PARTNERS})",
    )
    p.add_argument(
        "--operators",
        default=DEFAULT_OPERATORS,
        help=f"comma-separated operator names (default {DEFAULT_OPERATORS})",
    )
    _broker_name_options(p, "--broker-host", "--broker-ip")
    _no_ml_dsa(p)
    _force(p)
    p.set_defaults(func=_cmd_dev_pki)

    p = _sub(
        subs,
        "show",
        "list every identity with certificate serials, validity and key ids",
        f"  {PROG} show pki/\n  {PROG} show pki/ --json | jq '.partners[].bundle.key_id'\n",
    )
    p.add_argument("dir", metavar="DIR", help="PKI directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_show)

    p = _sub(
        subs,
        "inspect",
        "describe a certificate (PEM or DER) or a bundle.bin; never a private key",
        f"  {PROG} inspect pki/partners/KOR/signing.crt\n"
        f"  {PROG} inspect pki/partners/KOR/bundle.bin --json\n",
    )
    p.add_argument("file", metavar="FILE", help="certificate or bundle.bin")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_inspect)

    p = _sub(
        subs,
        "rotate-hpke",
        "make a new HPKE key and signed bundle; the old key file is kept",
        f"  {PROG} rotate-hpke pki/ KOR\n  {PROG} rotate-hpke pki/ KOR --valid-days 30\n",
    )
    p.add_argument("dir", metavar="DIR", help="PKI directory")
    p.add_argument("code", metavar="CODE", help="partner code, e.g. KOR")
    _validity(p, pki.DEFAULT_HPKE_DAYS, "key bundle")
    p.set_defaults(func=_cmd_rotate_hpke)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``coalition-keys``; returns the exit status (errors: one line on stderr, 1)."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BrokenPipeError:  # e.g. piped into head: not an error worth a message
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except (CliError, pki.PkiError, IdentityError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"{PROG}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
