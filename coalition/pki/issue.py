"""Issuing identities into a PKI directory: the CA, the broker, partners and operators.

Each function builds with ``coalition.pki.build`` and writes with ``coalition.pki.layout``;
it refuses to replace existing keys unless ``force`` (``PkiError``) and validates every
name before writing anything (``IdentityError``, ``PkiError``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey

from coalition.hpke import HpkePrivateKey
from coalition.hybrid import HybridSigningKey
from coalition.identity import Identity, datetime_to_ms, sign_key_bundle
from coalition.pki.build import (
    DAY_MS,
    DEFAULT_CA_DAYS,
    DEFAULT_CERT_DAYS,
    DEFAULT_HPKE_DAYS,
    CertificateAuthority,
    PkiError,
    broker_host_names,
    create_ca,
    issue_signing_cert,
    issue_tls_cert,
    make_key_bundle,
    pem_certificate,
    pem_private_key,
)
from coalition.pki.layout import (
    BROKER_DIR,
    BUNDLE_FILE,
    CA_DIR,
    HPKE_PREFIX,
    HPKE_SUFFIX,
    ML_DSA_KEY_FILE,
    gateway_dir,
    make_private_dir,
    operator_dir,
    partner_dir,
    refuse_overwrite,
    write_private,
    write_public,
)
from coalition.pki.load import load_ca, load_signing_key
from coalition.v1 import directory_pb2


def init_ca(
    root: str | os.PathLike[str],
    now_ms: int,
    *,
    valid_days: int = DEFAULT_CA_DAYS,
    force: bool = False,
) -> CertificateAuthority:
    """Create ``DIR/ca/ca.crt`` and ``ca.key``. Raises PkiError if a CA exists and not force."""
    d = Path(root) / CA_DIR
    refuse_overwrite([d / "ca.key", d / "ca.crt"], force)
    ca = create_ca(now_ms, valid_days=valid_days)
    make_private_dir(d)
    write_private(d / "ca.key", pem_private_key(ca.key))
    write_public(d / "ca.crt", ca.cert_pem)
    return ca


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
    write_private(d / "tls.key", pem_private_key(key))
    write_public(d / "tls.crt", pem_certificate(cert))


def issue_partner(
    root: str | os.PathLike[str],
    code: str,
    now_ms: int,
    *,
    valid_days: int = DEFAULT_CERT_DAYS,
    hpke_valid_days: int = DEFAULT_HPKE_DAYS,
    force: bool = False,
    ml_dsa: bool = True,
) -> Path:
    """Issue a partner's TLS cert, signing key + cert, first HPKE key and bundle.

    The signing key is hybrid: an Ed25519 key (``signing.key``) and an ML-DSA-65 key
    (``signing-ml-dsa.key``), both certified in ``signing.crt``; with ``ml_dsa=False``
    it is Ed25519 only (a partner that signs v1 envelopes only, as before hybrid keys).
    Returns the partner directory. Raises PkiError (no CA, keys exist) or IdentityError.
    """
    identity = Identity.partner(code)
    d = partner_dir(root, code)
    refuse_overwrite(
        [d / "tls.key", d / "signing.key", d / ML_DSA_KEY_FILE, d / BUNDLE_FILE], force
    )
    ca = load_ca(root)
    make_private_dir(d)
    _issue_tls(ca, d, identity, now_ms, valid_days)
    _new_signing_key(ca, d, identity, code, now_ms, valid_days, hpke_valid_days, ml_dsa)
    return d


def _new_hpke_key(
    d: Path,
    code: str,
    signing: Ed25519PrivateKey | HybridSigningKey,
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
    write_private(d / f"{HPKE_PREFIX}{bundle.key_id}{HPKE_SUFFIX}", key.private_bytes())
    signed = sign_key_bundle(bundle, signing)
    write_public(d / BUNDLE_FILE, signed.SerializeToString())
    return directory_pb2.KeyBundle.FromString(signed.bundle)


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
    signing, signing_cert, hybrid = load_signing_key(d)
    signer = hybrid if hybrid is not None else signing
    return _new_hpke_key(d, code, signer, signing_cert, now_ms, valid_days)


def reissue_signing(
    root: str | os.PathLike[str],
    code: str,
    now_ms: int,
    *,
    valid_days: int = DEFAULT_CERT_DAYS,
    hpke_valid_days: int = DEFAULT_HPKE_DAYS,
    ml_dsa: bool = True,
) -> Path:
    """Replace an existing partner's signing key and certificate (Ed25519 + ML-DSA-65
    unless ``ml_dsa=False``) and sign a new HPKE key bundle under it; the TLS key and
    the old ``hpke-*.key`` files stay (messages sealed to them still open). Operators
    then propose the new ``signing.crt`` with ``coalition-admin partners rekey``.
    Returns the partner directory. Raises PkiError (no CA, no such partner)."""
    identity = Identity.partner(code)
    d = partner_dir(root, code)
    if not (d / "signing.key").is_file():
        raise PkiError(f"unknown partner {code}: no signing key in {d}; use issue-partner")
    ca = load_ca(root)
    _new_signing_key(ca, d, identity, code, now_ms, valid_days, hpke_valid_days, ml_dsa)
    return d


def _new_signing_key(
    ca: CertificateAuthority,
    d: Path,
    identity: Identity,
    code: str,
    now_ms: int,
    valid_days: int,
    hpke_valid_days: int,
    ml_dsa: bool,
) -> None:
    """New signing keys (Ed25519, and ML-DSA-65 unless ``ml_dsa`` is False), their
    certificate, and a new HPKE key bundle signed under them, written into ``d``."""
    signing = Ed25519PrivateKey.generate()
    ml_dsa_key = MLDSA65PrivateKey.generate() if ml_dsa else None
    signing_cert = issue_signing_cert(
        ca,
        identity,
        signing.public_key(),
        now_ms,
        valid_days=valid_days,
        ml_dsa_key=ml_dsa_key.public_key() if ml_dsa_key is not None else None,
    )
    write_private(d / "signing.key", pem_private_key(signing))
    if ml_dsa_key is not None:
        write_private(d / ML_DSA_KEY_FILE, pem_private_key(ml_dsa_key))
    else:
        (d / ML_DSA_KEY_FILE).unlink(missing_ok=True)  # an Ed25519-only key replaces a hybrid one
    write_public(d / "signing.crt", pem_certificate(signing_cert))
    signer = HybridSigningKey(signing, ml_dsa_key) if ml_dsa_key is not None else signing
    _new_hpke_key(d, code, signer, signing_cert, now_ms, hpke_valid_days)


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
    refuse_overwrite([d / "tls.key"], force)
    ca = load_ca(root)
    make_private_dir(d)
    _issue_tls(ca, d, identity, now_ms, valid_days)
    return d


def issue_gateway(
    root: str | os.PathLike[str],
    nation: str,
    now_ms: int,
    *,
    valid_days: int = DEFAULT_CERT_DAYS,
    force: bool = False,
) -> Path:
    """Issue this nation's gateway TLS cert (``urn:coalition:gateway:<NATION>``), which
    its broker presents to peer nations' brokers. Returns its directory. Raises PkiError
    or IdentityError."""
    identity = Identity.gateway(nation)
    d = gateway_dir(root, nation)
    refuse_overwrite([d / "tls.key"], force)
    ca = load_ca(root)
    make_private_dir(d)
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
    refuse_overwrite([d / "tls.key", d / "audit.key"], force)
    ca = load_ca(root)
    make_private_dir(d)
    _issue_tls(ca, d, identity, now_ms, valid_days, names)
    audit = Ed25519PrivateKey.generate()
    audit_cert = issue_signing_cert(ca, identity, audit.public_key(), now_ms, valid_days=valid_days)
    write_private(d / "audit.key", pem_private_key(audit))
    write_public(d / "audit.crt", pem_certificate(audit_cert))
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
    ml_dsa: bool = True,
) -> None:
    """A whole development PKI: CA, broker, each partner and operator. Raises PkiError.

    ``broker_hosts`` and ``broker_ips`` are added to the broker certificate's names.
    Partners get hybrid (Ed25519 + ML-DSA-65) signing keys unless ``ml_dsa`` is False."""
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
        issue_partner(dir, code, now_ms, force=force, ml_dsa=ml_dsa)
    for name in operators:
        issue_operator(dir, name, now_ms, force=force)
