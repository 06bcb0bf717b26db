"""Federation rules: which nation a code speaks for, the trust file, foreign signing
certificates and custody receipts. No network; the trust file is parsed from its text
(``load_trust_file`` reads it and the CA files it names).

A partner code speaks for nation ``N`` when it is ``N`` or starts with ``N-``. The
trust file names this broker's (or node's) own nation and, per peer nation, the CA
that speaks for it and its broker's endpoint::

    nation = "NATO"

    [[peers]]
    nation = "KOR"
    ca = "kor-ca.crt"              # PEM, relative to the trust file
    endpoint = "kor-broker:7443"   # host:port of that nation's broker

A certificate issued by a peer's CA may only speak for that peer's nation.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tomllib
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError

from coalition import ed25519
from coalition.identity import (
    Identity,
    IdentityError,
    IdentityKind,
    identity_from_cert,
    verify_audit_cert,
    verify_signing_cert,
)
from coalition.pae import CUSTODY_RECEIPT_TYPE, pae
from coalition.v1 import federation_pb2

# The wire's bounds, known to both sides: a Forward request carries at most this many
# envelopes (a link splits its batches to fit; a receiver refuses more, whole), each
# with an originator certificate of at most this many bytes.
MAX_FORWARD_ITEMS = 256
MAX_SIGNING_CERT_BYTES = 16 << 10
# Refusal reasons in a custody receipt that say "not now" rather than "never": the
# receiver's store or the sender's share of it is full. A link does not acknowledge
# such a message; it waits and sends it again.
RETRY_REASONS = frozenset({"store_full", "quota_exceeded", "rate_limited"})

__all__ = [
    "MAX_FORWARD_ITEMS",
    "MAX_SIGNING_CERT_BYTES",
    "RETRY_REASONS",
    "FederationError",
    "Peer",
    "TrustFile",
    "issued_by",
    "load_trust_file",
    "parse_trust_file",
    "receipt_from_audit",
    "sign_receipt",
    "speaks_for",
    "verify_foreign_signing_cert",
    "verify_receipt",
]


class FederationError(ValueError):
    """A trust file, foreign certificate or receipt refused; ``code`` says which rule."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def speaks_for(code: str, nation: str) -> bool:
    """Whether partner (or gateway) code speaks for nation: ``N`` or ``N-...``."""
    return code == nation or code.startswith(nation + "-")


@dataclass(frozen=True)
class Peer:
    """A peer nation: the CA that speaks for it and where its broker listens."""

    nation: str
    ca_cert: x509.Certificate = field(repr=False)
    endpoint: str

    @property
    def ca_der(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.DER)

    @property
    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def ca_fingerprint(self) -> str:
        return hashlib.sha256(self.ca_der).hexdigest()


@dataclass(frozen=True)
class TrustFile:
    """The operators' federation trust file, parsed and checked."""

    nation: str
    peers: Mapping[str, Peer]  # by nation code
    sha256: str  # of the file's text and each CA it names, in order

    def peer_for(self, code: str) -> Peer | None:
        """The peer nation code speaks for, or None (a local or unknown code)."""
        return next((p for p in self.peers.values() if speaks_for(code, p.nation)), None)

    def summary(self) -> dict[str, object]:
        """What the audit records of a load: the digest and each peer (plain JSON)."""
        return {
            "sha256": self.sha256,
            "nation": self.nation,
            "peers": {
                n: {"ca_sha256": p.ca_fingerprint, "endpoint": p.endpoint}
                for n, p in sorted(self.peers.items())
            },
        }


def _code(where: str, value: object) -> str:
    if not isinstance(value, str):
        raise FederationError("bad_trust_file", f"{where} must be a string nation code")
    try:
        return Identity.gateway(value).name  # the partner code grammar
    except IdentityError as exc:
        raise FederationError("bad_trust_file", f"{where}: {exc}") from exc


def _ca(where: str, pem: bytes) -> x509.Certificate:
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise FederationError("bad_trust_file", f"{where} is not a PEM certificate") from exc
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise FederationError("bad_trust_file", f"{where} is not a CA certificate")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise FederationError("bad_trust_file", f"{where} is not a self-signed root") from exc
    return cert


def parse_trust_file(text: str, read: Callable[[str], bytes]) -> TrustFile:
    """Parse a trust file; read(name) returns the bytes of a CA file it names.

    Refused (FederationError ``bad_trust_file``): bad TOML, an unknown key, a bad nation
    code, a peer that speaks for this nation or for another peer (``KOR`` beside
    ``KOR-NAVY``), a CA named twice, a file that is not a self-signed CA certificate,
    an endpoint that is not host:port.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FederationError("bad_trust_file", f"the trust file is not TOML: {exc}") from exc
    unknown = set(raw) - {"nation", "peers"}
    if unknown:
        raise FederationError("bad_trust_file", f"unknown keys {sorted(unknown)} in the trust file")
    nation = _code("nation", raw.get("nation"))
    digest = hashlib.sha256(text.encode("utf-8"))
    peers: dict[str, Peer] = {}
    entries = raw.get("peers", [])
    if not isinstance(entries, list):
        raise FederationError("bad_trust_file", "peers must be an array of tables ([[peers]])")
    for i, entry in enumerate(entries):
        where = f"peers[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"nation", "ca", "endpoint"}:
            raise FederationError(
                "bad_trust_file", f"{where} takes exactly nation, ca and endpoint"
            )
        code = _code(f"{where}.nation", entry.get("nation"))
        for other in (nation, *peers):
            if speaks_for(code, other) or speaks_for(other, code):
                raise FederationError(
                    "bad_trust_file",
                    f"{where}: nation {code} overlaps {other} (one speaks for the other)",
                )
        ca_name, endpoint = entry.get("ca"), entry.get("endpoint")
        if not isinstance(ca_name, str) or not ca_name:
            raise FederationError("bad_trust_file", f"{where}.ca must name a PEM file")
        if not isinstance(endpoint, str) or not _host_port(endpoint):
            raise FederationError("bad_trust_file", f"{where}.endpoint must be host:port")
        try:
            pem = read(ca_name)
        except OSError as exc:
            raise FederationError(
                "bad_trust_file", f"{where}.ca: cannot read {ca_name}: {exc}"
            ) from exc
        digest.update(pem)
        peer = Peer(code, _ca(f"{where}.ca ({ca_name})", pem), endpoint)
        if any(p.ca_der == peer.ca_der for p in peers.values()):
            raise FederationError("bad_trust_file", f"{where}: this CA is already another peer's")
        peers[code] = peer
    return TrustFile(nation, peers, digest.hexdigest())


def _host_port(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def load_trust_file(path: str | os.PathLike[str]) -> TrustFile:
    """Read and parse a trust file; CA files are relative to it. Raises FederationError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FederationError("bad_trust_file", f"cannot read the trust file {p}: {exc}") from exc

    def read(name: str) -> bytes:
        return (p.parent / name).read_bytes()

    return parse_trust_file(text, read)


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ca's key signed cert and cert names ca as its issuer."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def verify_foreign_signing_cert(
    cert_der: bytes, peer: Peer, sender: str, now_ms: int
) -> Ed25519PublicKey:
    """sender's signing key, certified by peer's CA, for a sender that speaks for peer's
    nation. Raises FederationError ``origin_mismatch`` (sender does not speak for the
    nation) or ``bad_signing_cert`` (not issued by that CA to sender, or not valid)."""
    if not speaks_for(sender, peer.nation):
        raise FederationError(
            "origin_mismatch",
            f"sender {sender} does not speak for nation {peer.nation}: its gateway forwards "
            f"only messages of senders {peer.nation} or {peer.nation}-...",
        )
    try:
        return verify_signing_cert(cert_der, peer.ca_cert, sender, now_ms)
    except IdentityError as exc:
        raise FederationError(
            "bad_signing_cert", f"signing certificate refused under {peer.nation}'s CA: {exc}"
        ) from exc


def sign_receipt(
    receipt: federation_pb2.CustodyReceipt, key: Ed25519PrivateKey, signer_cert_der: bytes
) -> federation_pb2.SignedReceipt:
    """The receipt signed with the receiver's audit key."""
    body = receipt.SerializeToString(deterministic=True)
    return federation_pb2.SignedReceipt(
        receipt=body,
        signature=key.sign(pae(CUSTODY_RECEIPT_TYPE, body)),
        signer_cert=signer_cert_der,
    )


def verify_receipt(
    signed: federation_pb2.SignedReceipt,
    ca: x509.Certificate,
    now_ms: int,
    checked: MutableMapping[bytes, Ed25519PublicKey] | None = None,
) -> federation_pb2.CustodyReceipt:
    """The receipt, once its signer certificate verified as a broker's audit certificate
    issued by ca and its signature under it. Raises FederationError ``bad_receipt``.

    ``checked`` (signer certificate DER to its key) spares the certificate check of the
    receipts of one answer, which one audit key signs: the caller keeps it no longer
    than ``now_ms`` holds."""
    try:
        key = checked.get(signed.signer_cert) if checked is not None else None
        if key is None:
            cert = x509.load_der_x509_certificate(signed.signer_cert)
            who = identity_from_cert(cert)
            if who.kind is not IdentityKind.BROKER:
                raise IdentityError(f"the receipt is signed by {who.uri}, not a broker")
            key = verify_audit_cert(signed.signer_cert, ca, who.name, now_ms)
            if checked is not None:
                checked[signed.signer_cert] = key
        ed25519.verify(key, signed.signature, pae(CUSTODY_RECEIPT_TYPE, signed.receipt))
        return federation_pb2.CustodyReceipt.FromString(signed.receipt)
    except InvalidSignature as exc:
        raise FederationError("bad_receipt", "the receipt's signature does not verify") from exc
    except (ValueError, IdentityError, DecodeError) as exc:
        raise FederationError("bad_receipt", f"the receipt is not trusted: {exc}") from exc


def receipt_from_audit(detail: Mapping[str, object]) -> federation_pb2.SignedReceipt:
    """The signed receipt a ``federation.receipt`` audit entry's detail carries (base64
    receipt, signature and signer certificate), to verify with ``verify_receipt``
    against the receiving nation's CA. Raises FederationError ``bad_receipt``."""
    try:
        fields = [detail["receipt"], detail["signature"], detail["signer_cert"]]
        receipt, signature, cert = (base64.b64decode(str(f), validate=True) for f in fields)
    except (KeyError, ValueError) as exc:
        raise FederationError("bad_receipt", f"not a receipt record: {exc}") from exc
    return federation_pb2.SignedReceipt(receipt=receipt, signature=signature, signer_cert=cert)
