"""What ``coalition-keys show`` and ``inspect`` report: public facts about a PKI directory,
its certificates and key bundles, as JSON-ready values. Never private key material:
``inspect_file`` refuses a private key file. Errors: ``CliError`` with one sentence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from google.protobuf.message import DecodeError

from coalition import pki
from coalition.identity import (
    IdentityError,
    certified_hybrid_key,
    datetime_to_ms,
    identity_from_cert,
    ms_to_datetime,
    signing_key_id,
    verify_key_bundle,
)
from coalition.v1 import directory_pb2

PROG = "coalition-keys"


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def iso(ms: int) -> str:
    """Unix milliseconds as ISO 8601 UTC, e.g. ``2026-06-01T10:05:00Z``."""
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
        try:
            hybrid = certified_hybrid_key(cert) is not None
        except IdentityError:
            return "Ed25519 + malformed ML-DSA-65 key"
        return "Ed25519 + ML-DSA-65" if hybrid else "Ed25519"
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
        "not_before": iso(nb),
        "not_after": iso(na),
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
        "not_before": iso(bundle.not_before_ms),
        "not_after": iso(bundle.not_after_ms),
        "status": _status(bundle.not_before_ms, bundle.not_after_ms - 1, now_ms),
        "public_key_sha256": h.finalize().hex(),
        "signature_bytes": len(signed.signature),
        "ml_dsa_65_signature_bytes": len(signed.ml_dsa_65),
        "signing_key_sha256": bundle.signing_key_sha256.hex(),
    }


def read_cert(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise CliError(f"no such file: {path}") from exc
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CliError(f"{path} is not a PEM certificate") from exc


def read_bundle(path: Path) -> directory_pb2.SignedKeyBundle:
    signed = directory_pb2.SignedKeyBundle()
    try:
        signed.ParseFromString(path.read_bytes())
        directory_pb2.KeyBundle.FromString(signed.bundle)
    except DecodeError as exc:
        raise CliError(f"{path} is not a key bundle") from exc
    return signed


def _cert_if(path: Path, now_ms: int) -> dict[str, Any] | None:
    return describe_cert(read_cert(path), now_ms) if path.exists() else None


def collect(root: Path, now_ms: int) -> dict[str, Any]:
    """Everything ``show`` reports: certificates and key ids, never private keys."""
    ca_crt = root / pki.CA_DIR / "ca.crt"
    if not ca_crt.exists():
        raise CliError(f"no PKI in {root} (missing {ca_crt}); run '{PROG} init-ca {root}'")
    out: dict[str, Any] = {"dir": str(root), "ca": describe_cert(read_cert(ca_crt), now_ms)}
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
                "bundle": describe_bundle(read_bundle(bundle_path), now_ms)
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
        signed = read_bundle(path)
        info = {"file": str(path), **describe_bundle(signed, now_ms)}
    except CliError as exc:
        raise CliError(f"{path} is neither a certificate nor a key bundle") from exc
    if not info["partner"] or not signed.signature:
        raise CliError(f"{path} is neither a certificate nor a key bundle")
    # A bundle beside its partner's signing.crt can be checked completely.
    signing_crt = path.parent / "signing.crt"
    if signing_crt.exists():
        sibling = read_cert(signing_crt)
        key = sibling.public_key()
        if isinstance(key, ed25519.Ed25519PublicKey):
            try:
                verify_key_bundle(
                    signed, certified_hybrid_key(sibling) or key, info["partner"], now_ms
                )
                info["verified"] = f"ok against {signing_crt}"
            except IdentityError as exc:
                info["verified"] = f"FAILED: {exc}"
    return info
