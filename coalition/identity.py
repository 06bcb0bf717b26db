"""Who is who: identities in certificates, certified signing keys, signed key bundles.

An identity is a URI in a certificate's SAN (``urn:coalition:partner:KOR``). The
coalition CA certifies two kinds of key per partner: an ECDSA P-256 TLS key (mTLS
transport identity) and a signing key (message and key-bundle signatures): Ed25519,
and with it, in the same certificate, an ML-DSA-65 key (``certified_hybrid_key``)
that makes the pair a hybrid signing key. A partner's HPKE public key travels in a
``KeyBundle`` signed by that certified signing key (both halves when it is hybrid),
so a broker that swaps keys is caught.

Pure: no I/O, no clock reads; ``now_ms`` is passed in.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PublicKey
from cryptography.x509.oid import ExtensionOID
from google.protobuf.message import DecodeError

from coalition import ed25519
from coalition.hpke import KEM_NAME, HpkeKeyError, HpkePublicKey
from coalition.hybrid import HybridPublicKey, HybridSignatureError, HybridSigningKey
from coalition.pae import KEY_BUNDLE_TYPE, pae
from coalition.v1 import directory_pb2, envelope_pb2

URN_PREFIX = "urn:coalition:"

# Partner codes follow the label grammar; other names must be safe as one path component.
_PARTNER_CODE = re.compile(r"[A-Z][A-Z0-9-]{1,23}")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# subjectAltPublicKeyInfo (ITU-T X.509 (10/2019) 9.8.2): a second public key the CA
# certifies for the same subject. Its value is a DER SubjectPublicKeyInfo.
SUBJECT_ALT_PUBLIC_KEY_INFO = x509.ObjectIdentifier("2.5.29.72")
# The one form that value may take: id-ml-dsa-65 (RFC 9881), no parameters, 1952-byte key.
_ML_DSA_65_SPKI_PREFIX = bytes.fromhex("308207b2300b0609608648016503040312038207a100")
_ML_DSA_65_SPKI_LEN = len(_ML_DSA_65_SPKI_PREFIX) + 1952
# Critical extensions a signing certificate may carry: any other critical one is refused
# (RFC 5280 4.2: a verifier must reject a critical extension it does not process).
_SIGNING_CERT_CRITICAL = frozenset({ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE})


class IdentityError(ValueError):
    """An identity, certificate or key bundle that is malformed or not trusted."""


class IdentityKind(enum.StrEnum):
    PARTNER = "partner"
    OPERATOR = "operator"
    BROKER = "broker"
    # A national broker calling a peer nation's broker (coalition.federation); its name
    # is the nation code, in the partner code grammar.
    GATEWAY = "gateway"


@dataclass(frozen=True)
class Identity:
    """A principal named in a certificate SAN URI ``urn:coalition:<kind>:<name>``."""

    kind: IdentityKind
    name: str

    def __post_init__(self) -> None:
        try:
            kind = IdentityKind(self.kind)
        except ValueError as exc:
            raise IdentityError(f"unknown identity kind {self.kind!r}") from exc
        object.__setattr__(self, "kind", kind)
        coded = kind in (IdentityKind.PARTNER, IdentityKind.GATEWAY)
        pattern = _PARTNER_CODE if coded else _PLAIN_NAME
        if not isinstance(self.name, str) or not pattern.fullmatch(self.name):
            raise IdentityError(
                f"invalid {kind.value} name {self.name!r} (must match {pattern.pattern})"
            )

    @property
    def uri(self) -> str:
        return f"{URN_PREFIX}{self.kind.value}:{self.name}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> Identity:
        """Parse ``urn:coalition:<kind>:<name>``. Raises IdentityError."""
        if not uri.startswith(URN_PREFIX):
            raise IdentityError(f"not a coalition identity URI: {uri!r}")
        kind, sep, name = uri[len(URN_PREFIX) :].partition(":")
        if not sep:
            raise IdentityError(f"identity URI has no name: {uri!r}")
        try:
            parsed = IdentityKind(kind)
        except ValueError as exc:
            raise IdentityError(f"unknown identity kind in {uri!r}") from exc
        return cls(parsed, name)

    @classmethod
    def partner(cls, code: str) -> Identity:
        return cls(IdentityKind.PARTNER, code)

    @classmethod
    def operator(cls, name: str) -> Identity:
        return cls(IdentityKind.OPERATOR, name)

    @classmethod
    def broker(cls, name: str) -> Identity:
        return cls(IdentityKind.BROKER, name)

    @classmethod
    def gateway(cls, nation: str) -> Identity:
        return cls(IdentityKind.GATEWAY, nation)


def _extensions(cert: x509.Certificate) -> x509.Extensions:
    """The certificate's extensions; IdentityError when one appears twice (RFC 5280 4.2)."""
    try:
        return cert.extensions
    except x509.DuplicateExtension as exc:
        raise IdentityError(
            f"certificate carries the extension {exc.oid.dotted_string} more than once"
        ) from exc


def identity_from_cert(cert: x509.Certificate) -> Identity:
    """The one coalition identity in the cert's SAN URIs. Raises IdentityError."""
    try:
        san = _extensions(cert).get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise IdentityError("certificate has no subjectAltName") from exc
    ours = [
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith(URN_PREFIX)
    ]
    if len(ours) != 1:
        raise IdentityError(
            f"certificate must carry exactly one {URN_PREFIX}* SAN URI, found {len(ours)}"
        )
    return Identity.parse(ours[0])


def identity_from_auth_context(auth_context: Mapping[str, Iterable[bytes]]) -> Identity:
    """The mTLS peer's identity from grpc's ``ServicerContext.auth_context()``.

    grpc has already verified the chain to the CA; this reads the peer's leaf
    certificate (``x509_pem_cert``) and applies ``identity_from_cert``'s
    exactly-one-URI rule rather than trusting the first SAN. Raises IdentityError.
    """
    if list(auth_context.get("transport_security_type", ())) != [b"ssl"]:
        raise IdentityError("connection is not TLS")
    pems = list(auth_context.get("x509_pem_cert", ()))
    if len(pems) != 1:
        raise IdentityError("peer presented no client certificate")
    try:
        cert = x509.load_pem_x509_certificate(pems[0])
    except ValueError as exc:
        raise IdentityError("peer certificate is not PEM") from exc
    return identity_from_cert(cert)


def ms_to_datetime(ms: int) -> dt.datetime:
    """Unix milliseconds as an aware UTC datetime."""
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


def datetime_to_ms(when: dt.datetime) -> int:
    return int(when.timestamp() * 1000)


def check_validity(cert: x509.Certificate, now_ms: int, what: str) -> None:
    """Raise IdentityError unless not_before <= now <= not_after."""
    now = ms_to_datetime(now_ms)
    if now < cert.not_valid_before_utc:
        raise IdentityError(f"{what} is not valid before {cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc:
        raise IdentityError(f"{what} expired at {cert.not_valid_after_utc.isoformat()}")


def verify_certified_ed25519_key(
    cert_der: bytes, ca: x509.Certificate, identity: Identity, now_ms: int
) -> Ed25519PublicKey:
    """The Ed25519 key the CA certified for ``identity`` (signing or audit key).

    Checks: issued directly by ``ca`` (signature and issuer name), CA and cert
    within validity at ``now_ms``, not a CA cert, no critical extension other than
    basicConstraints and keyUsage, digitalSignature usage, the SAN identity, an
    Ed25519 subject key, and a well-formed ML-DSA-65 key if the certificate carries
    one (``certified_hybrid_key``), so a malformed one is never read as "none".
    Raises IdentityError.
    """
    what = f"signing certificate for {identity.uri}"
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError as exc:
        raise IdentityError(f"{what} is not a DER X.509 certificate") from exc
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise IdentityError(f"{what} was not issued by the coalition CA") from exc
    check_validity(ca, now_ms, "coalition CA certificate")
    check_validity(cert, now_ms, what)
    for ext in _extensions(cert):
        if ext.critical and ext.oid not in _SIGNING_CERT_CRITICAL:
            raise IdentityError(
                f"{what} carries the unknown critical extension {ext.oid.dotted_string}"
            )
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise IdentityError(f"{what} is a CA certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise IdentityError(f"{what} has no keyUsage") from exc
    if not ku.digital_signature:
        raise IdentityError(f"{what} does not allow digitalSignature")
    found = identity_from_cert(cert)
    if found != identity:
        raise IdentityError(f"{what} names {found.uri} instead")
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise IdentityError(f"{what} holds a {type(key).__name__}, not an Ed25519 key")
    try:
        certified_hybrid_key(cert)
    except IdentityError as exc:
        raise IdentityError(f"{what}: {exc}") from exc
    return key


def certified_hybrid_key(cert: x509.Certificate) -> HybridPublicKey | None:
    """The certificate's Ed25519 key and the ML-DSA-65 key certified beside it, as one
    hybrid key; None when the certificate carries no subjectAltPublicKeyInfo (v1 only).

    The caller has verified the certificate against the CA (``verify_signing_cert``).
    Strict: the extension must appear once, be non-critical, and hold exactly the DER
    SubjectPublicKeyInfo of an ML-DSA-65 key (no other algorithm, no parameters, no
    trailing bytes), beside an Ed25519 subject key. Raises IdentityError otherwise.
    """
    found = [e for e in _extensions(cert) if e.oid == SUBJECT_ALT_PUBLIC_KEY_INFO]
    if not found:
        return None
    ext = found[0]
    if ext.critical:
        raise IdentityError("the ML-DSA-65 key extension (2.5.29.72) must be non-critical")
    if not isinstance(ext.value, x509.UnrecognizedExtension):
        raise IdentityError("the ML-DSA-65 key extension (2.5.29.72) is not readable")
    der = ext.value.value
    if len(der) != _ML_DSA_65_SPKI_LEN or not der.startswith(_ML_DSA_65_SPKI_PREFIX):
        raise IdentityError(
            "the subjectAltPublicKeyInfo extension (2.5.29.72) must hold exactly one "
            f"ML-DSA-65 SubjectPublicKeyInfo ({_ML_DSA_65_SPKI_LEN} bytes); it holds "
            f"{len(der)} bytes of another form"
        )
    try:
        ml_dsa = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise IdentityError("the ML-DSA-65 key in the certificate is malformed") from exc
    if not isinstance(ml_dsa, MLDSA65PublicKey):  # the prefix makes this unreachable
        raise IdentityError("the subjectAltPublicKeyInfo key is not an ML-DSA-65 key")
    ed = cert.public_key()
    if not isinstance(ed, Ed25519PublicKey):
        raise IdentityError(
            f"an ML-DSA-65 key is certified beside a {type(ed).__name__}, not an Ed25519 key"
        )
    return HybridPublicKey(ed.public_bytes_raw() + ml_dsa.public_bytes_raw())


def verify_signing_cert(
    cert_der: bytes, ca: x509.Certificate, partner: str, now_ms: int
) -> Ed25519PublicKey:
    """The partner's CA-certified Ed25519 signing key. Raises IdentityError."""
    return verify_certified_ed25519_key(cert_der, ca, Identity.partner(partner), now_ms)


def verify_audit_cert(
    cert_der: bytes, ca: x509.Certificate, broker: str, now_ms: int
) -> Ed25519PublicKey:
    """The broker's CA-certified audit (checkpoint signing) key. Raises IdentityError."""
    return verify_certified_ed25519_key(cert_der, ca, Identity.broker(broker), now_ms)


def signing_key_id(cert: x509.Certificate) -> str:
    """The id a signer is known by: its signing certificate's serial, lowercase hex."""
    return format(cert.serial_number, "x")


def key_id_for(public: HpkePublicKey) -> str:
    """First 16 hex digits of SHA-256 over the raw HPKE public key."""
    return hashlib.sha256(public.raw).hexdigest()[:16]


def sign_key_bundle(
    bundle: directory_pb2.KeyBundle, key: Ed25519PrivateKey | HybridSigningKey
) -> directory_pb2.SignedKeyBundle:
    """Serialize ``bundle`` once and sign PAE(KEY_BUNDLE_TYPE, bytes).

    With an Ed25519 key: one Ed25519 signature (v1). With a hybrid key: the bundle
    first names the key pair (``signing_key_sha256``), then Ed25519 (``signature``)
    and ML-DSA-65 (``ml_dsa_65``) both sign the same bytes.
    """
    if isinstance(key, HybridSigningKey):
        named = directory_pb2.KeyBundle()
        named.CopyFrom(bundle)
        named.signing_key_sha256 = key.public_key().fingerprint()
        body = named.SerializeToString(deterministic=True)
        both = key.sign(KEY_BUNDLE_TYPE, body)
        return directory_pb2.SignedKeyBundle(
            bundle=body, signature=both.ed25519, ml_dsa_65=both.ml_dsa_65
        )
    body = bundle.SerializeToString(deterministic=True)
    return directory_pb2.SignedKeyBundle(
        bundle=body, signature=key.sign(pae(KEY_BUNDLE_TYPE, body))
    )


def verify_key_bundle(
    signed: directory_pb2.SignedKeyBundle,
    signing_key: Ed25519PublicKey | HybridPublicKey,
    partner: str,
    now_ms: int,
) -> directory_pb2.KeyBundle:
    """Verify the signature over the exact bytes, then the contents. Raises IdentityError.

    ``signing_key`` is what the partner's signing certificate certifies: its
    ``certified_hybrid_key`` when there is one, and then BOTH signatures are required
    (a bundle stripped of its ML-DSA-65 signature is refused) and the bundle must name
    that key pair; else the Ed25519 key, and then a bundle that names a hybrid key or
    carries an ML-DSA-65 signature is refused (its certificate is not the one it was
    signed under).
    """
    hybrid = signing_key if isinstance(signing_key, HybridPublicKey) else None
    if isinstance(signing_key, HybridPublicKey):
        if not signed.ml_dsa_65:
            raise IdentityError(
                f"key bundle for {partner} has no ML-DSA-65 signature, but {partner}'s "
                "signing certificate certifies an ML-DSA-65 key: both signatures are required"
            )
        both = envelope_pb2.HybridSignature(ed25519=signed.signature, ml_dsa_65=signed.ml_dsa_65)
        try:
            signing_key.verify(both, KEY_BUNDLE_TYPE, signed.bundle)
        except HybridSignatureError as exc:
            half = "" if exc.component == "Ed25519" else f"{exc.component} "
            raise IdentityError(
                f"key bundle {half}signature does not verify for {partner}"
            ) from exc
    elif signed.ml_dsa_65:
        raise IdentityError(
            f"key bundle for {partner} carries an ML-DSA-65 signature, but {partner}'s "
            "signing certificate certifies no ML-DSA-65 key"
        )
    else:
        try:
            ed25519.verify(signing_key, signed.signature, pae(KEY_BUNDLE_TYPE, signed.bundle))
        except InvalidSignature as exc:
            raise IdentityError(f"key bundle signature does not verify for {partner}") from exc
    bundle = directory_pb2.KeyBundle()
    try:
        bundle.ParseFromString(signed.bundle)
    except DecodeError as exc:
        raise IdentityError("key bundle is not a valid KeyBundle message") from exc
    if bundle.partner != partner:
        raise IdentityError(f"key bundle is for {bundle.partner!r}, expected {partner!r}")
    expected = hybrid.fingerprint() if hybrid is not None else b""
    if bundle.signing_key_sha256 != expected:
        raise IdentityError(
            f"key bundle for {partner} names a signing key other than the one "
            f"{partner}'s signing certificate certifies"
        )
    if bundle.kem != KEM_NAME:
        raise IdentityError(f"key bundle KEM is {bundle.kem!r}, expected {KEM_NAME!r}")
    try:
        public = HpkePublicKey(bundle.public_key)
        public.to_hpke()
    except HpkeKeyError as exc:
        raise IdentityError(f"key bundle public key is malformed: {exc}") from exc
    if bundle.key_id != key_id_for(public):
        raise IdentityError("key bundle key_id does not match its public key")
    if now_ms < bundle.not_before_ms:
        raise IdentityError(f"key bundle {bundle.key_id} is not valid yet")
    if now_ms >= bundle.not_after_ms:
        raise IdentityError(f"key bundle {bundle.key_id} has expired")
    return bundle
