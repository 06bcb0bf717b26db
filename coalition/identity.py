"""Who is who: identities in certificates, certified signing keys, signed key bundles.

An identity is a URI in a certificate's SAN (``urn:coalition:partner:KOR``). The
coalition CA certifies two kinds of key per partner: an ECDSA P-256 TLS key (mTLS
transport identity) and an Ed25519 signing key (message and key-bundle
signatures). A partner's HPKE public key travels in a ``KeyBundle`` signed by
that certified signing key, so a broker that swaps keys is caught.

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
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from google.protobuf.message import DecodeError

from coalition import ed25519
from coalition.hpke import KEM_NAME, HpkeKeyError, HpkePublicKey
from coalition.pae import KEY_BUNDLE_TYPE, pae
from coalition.v1 import directory_pb2

URN_PREFIX = "urn:coalition:"

# Partner codes follow the label grammar; other names must be safe as one path component.
_PARTNER_CODE = re.compile(r"[A-Z][A-Z0-9-]{1,23}")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class IdentityError(ValueError):
    """An identity, certificate or key bundle that is malformed or not trusted."""


class IdentityKind(enum.StrEnum):
    PARTNER = "partner"
    OPERATOR = "operator"
    BROKER = "broker"


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
        pattern = _PARTNER_CODE if kind is IdentityKind.PARTNER else _PLAIN_NAME
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


def identity_from_cert(cert: x509.Certificate) -> Identity:
    """The one coalition identity in the cert's SAN URIs. Raises IdentityError."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
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
    within validity at ``now_ms``, not a CA cert, digitalSignature usage, the SAN
    identity, and an Ed25519 subject key. Raises IdentityError.
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
    return key


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
    bundle: directory_pb2.KeyBundle, key: Ed25519PrivateKey
) -> directory_pb2.SignedKeyBundle:
    """Serialize ``bundle`` once and sign PAE(KEY_BUNDLE_TYPE, bytes) with Ed25519."""
    body = bundle.SerializeToString(deterministic=True)
    return directory_pb2.SignedKeyBundle(
        bundle=body, signature=key.sign(pae(KEY_BUNDLE_TYPE, body))
    )


def verify_key_bundle(
    signed: directory_pb2.SignedKeyBundle,
    signing_key: Ed25519PublicKey,
    partner: str,
    now_ms: int,
) -> directory_pb2.KeyBundle:
    """Verify the signature over the exact bytes, then the contents. Raises IdentityError."""
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
