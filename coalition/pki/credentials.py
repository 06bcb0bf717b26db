"""The credentials each party loads from its PKI directory: in-memory values, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coalition.hpke import HpkePrivateKey
from coalition.hybrid import HybridSigningKey
from coalition.v1 import directory_pb2


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
    # signing_key with the ML-DSA-65 key signing_cert certifies beside it; None when the
    # certificate certifies none (an Ed25519-only partner: it signs v1 only).
    hybrid_signing_key: HybridSigningKey | None = field(default=None, repr=False)

    @property
    def signing_cert_der(self) -> bytes:
        return self.signing_cert.public_bytes(serialization.Encoding.DER)

    @property
    def current_key_id(self) -> str:
        """Key id of the HPKE key in the current ``bundle``."""
        return directory_pb2.KeyBundle.FromString(self.bundle.bundle).key_id


@dataclass
class OperatorCredentials:
    """An operator's TLS identity and the CA; load with ``load_operator(dir)``."""

    name: str
    ca_pem: bytes = field(repr=False)
    tls_cert_pem: bytes = field(repr=False)
    tls_key_pem: bytes = field(repr=False)


@dataclass
class GatewayCredentials:
    """A nation's gateway TLS identity (federation) and its CA; ``load_gateway(dir)``."""

    nation: str
    ca_pem: bytes = field(repr=False)
    tls_cert_pem: bytes = field(repr=False)
    tls_key_pem: bytes = field(repr=False)


@dataclass
class BrokerCredentials:
    """The broker's TLS identity, its audit key and the CA; load with ``load_broker(dir)``."""

    ca_pem: bytes = field(repr=False)
    ca_cert: x509.Certificate
    tls_cert_pem: bytes = field(repr=False)
    tls_key_pem: bytes = field(repr=False)
    audit_key: Ed25519PrivateKey = field(repr=False)
    # Additions to the contract: the broker's identity name and its audit key's certificate.
    name: str = "broker"
    audit_cert: x509.Certificate | None = None
