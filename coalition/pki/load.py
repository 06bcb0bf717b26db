"""Loading credentials from a PKI directory, checked for consistency.

Each loader checks what it reads belongs together (key and certificate match, the
identity in the certificate is of the right kind, both halves of a hybrid signing key
match what the certificate certifies, the key bundle is signed by the partner's
signing key (both halves when hybrid) and names a key the directory holds) and raises ``PkiError``
naming the file otherwise. Whether a certificate or bundle is valid *now* is the
caller's question (it has the clock).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import DecodeError

from coalition.hpke import HpkeKeyError, HpkePrivateKey
from coalition.hybrid import HybridSigningKey
from coalition.identity import (
    Identity,
    IdentityError,
    IdentityKind,
    certified_hybrid_key,
    identity_from_cert,
    key_id_for,
    signing_key_id,
    verify_key_bundle,
)
from coalition.pki.build import CertificateAuthority, PkiError
from coalition.pki.credentials import (
    BrokerCredentials,
    GatewayCredentials,
    OperatorCredentials,
    PartnerCredentials,
)
from coalition.pki.layout import (
    BROKER_DIR,
    BUNDLE_FILE,
    CA_DIR,
    HPKE_PREFIX,
    HPKE_SUFFIX,
    ML_DSA_KEY_FILE,
    read_cert,
    read_ed25519_key,
    read_file,
    read_ml_dsa_key,
)
from coalition.v1 import directory_pb2


def load_ca(root: str | os.PathLike[str]) -> CertificateAuthority:
    """The CA (certificate and private key) of a PKI directory. Raises PkiError."""
    d = Path(root) / CA_DIR
    if not (d / "ca.key").exists():
        raise PkiError(f"no CA in {root} (missing {d / 'ca.key'}); run 'coalition-keys init-ca'")
    cert = read_cert(d / "ca.crt", "CA certificate")
    try:
        key = serialization.load_pem_private_key(read_file(d / "ca.key", "CA key"), password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{d / 'ca.key'} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{d / 'ca.key'} is not an ECDSA key")
    if key.public_key() != cert.public_key():
        raise PkiError(f"{d / 'ca.key'} does not match {d / 'ca.crt'}")
    return CertificateAuthority(cert=cert, key=key)


def _ca_pem_for(d: Path, levels_up: int) -> bytes:
    """A copy of ca.crt beside the credentials wins (deployments), else the PKI root's."""
    local = d / "ca.crt"
    if local.exists():
        return read_file(local, "CA certificate")
    root = d
    for _ in range(levels_up):
        root = root.parent
    return read_file(root / CA_DIR / "ca.crt", "CA certificate")


def _tls_identity(d: Path, kind: IdentityKind) -> tuple[bytes, bytes, Identity]:
    cert_pem = read_file(d / "tls.crt", "TLS certificate")
    key_pem = read_file(d / "tls.key", "TLS key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        identity = identity_from_cert(cert)
    except (ValueError, IdentityError) as exc:
        raise PkiError(f"{d / 'tls.crt'}: {exc}") from exc
    if identity.kind is not kind:
        article = "an" if kind.value[0] in "aeiou" else "a"
        raise PkiError(f"{d / 'tls.crt'} is for {identity.uri}, not {article} {kind.value}")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{d / 'tls.key'} is not a readable private key") from exc
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise PkiError(f"{d / 'tls.key'} does not match {d / 'tls.crt'}")
    return cert_pem, key_pem, identity


def load_partner(dir: str | os.PathLike[str]) -> PartnerCredentials:
    """Load ``DIR/partners/<CODE>`` and check it is self-consistent. Raises PkiError."""
    d = Path(dir)
    if not d.is_dir():
        raise PkiError(f"no partner directory {d}")
    ca_pem = _ca_pem_for(d, 2)
    tls_cert_pem, tls_key_pem, identity = _tls_identity(d, IdentityKind.PARTNER)
    code = identity.name
    signing_key, signing_cert, hybrid = load_signing_key(d)
    try:
        if identity_from_cert(signing_cert) != identity:
            raise PkiError(f"{d / 'signing.crt'} is not for {identity.uri}")
    except IdentityError as exc:
        raise PkiError(f"{d / 'signing.crt'}: {exc}") from exc
    hpke_keys: dict[str, HpkePrivateKey] = {}
    for path in sorted(d.glob(f"{HPKE_PREFIX}*{HPKE_SUFFIX}")):
        try:
            key = HpkePrivateKey(read_file(path, "HPKE key"))
        except HpkeKeyError as exc:
            raise PkiError(f"{path}: {exc}") from exc
        kid = key_id_for(key.public_key())
        if path.name != f"{HPKE_PREFIX}{kid}{HPKE_SUFFIX}":
            raise PkiError(f"{path} holds key {kid}; its name does not match")
        hpke_keys[kid] = key
    signed = directory_pb2.SignedKeyBundle()
    try:
        signed.ParseFromString(read_file(d / BUNDLE_FILE, "key bundle"))
        bundle = directory_pb2.KeyBundle.FromString(signed.bundle)
        # Signatures only: whether the bundle is still current is the caller's now_ms
        # question, so it is checked at the bundle's own start time.
        verify_key_bundle(
            signed,
            hybrid.public_key() if hybrid is not None else signing_key.public_key(),
            code,
            bundle.not_before_ms,
        )
    except DecodeError as exc:
        raise PkiError(f"{d / BUNDLE_FILE} is not a key bundle signed by this partner") from exc
    except IdentityError as exc:
        raise PkiError(
            f"{d / BUNDLE_FILE} is not a key bundle signed by this partner ({exc})"
        ) from exc
    if bundle.partner != code or bundle.key_id not in hpke_keys:
        raise PkiError(f"{d / BUNDLE_FILE} names a key this directory does not hold")
    return PartnerCredentials(
        code=code,
        ca_pem=ca_pem,
        tls_cert_pem=tls_cert_pem,
        tls_key_pem=tls_key_pem,
        signing_key=signing_key,
        signing_cert=signing_cert,
        signing_key_id=signing_key_id(signing_cert),
        hpke_keys=hpke_keys,
        bundle=signed,
        hybrid_signing_key=hybrid,
    )


def load_signing_key(
    d: Path,
) -> tuple[Ed25519PrivateKey, x509.Certificate, HybridSigningKey | None]:
    """A partner directory's signing key, its certificate, and the hybrid key they make
    with ``signing-ml-dsa.key`` (None for an Ed25519-only directory). Raises PkiError."""
    signing_key = read_ed25519_key(d / "signing.key", "signing key")
    signing_cert = read_cert(d / "signing.crt", "signing certificate")
    if signing_cert.public_key() != signing_key.public_key():
        raise PkiError(f"{d / 'signing.key'} does not match {d / 'signing.crt'}")
    return signing_key, signing_cert, _hybrid_signing_key(d, signing_key, signing_cert)


def _hybrid_signing_key(
    d: Path, signing_key: Ed25519PrivateKey, signing_cert: x509.Certificate
) -> HybridSigningKey | None:
    """signing.key with signing-ml-dsa.key, checked against what signing.crt certifies.

    None when the certificate certifies no ML-DSA-65 key and there is no such file (an
    Ed25519-only directory). A certificate that certifies one needs the file, a file
    needs a certificate that certifies it, and the two must match. Raises PkiError.
    """
    path = d / ML_DSA_KEY_FILE
    try:
        certified = certified_hybrid_key(signing_cert)
    except IdentityError as exc:
        raise PkiError(f"{d / 'signing.crt'}: {exc}") from exc
    if certified is None:
        if path.exists():
            raise PkiError(
                f"{path} holds an ML-DSA-65 key but {d / 'signing.crt'} certifies none; "
                "re-issue the partner (issue-partner --force) or remove the stray key"
            )
        return None
    if not path.exists():
        raise PkiError(
            f"missing ML-DSA-65 signing key: {path} ({d / 'signing.crt'} certifies one, "
            "so the partner cannot sign without it)"
        )
    hybrid = HybridSigningKey(signing_key, read_ml_dsa_key(path, "ML-DSA-65 signing key"))
    if hybrid.public_key() != certified:
        raise PkiError(f"{path} does not match the ML-DSA-65 key {d / 'signing.crt'} certifies")
    return hybrid


def load_operator(dir: str | os.PathLike[str]) -> OperatorCredentials:
    """Load ``DIR/operators/<name>``. Raises PkiError."""
    d = Path(dir)
    if not d.is_dir():
        raise PkiError(f"no operator directory {d}")
    ca_pem = _ca_pem_for(d, 2)
    cert_pem, key_pem, identity = _tls_identity(d, IdentityKind.OPERATOR)
    return OperatorCredentials(
        name=identity.name, ca_pem=ca_pem, tls_cert_pem=cert_pem, tls_key_pem=key_pem
    )


def load_gateway(dir: str | os.PathLike[str]) -> GatewayCredentials:
    """Load ``DIR/gateways/<NATION>``. Raises PkiError."""
    d = Path(dir)
    if not d.is_dir():
        raise PkiError(f"no gateway directory {d}")
    ca_pem = _ca_pem_for(d, 2)
    cert_pem, key_pem, identity = _tls_identity(d, IdentityKind.GATEWAY)
    return GatewayCredentials(
        nation=identity.name, ca_pem=ca_pem, tls_cert_pem=cert_pem, tls_key_pem=key_pem
    )


def load_broker(dir: str | os.PathLike[str]) -> BrokerCredentials:
    """Load ``DIR/broker`` (the PKI root ``DIR`` is accepted too). Raises PkiError."""
    d = Path(dir)
    if (d / BROKER_DIR / "tls.crt").exists():
        d = d / BROKER_DIR
    if not d.is_dir():
        raise PkiError(f"no broker directory {d}")
    ca_pem = _ca_pem_for(d, 1)
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        raise PkiError("the CA certificate is not PEM") from exc
    cert_pem, key_pem, identity = _tls_identity(d, IdentityKind.BROKER)
    audit_key = read_ed25519_key(d / "audit.key", "audit key")
    audit_cert = read_cert(d / "audit.crt", "audit certificate")
    if audit_cert.public_key() != audit_key.public_key():
        raise PkiError(f"{d / 'audit.key'} does not match {d / 'audit.crt'}")
    return BrokerCredentials(
        ca_pem=ca_pem,
        ca_cert=ca_cert,
        tls_cert_pem=cert_pem,
        tls_key_pem=key_pem,
        audit_key=audit_key,
        name=identity.name,
        audit_cert=audit_cert,
    )
