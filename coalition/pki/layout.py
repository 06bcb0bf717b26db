"""The PKI directory on disk: its names, its permissions, and reading and writing files.

Layout (private keys 0600, directories 0700)::

    DIR/ca/ca.crt ca.key
    DIR/broker/tls.crt tls.key audit.crt audit.key
    DIR/partners/<CODE>/tls.crt tls.key signing.crt signing.key signing-ml-dsa.key
                        hpke-<keyid>.key bundle.bin
    DIR/operators/<name>/tls.crt tls.key
    DIR/gateways/<NATION>/tls.crt tls.key

Files are written atomically and created with their final mode. A file that is missing,
unreadable or not what it should be raises ``PkiError`` naming the path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey

from coalition.identity import Identity
from coalition.pki.build import PkiError

CA_DIR = "ca"
BROKER_DIR = "broker"
PARTNERS_DIR = "partners"
OPERATORS_DIR = "operators"
# Federation: this nation's gateway certificate for dialing a peer nation's broker.
GATEWAYS_DIR = "gateways"
BUNDLE_FILE = "bundle.bin"
HPKE_PREFIX = "hpke-"
HPKE_SUFFIX = ".key"
# The ML-DSA-65 half of a partner's hybrid signing key, beside signing.key (Ed25519).
ML_DSA_KEY_FILE = "signing-ml-dsa.key"


def partner_dir(root: str | os.PathLike[str], code: str) -> Path:
    """``DIR/partners/<CODE>``; raises IdentityError for an invalid code."""
    return Path(root) / PARTNERS_DIR / Identity.partner(code).name


def operator_dir(root: str | os.PathLike[str], name: str) -> Path:
    """``DIR/operators/<name>``; raises IdentityError for an invalid name."""
    return Path(root) / OPERATORS_DIR / Identity.operator(name).name


def gateway_dir(root: str | os.PathLike[str], nation: str) -> Path:
    """``DIR/gateways/<NATION>``; raises IdentityError for an invalid code."""
    return Path(root) / GATEWAYS_DIR / Identity.gateway(nation).name


def make_private_dir(path: Path) -> None:
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


def write_private(path: Path, data: bytes) -> None:
    """A private key file: owner read/write only (0600)."""
    _write(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """A certificate or bundle: world-readable (0644)."""
    _write(path, data, 0o644)


def refuse_overwrite(paths: Iterable[Path], force: bool) -> None:
    """Raise PkiError naming the first of ``paths`` that exists, unless ``force``."""
    if force:
        return
    for p in paths:
        if p.exists():
            raise PkiError(f"{p} already exists; use --force to replace it")


def read_file(path: Path, what: str) -> bytes:
    """The bytes of ``path``; PkiError naming ``what`` when missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise PkiError(f"missing {what}: {path}") from exc
    except OSError as exc:
        raise PkiError(f"cannot read {what} {path}: {exc.strerror}") from exc


def read_cert(path: Path, what: str) -> x509.Certificate:
    """A PEM certificate; PkiError when missing or not PEM."""
    try:
        return x509.load_pem_x509_certificate(read_file(path, what))
    except ValueError as exc:
        raise PkiError(f"{path} is not a PEM certificate") from exc


def read_ed25519_key(path: Path, what: str) -> Ed25519PrivateKey:
    """An unencrypted PEM Ed25519 private key; PkiError otherwise."""
    try:
        key = serialization.load_pem_private_key(read_file(path, what), password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise PkiError(f"{path} is not an Ed25519 private key")
    return key


def read_ml_dsa_key(path: Path, what: str) -> MLDSA65PrivateKey:
    """An unencrypted PEM (PKCS#8) ML-DSA-65 private key; PkiError otherwise."""
    try:
        key = serialization.load_pem_private_key(read_file(path, what), password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, MLDSA65PrivateKey):
        raise PkiError(f"{path} is not an ML-DSA-65 private key")
    return key
