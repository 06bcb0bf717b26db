"""Building the coalition PKI in memory: the CA, certificates and key bundles.

Pure: no file system, no clock (time is passed in as ``now_ms``). The CA and TLS keys
are ECDSA P-256 (what grpcio's TLS stack accepts); signing and audit keys are Ed25519
with a CA-issued certificate, and a partner's signing certificate certifies its
ML-DSA-65 key too (the non-critical subjectAltPublicKeyInfo extension). Only
``cryptography``'s x509 builders are used. Errors: ``PkiError`` for a validity under
one day or an invalid broker host name or address.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey, MLDSA65PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coalition.hpke import KEM_NAME, HpkePrivateKey
from coalition.identity import (
    SUBJECT_ALT_PUBLIC_KEY_INFO,
    Identity,
    IdentityKind,
    key_id_for,
    ms_to_datetime,
)
from coalition.v1 import directory_pb2

DAY_MS = 86_400_000
DEFAULT_CA_DAYS = 5 * 365
DEFAULT_CERT_DAYS = 365
DEFAULT_HPKE_DAYS = 365
# Certificates start a little in the past so a peer whose clock lags still accepts them.
BACKDATE_MS = 5 * 60 * 1000


class PkiError(Exception):
    """A PKI directory that is missing, incomplete, inconsistent, or would be overwritten."""


@dataclass(frozen=True)
class CertificateAuthority:
    """The coalition CA: an ECDSA P-256 key and its self-signed certificate."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _validity(now_ms: int, valid_days: int) -> tuple[dt.datetime, dt.datetime]:
    if valid_days < 1:
        raise PkiError("validity must be at least one day")
    start = ms_to_datetime(now_ms - BACKDATE_MS).replace(microsecond=0)
    return start, ms_to_datetime(now_ms + valid_days * DAY_MS).replace(microsecond=0)


def _name(common_name: str, unit: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Coalition")]
    if unit is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def create_ca(
    now_ms: int, *, valid_days: int = DEFAULT_CA_DAYS, common_name: str = "Coalition CA"
) -> CertificateAuthority:
    """A fresh ECDSA P-256 CA that may issue end-entity certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(now_ms, valid_days)
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert=cert, key=key)


def _sign_only_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _end_entity(
    ca: CertificateAuthority,
    identity: Identity,
    public_key: ec.EllipticCurvePublicKey | Ed25519PublicKey,
    now_ms: int,
    valid_days: int,
    common_name: str,
    sans: list[x509.GeneralName],
) -> x509.CertificateBuilder:
    start, end = _validity(now_ms, valid_days)
    end = min(end, ca.cert.not_valid_after_utc)  # never outlive the issuer
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, identity.kind.value))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri), *sans]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .add_extension(_sign_only_usage(), critical=True)
    )


LOOPBACK_HOSTS = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1", "::1")
# RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens.
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def broker_host_names(hosts: Iterable[str] = (), ips: Iterable[str] = ()) -> list[x509.GeneralName]:
    """The broker certificate's names: the loopback ones, then ``hosts`` (DNS names) and
    ``ips`` (IPv4/IPv6 addresses), each once. Raises PkiError for an invalid name."""
    dns: list[str] = list(LOOPBACK_HOSTS)
    for host in hosts:
        name = host.strip().rstrip(".").lower()
        if (
            not name
            or len(name) > 253
            or not all(_LABEL.match(label) for label in name.split("."))
            or _is_ip(name)
        ):
            raise PkiError(
                f"invalid broker host name {host!r}: give a DNS name such as broker.example.org "
                "(letters, digits, hyphens; an IP address goes in --ip)"
            )
        if name not in dns:
            dns.append(name)
    addrs: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
        ipaddress.ip_address(a) for a in LOOPBACK_IPS
    ]
    for ip in ips:
        try:
            addr = ipaddress.ip_address(ip.strip().strip("[]"))
        except ValueError:
            raise PkiError(
                f"invalid broker IP address {ip!r}: give an IPv4 or IPv6 address "
                "such as 10.0.0.5 or fd00::5 (a name goes in --host)"
            ) from None
        if addr not in addrs:
            addrs.append(addr)
    return [*(x509.DNSName(d) for d in dns), *(x509.IPAddress(a) for a in addrs)]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def issue_tls_cert(
    ca: CertificateAuthority,
    identity: Identity,
    public_key: ec.EllipticCurvePublicKey,
    now_ms: int,
    *,
    valid_days: int = DEFAULT_CERT_DAYS,
    broker_names: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    """A TLS certificate: clientAuth for partners and operators, plus serverAuth and
    ``broker_names`` for the broker (default: DNS:localhost, IP:127.0.0.1 and IP:::1)."""
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    sans: list[x509.GeneralName] = []
    if identity.kind is IdentityKind.BROKER:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        sans = broker_names if broker_names is not None else broker_host_names()
    builder = _end_entity(
        ca, identity, public_key, now_ms, valid_days, identity.name, sans
    ).add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def issue_signing_cert(
    ca: CertificateAuthority,
    identity: Identity,
    public_key: Ed25519PublicKey,
    now_ms: int,
    *,
    valid_days: int = DEFAULT_CERT_DAYS,
    ml_dsa_key: MLDSA65PublicKey | None = None,
) -> x509.Certificate:
    """A certificate for an Ed25519 signing (or audit) key: digitalSignature only, no EKU.

    With ``ml_dsa_key``, the same certificate certifies that ML-DSA-65 key as the
    signing key's second half: its DER SubjectPublicKeyInfo is the value of the
    non-critical subjectAltPublicKeyInfo extension (2.5.29.72), which code that
    knows only Ed25519 ignores (``coalition.identity.certified_hybrid_key`` reads it).
    """
    name = f"{identity.name} signing"
    builder = _end_entity(ca, identity, public_key, now_ms, valid_days, name, [])
    if ml_dsa_key is not None:
        spki = ml_dsa_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        builder = builder.add_extension(
            x509.UnrecognizedExtension(SUBJECT_ALT_PUBLIC_KEY_INFO, spki), critical=False
        )
    return builder.sign(ca.key, hashes.SHA256())


def make_key_bundle(
    partner: str, key: HpkePrivateKey, now_ms: int, not_after_ms: int
) -> directory_pb2.KeyBundle:
    """The unsigned bundle announcing ``key``'s public half from now until ``not_after_ms``."""
    public = key.public_key()
    return directory_pb2.KeyBundle(
        partner=partner,
        key_id=key_id_for(public),
        kem=KEM_NAME,
        public_key=public.raw,
        not_before_ms=now_ms,
        not_after_ms=not_after_ms,
    )


def pem_private_key(
    key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey | MLDSA65PrivateKey,
) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM (what the PKI directory holds)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def pem_certificate(cert: x509.Certificate) -> bytes:
    """``cert`` as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)
