"""The coalition CA, certificate issuing, and the PKI directory ``coalition-keys`` writes.

Layout (private keys 0600, directories 0700)::

    DIR/ca/ca.crt ca.key
    DIR/broker/tls.crt tls.key audit.crt audit.key
    DIR/partners/<CODE>/tls.crt tls.key signing.crt signing.key hpke-<keyid>.key bundle.bin
    DIR/operators/<name>/tls.crt tls.key

The CA and TLS keys are ECDSA P-256 (what grpcio's TLS stack accepts); signing
and audit keys are Ed25519 with a CA-issued certificate. Only ``cryptography``'s
x509 builders are used. Time is passed in as ``now_ms``; nothing here reads a clock.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf.message import DecodeError

from coalition import ed25519
from coalition.hpke import KEM_NAME, HpkeKeyError, HpkePrivateKey
from coalition.identity import (
    Identity,
    IdentityError,
    IdentityKind,
    datetime_to_ms,
    identity_from_cert,
    key_id_for,
    ms_to_datetime,
    sign_key_bundle,
    signing_key_id,
)
from coalition.pae import KEY_BUNDLE_TYPE, pae
from coalition.v1 import directory_pb2

DAY_MS = 86_400_000
DEFAULT_CA_DAYS = 5 * 365
DEFAULT_CERT_DAYS = 365
DEFAULT_HPKE_DAYS = 365
# Certificates start a little in the past so a peer whose clock lags still accepts them.
BACKDATE_MS = 5 * 60 * 1000

CA_DIR = "ca"
BROKER_DIR = "broker"
PARTNERS_DIR = "partners"
OPERATORS_DIR = "operators"
BUNDLE_FILE = "bundle.bin"
HPKE_PREFIX = "hpke-"
HPKE_SUFFIX = ".key"


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


@dataclass
class PartnerCredentials:
    """Everything a partner node needs; load with ``load_partner(dir)``."""

    code: str
    ca_pem: bytes = field(repr=False)
    tls_cert_pem: bytes = field(repr=False)
    tls_key_pem: bytes = field(repr=False)
    signing_key: Ed25519PrivateKey = field(repr=False)
    signing_cert: x509.Certificate
    signing_key_id: str
    hpke_keys: dict[str, HpkePrivateKey] = field(repr=False)
    bundle: directory_pb2.SignedKeyBundle = field(repr=False)

    @property
    def signing_cert_der(self) -> bytes:
        return self.signing_cert.public_bytes(serialization.Encoding.DER)

    @property
    def current_key_id(self) -> str:
        """Key id of the HPKE key in the current ``bundle``."""
        return directory_pb2.KeyBundle.FromString(self.bundle.bundle).key_id


@dataclass
class OperatorCredentials:
    name: str
    ca_pem: bytes = field(repr=False)
    tls_cert_pem: bytes = field(repr=False)
    tls_key_pem: bytes = field(repr=False)


@dataclass
class BrokerCredentials:
    ca_pem: bytes = field(repr=False)
    ca_cert: x509.Certificate
    tls_cert_pem: bytes = field(repr=False)
    tls_key_pem: bytes = field(repr=False)
    audit_key: Ed25519PrivateKey = field(repr=False)
    # Additions to the contract: the broker's identity name and its audit key's certificate.
    name: str = "broker"
    audit_cert: x509.Certificate | None = None


# --- certificates (pure) -------------------------------------------------------------


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
) -> x509.Certificate:
    """A certificate for an Ed25519 signing (or audit) key: digitalSignature only, no EKU."""
    name = f"{identity.name} signing"
    builder = _end_entity(ca, identity, public_key, now_ms, valid_days, name, [])
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


# --- files ---------------------------------------------------------------------------


def _mkdir(path: Path) -> None:
    """Create ``path`` and missing parents as 0700; existing directories are left alone."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        os.mkdir(d, 0o700)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically: a new file created with ``mode`` (never chmod-ed later), then rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_private(path: Path, data: bytes) -> None:
    _write(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write(path, data, 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _refuse_overwrite(paths: Iterable[Path], force: bool) -> None:
    if force:
        return
    for p in paths:
        if p.exists():
            raise PkiError(f"{p} already exists; use --force to replace it")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise PkiError(f"missing {what}: {path}") from exc
    except OSError as exc:
        raise PkiError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _load_cert(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path, what))
    except ValueError as exc:
        raise PkiError(f"{path} is not a PEM certificate") from exc


def _load_ed25519(path: Path, what: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path, what), password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise PkiError(f"{path} is not an Ed25519 private key")
    return key


def partner_dir(root: str | os.PathLike[str], code: str) -> Path:
    """``DIR/partners/<CODE>``; raises IdentityError for an invalid code."""
    return Path(root) / PARTNERS_DIR / Identity.partner(code).name


def operator_dir(root: str | os.PathLike[str], name: str) -> Path:
    return Path(root) / OPERATORS_DIR / Identity.operator(name).name


def init_ca(
    root: str | os.PathLike[str],
    now_ms: int,
    *,
    valid_days: int = DEFAULT_CA_DAYS,
    force: bool = False,
) -> CertificateAuthority:
    """Create ``DIR/ca/ca.crt`` and ``ca.key``. Raises PkiError if a CA exists and not force."""
    d = Path(root) / CA_DIR
    _refuse_overwrite([d / "ca.key", d / "ca.crt"], force)
    ca = create_ca(now_ms, valid_days=valid_days)
    _mkdir(d)
    _write_private(d / "ca.key", _pem_key(ca.key))
    _write_public(d / "ca.crt", ca.cert_pem)
    return ca


def load_ca(root: str | os.PathLike[str]) -> CertificateAuthority:
    """The CA (certificate and private key) of a PKI directory. Raises PkiError."""
    d = Path(root) / CA_DIR
    if not (d / "ca.key").exists():
        raise PkiError(f"no CA in {root} (missing {d / 'ca.key'}); run 'coalition-keys init-ca'")
    cert = _load_cert(d / "ca.crt", "CA certificate")
    try:
        key = serialization.load_pem_private_key(_read(d / "ca.key", "CA key"), password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{d / 'ca.key'} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{d / 'ca.key'} is not an ECDSA key")
    if key.public_key() != cert.public_key():
        raise PkiError(f"{d / 'ca.key'} does not match {d / 'ca.crt'}")
    return CertificateAuthority(cert=cert, key=key)


def _issue_tls(
    ca: CertificateAuthority,
    d: Path,
    identity: Identity,
    now_ms: int,
    valid_days: int,
    broker_names: list[x509.GeneralName] | None = None,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_tls_cert(
        ca, identity, key.public_key(), now_ms, valid_days=valid_days, broker_names=broker_names
    )
    _write_private(d / "tls.key", _pem_key(key))
    _write_public(d / "tls.crt", _pem_cert(cert))


def issue_partner(
    root: str | os.PathLike[str],
    code: str,
    now_ms: int,
    *,
    valid_days: int = DEFAULT_CERT_DAYS,
    hpke_valid_days: int = DEFAULT_HPKE_DAYS,
    force: bool = False,
) -> Path:
    """Issue a partner's TLS cert, signing key + cert, first HPKE key and bundle.

    Returns the partner directory. Raises PkiError (no CA, keys exist) or IdentityError.
    """
    identity = Identity.partner(code)
    d = partner_dir(root, code)
    _refuse_overwrite([d / "tls.key", d / "signing.key", d / BUNDLE_FILE], force)
    ca = load_ca(root)
    _mkdir(d)
    _issue_tls(ca, d, identity, now_ms, valid_days)
    signing = Ed25519PrivateKey.generate()
    signing_cert = issue_signing_cert(
        ca, identity, signing.public_key(), now_ms, valid_days=valid_days
    )
    _write_private(d / "signing.key", _pem_key(signing))
    _write_public(d / "signing.crt", _pem_cert(signing_cert))
    _new_hpke_key(d, code, signing, signing_cert, now_ms, hpke_valid_days)
    return d


def _new_hpke_key(
    d: Path,
    code: str,
    signing: Ed25519PrivateKey,
    signing_cert: x509.Certificate,
    now_ms: int,
    valid_days: int,
) -> directory_pb2.KeyBundle:
    if valid_days < 1:
        raise PkiError("validity must be at least one day")
    key = HpkePrivateKey.generate()
    # A bundle never outlives the certificate of the key that vouches for it.
    cert_end_ms = datetime_to_ms(signing_cert.not_valid_after_utc)
    if cert_end_ms <= now_ms:
        raise PkiError(f"{d / 'signing.crt'} has expired; re-issue the partner with --force")
    bundle = make_key_bundle(code, key, now_ms, min(now_ms + valid_days * DAY_MS, cert_end_ms))
    _write_private(d / f"{HPKE_PREFIX}{bundle.key_id}{HPKE_SUFFIX}", key.private_bytes())
    _write_public(d / BUNDLE_FILE, sign_key_bundle(bundle, signing).SerializeToString())
    return bundle


def rotate_hpke(
    root: str | os.PathLike[str],
    code: str,
    now_ms: int,
    *,
    valid_days: int = DEFAULT_HPKE_DAYS,
) -> directory_pb2.KeyBundle:
    """A new HPKE key and signed ``bundle.bin``; old ``hpke-*.key`` files stay so
    messages sealed to them still open. Returns the new bundle. Raises PkiError."""
    d = partner_dir(root, code)
    if not d.is_dir():
        raise PkiError(f"unknown partner {code}: no directory {d}")
    signing = _load_ed25519(d / "signing.key", "signing key")
    signing_cert = _load_cert(d / "signing.crt", "signing certificate")
    return _new_hpke_key(d, code, signing, signing_cert, now_ms, valid_days)


def issue_operator(
    root: str | os.PathLike[str],
    name: str,
    now_ms: int,
    *,
    valid_days: int = DEFAULT_CERT_DAYS,
    force: bool = False,
) -> Path:
    """Issue an operator's TLS cert. Returns its directory. Raises PkiError or IdentityError."""
    identity = Identity.operator(name)
    d = operator_dir(root, name)
    _refuse_overwrite([d / "tls.key"], force)
    ca = load_ca(root)
    _mkdir(d)
    _issue_tls(ca, d, identity, now_ms, valid_days)
    return d


def issue_broker(
    root: str | os.PathLike[str],
    now_ms: int,
    *,
    name: str = "broker",
    valid_days: int = DEFAULT_CERT_DAYS,
    force: bool = False,
    hosts: Iterable[str] = (),
    ips: Iterable[str] = (),
) -> Path:
    """Issue the broker's TLS cert (server+client) and Ed25519 audit key + cert.

    The TLS certificate names localhost, 127.0.0.1 and ::1, plus ``hosts`` (DNS names)
    and ``ips``: every name clients use to reach the broker must be among them.
    """
    identity = Identity.broker(name)
    names = broker_host_names(hosts, ips)  # validated before anything is written
    d = Path(root) / BROKER_DIR
    _refuse_overwrite([d / "tls.key", d / "audit.key"], force)
    ca = load_ca(root)
    _mkdir(d)
    _issue_tls(ca, d, identity, now_ms, valid_days, names)
    audit = Ed25519PrivateKey.generate()
    audit_cert = issue_signing_cert(ca, identity, audit.public_key(), now_ms, valid_days=valid_days)
    _write_private(d / "audit.key", _pem_key(audit))
    _write_public(d / "audit.crt", _pem_cert(audit_cert))
    return d


def make_dev_pki(
    dir: str | os.PathLike[str],
    partners: Iterable[str],
    operators: Iterable[str],
    now_ms: int,
    *,
    force: bool = False,
    broker_hosts: Iterable[str] = (),
    broker_ips: Iterable[str] = (),
) -> None:
    """A whole development PKI: CA, broker, each partner and operator. Raises PkiError.

    ``broker_hosts`` and ``broker_ips`` are added to the broker certificate's names."""
    partners, operators = list(partners), list(operators)
    broker_hosts, broker_ips = list(broker_hosts), list(broker_ips)
    broker_host_names(broker_hosts, broker_ips)  # validate before writing anything
    for code in partners:
        Identity.partner(code)  # validate every name before writing anything
    for name in operators:
        Identity.operator(name)
    if not force and (Path(dir) / CA_DIR / "ca.key").exists():
        raise PkiError(f"{dir} already holds a PKI; use --force to replace it")
    init_ca(dir, now_ms, force=force)
    issue_broker(dir, now_ms, force=force, hosts=broker_hosts, ips=broker_ips)
    for code in partners:
        issue_partner(dir, code, now_ms, force=force)
    for name in operators:
        issue_operator(dir, name, now_ms, force=force)


# --- loading -------------------------------------------------------------------------


def _ca_pem_for(d: Path, levels_up: int) -> bytes:
    """A copy of ca.crt beside the credentials wins (deployments), else the PKI root's."""
    local = d / "ca.crt"
    if local.exists():
        return _read(local, "CA certificate")
    root = d
    for _ in range(levels_up):
        root = root.parent
    return _read(root / CA_DIR / "ca.crt", "CA certificate")


def _tls_identity(d: Path, kind: IdentityKind) -> tuple[bytes, bytes, Identity]:
    cert_pem = _read(d / "tls.crt", "TLS certificate")
    key_pem = _read(d / "tls.key", "TLS key")
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
    signing_key = _load_ed25519(d / "signing.key", "signing key")
    signing_cert = _load_cert(d / "signing.crt", "signing certificate")
    if signing_cert.public_key() != signing_key.public_key():
        raise PkiError(f"{d / 'signing.key'} does not match {d / 'signing.crt'}")
    try:
        if identity_from_cert(signing_cert) != identity:
            raise PkiError(f"{d / 'signing.crt'} is not for {identity.uri}")
    except IdentityError as exc:
        raise PkiError(f"{d / 'signing.crt'}: {exc}") from exc
    hpke_keys: dict[str, HpkePrivateKey] = {}
    for path in sorted(d.glob(f"{HPKE_PREFIX}*{HPKE_SUFFIX}")):
        try:
            key = HpkePrivateKey(_read(path, "HPKE key"))
        except HpkeKeyError as exc:
            raise PkiError(f"{path}: {exc}") from exc
        kid = key_id_for(key.public_key())
        if path.name != f"{HPKE_PREFIX}{kid}{HPKE_SUFFIX}":
            raise PkiError(f"{path} holds key {kid}; its name does not match")
        hpke_keys[kid] = key
    signed = directory_pb2.SignedKeyBundle()
    try:
        signed.ParseFromString(_read(d / BUNDLE_FILE, "key bundle"))
        bundle = directory_pb2.KeyBundle.FromString(signed.bundle)
        # Signature only: whether the bundle is still current is the caller's now_ms question.
        ed25519.verify(
            signing_key.public_key(), signed.signature, pae(KEY_BUNDLE_TYPE, signed.bundle)
        )
    except (DecodeError, InvalidSignature) as exc:
        raise PkiError(f"{d / BUNDLE_FILE} is not a key bundle signed by this partner") from exc
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
    )


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
    audit_key = _load_ed25519(d / "audit.key", "audit key")
    audit_cert = _load_cert(d / "audit.crt", "audit certificate")
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
