"""``coalition-keys``: make and inspect the coalition PKI directory.

The only place in the key tooling that reads the clock; the library takes ``now_ms``.
Never prints private key material.
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
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from google.protobuf.message import DecodeError

from coalition import pki
from coalition.cli_common import EXIT_EPILOG, EXIT_ERROR, EXIT_OK, add_version, duration_days
from coalition.clock import wall_clock_ms
from coalition.identity import (
    IdentityError,
    datetime_to_ms,
    identity_from_cert,
    ms_to_datetime,
    signing_key_id,
    verify_key_bundle,
)
from coalition.v1 import directory_pb2

PROG = "coalition-keys"
DEFAULT_PARTNERS = "KOR,USA,GBR,UKR,NATO"
DEFAULT_OPERATORS = "op1,op2"


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def _now_ms() -> int:
    return wall_clock_ms()


def _iso(ms: int) -> str:
    return ms_to_datetime(ms).isoformat().replace("+00:00", "Z")


def _status(not_before_ms: int, not_after_ms: int, now_ms: int) -> str:
    if now_ms < not_before_ms:
        return "not yet valid"
    if now_ms > not_after_ms:
        return "expired"
    return "valid"


def _key_type(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(key).__name__


def describe_cert(cert: x509.Certificate, now_ms: int) -> dict[str, Any]:
    """Public facts about a certificate, as JSON-ready values."""
    try:
        identity: str | None = identity_from_cert(cert).uri
    except IdentityError:
        identity = None
    nb = datetime_to_ms(cert.not_valid_before_utc)
    na = datetime_to_ms(cert.not_valid_after_utc)
    return {
        "kind": "certificate",
        "subject": cert.subject.rfc4514_string(),
        "identity": identity,
        "issuer": cert.issuer.rfc4514_string(),
        "serial": signing_key_id(cert),
        "not_before": _iso(nb),
        "not_after": _iso(na),
        "status": _status(nb, na, now_ms),
        "key_type": _key_type(cert),
        "sha256_fingerprint": cert.fingerprint(hashes.SHA256()).hex(),
    }


def describe_bundle(signed: directory_pb2.SignedKeyBundle, now_ms: int) -> dict[str, Any]:
    """Public facts about a signed key bundle (signature not checked here)."""
    bundle = directory_pb2.KeyBundle.FromString(signed.bundle)
    h = hashes.Hash(hashes.SHA256())
    h.update(bundle.public_key)
    return {
        "kind": "key bundle",
        "partner": bundle.partner,
        "key_id": bundle.key_id,
        "kem": bundle.kem,
        "not_before": _iso(bundle.not_before_ms),
        "not_after": _iso(bundle.not_after_ms),
        "status": _status(bundle.not_before_ms, bundle.not_after_ms - 1, now_ms),
        "public_key_sha256": h.finalize().hex(),
        "signature_bytes": len(signed.signature),
    }


def _read_cert(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise CliError(f"no such file: {path}") from exc
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CliError(f"{path} is not a PEM certificate") from exc


def _read_bundle(path: Path) -> directory_pb2.SignedKeyBundle:
    signed = directory_pb2.SignedKeyBundle()
    try:
        signed.ParseFromString(path.read_bytes())
        directory_pb2.KeyBundle.FromString(signed.bundle)
    except DecodeError as exc:
        raise CliError(f"{path} is not a key bundle") from exc
    return signed


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
    )
    creds = pki.load_partner(d)
    print(
        f"issued partner {creds.code} in {d} "
        f"(signing key id {creds.signing_key_id}, HPKE key id {creds.current_key_id})"
    )


def _cmd_issue_operator(args: argparse.Namespace) -> None:
    d = pki.issue_operator(
        args.dir, args.name, _now_ms(), valid_days=args.valid_days, force=args.force
    )
    print(f"issued operator {args.name} in {d}")


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
    cert = _read_cert(d / "tls.crt")
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
    )
    print(
        f"development PKI in {args.dir}: CA, broker "
        f"({_broker_names(Path(args.dir) / pki.BROKER_DIR)}), "
        f"partners {', '.join(partners) or '-'}, operators {', '.join(operators) or '-'}"
    )


def _cert_if(path: Path, now_ms: int) -> dict[str, Any] | None:
    return describe_cert(_read_cert(path), now_ms) if path.exists() else None


def collect(root: Path, now_ms: int) -> dict[str, Any]:
    """Everything ``show`` reports: certificates and key ids, never private keys."""
    ca_crt = root / pki.CA_DIR / "ca.crt"
    if not ca_crt.exists():
        raise CliError(f"no PKI in {root} (missing {ca_crt}); run '{PROG} init-ca {root}'")
    out: dict[str, Any] = {"dir": str(root), "ca": describe_cert(_read_cert(ca_crt), now_ms)}
    b = root / pki.BROKER_DIR
    out["broker"] = (
        {"tls": _cert_if(b / "tls.crt", now_ms), "audit": _cert_if(b / "audit.crt", now_ms)}
        if b.is_dir()
        else None
    )
    partners = []
    pdir = root / pki.PARTNERS_DIR
    for d in sorted(pdir.iterdir()) if pdir.is_dir() else []:
        if not d.is_dir():
            continue
        bundle_path = d / pki.BUNDLE_FILE
        partners.append(
            {
                "code": d.name,
                "tls": _cert_if(d / "tls.crt", now_ms),
                "signing": _cert_if(d / "signing.crt", now_ms),
                "bundle": describe_bundle(_read_bundle(bundle_path), now_ms)
                if bundle_path.exists()
                else None,
                "hpke_key_ids": sorted(
                    p.name[len(pki.HPKE_PREFIX) : -len(pki.HPKE_SUFFIX)]
                    for p in d.glob(f"{pki.HPKE_PREFIX}*{pki.HPKE_SUFFIX}")
                ),
            }
        )
    out["partners"] = partners
    operators = []
    odir = root / pki.OPERATORS_DIR
    for d in sorted(odir.iterdir()) if odir.is_dir() else []:
        if d.is_dir():
            operators.append({"name": d.name, "tls": _cert_if(d / "tls.crt", now_ms)})
    out["operators"] = operators
    return out


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


def inspect_file(path: Path, now_ms: int) -> dict[str, Any]:
    """Describe a certificate (PEM or DER) or a bundle.bin. Refuses private keys."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise CliError(f"no such file: {path}") from exc
    except IsADirectoryError as exc:
        raise CliError(f"{path} is a directory; use '{PROG} show' for a PKI directory") from exc
    if b"PRIVATE KEY" in data or (
        path.name.startswith(pki.HPKE_PREFIX) and path.name.endswith(pki.HPKE_SUFFIX)
    ):
        raise CliError(f"{path} is a private key; inspect shows certificates and bundles only")
    cert: x509.Certificate | None = None
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
    except ValueError:
        cert = None
    if cert is not None:
        return {"file": str(path), **describe_cert(cert, now_ms)}
    try:
        signed = _read_bundle(path)
        info = {"file": str(path), **describe_bundle(signed, now_ms)}
    except CliError as exc:
        raise CliError(f"{path} is neither a certificate nor a key bundle") from exc
    if not info["partner"] or not signed.signature:
        raise CliError(f"{path} is neither a certificate nor a key bundle")
    # A bundle beside its partner's signing.crt can be checked completely.
    signing_crt = path.parent / "signing.crt"
    if signing_crt.exists():
        key = _read_cert(signing_crt).public_key()
        if isinstance(key, ed25519.Ed25519PublicKey):
            try:
                verify_key_bundle(signed, key, info["partner"], now_ms)
                info["verified"] = f"ok against {signing_crt}"
            except IdentityError as exc:
                info["verified"] = f"FAILED: {exc}"
    return info


def _cmd_inspect(args: argparse.Namespace) -> None:
    info = inspect_file(Path(args.file), _now_ms())
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for k, v in info.items():
        print(f"{k + ':':<20} {v}")


def _cmd_rotate_hpke(args: argparse.Namespace) -> None:
    bundle = pki.rotate_hpke(args.dir, args.code, _now_ms(), valid_days=args.valid_days)
    print(
        f"rotated {args.code}: new HPKE key id {bundle.key_id}, valid until "
        f"{_iso(bundle.not_after_ms)}; older keys kept so earlier messages still open"
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Create and inspect the Coalition PKI: CA, TLS certificates, "
        "Ed25519 signing keys and signed HPKE key bundles.",
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
        "issue a partner's TLS cert, Ed25519 signing key + cert, HPKE key and signed bundle",
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
    _force(p)
    p.set_defaults(func=_cmd_issue_partner)

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
