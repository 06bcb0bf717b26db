"""The coalition PKI: issuing, loading, and what a verifier accepts or refuses."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID

from coalition import pki
from coalition.hpke import HpkePrivateKey, HpkePublicKey
from coalition.identity import (
    Identity,
    IdentityError,
    IdentityKind,
    certified_hybrid_key,
    identity_from_auth_context,
    identity_from_cert,
    key_id_for,
    sign_key_bundle,
    verify_audit_cert,
    verify_key_bundle,
    verify_signing_cert,
)
from coalition.v1 import directory_pb2

NOW = 1_800_000_000_000  # 2027-01-15, fixed: the library reads no clock
DAY = pki.DAY_MS


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki") / "pki"
    pki.make_dev_pki(d, ["KOR", "USA"], ["op1"], NOW)
    return d


@pytest.fixture(scope="module")
def kor(root: Path) -> pki.PartnerCredentials:
    return pki.load_partner(root / "partners" / "KOR")


@pytest.fixture(scope="module")
def ca(root: Path) -> x509.Certificate:
    return pki.load_ca(root).cert


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


# --- identities ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    ["urn:coalition:partner:KOR", "urn:coalition:operator:op1", "urn:coalition:broker:broker"],
)
def test_identity_uri_round_trips(uri: str) -> None:
    assert Identity.parse(uri).uri == uri


@pytest.mark.parametrize(
    "uri",
    [
        "urn:coalition:partner:kor",  # codes are upper case
        "urn:coalition:partner:",
        "urn:coalition:admin:root",
        "urn:other:partner:KOR",
        "urn:coalition:operator:../etc",
        "urn:coalition:partner",
    ],
)
def test_identity_parse_rejects(uri: str) -> None:
    with pytest.raises(IdentityError):
        Identity.parse(uri)


# --- directory layout ----------------------------------------------------------------


def test_dev_pki_writes_the_contract_layout(root: Path, kor: pki.PartnerCredentials) -> None:
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    kor_hpke = f"partners/KOR/hpke-{kor.current_key_id}.key"
    expected = {
        "ca/ca.crt",
        "ca/ca.key",
        "broker/tls.crt",
        "broker/tls.key",
        "broker/audit.crt",
        "broker/audit.key",
        "operators/op1/tls.crt",
        "operators/op1/tls.key",
        kor_hpke,
    }
    for code in ("KOR", "USA"):
        expected |= {
            f"partners/{code}/{n}"
            for n in (
                "tls.crt",
                "tls.key",
                "signing.crt",
                "signing.key",
                "signing-ml-dsa.key",
                "bundle.bin",
            )
        }
    assert expected <= files
    assert len([f for f in files if f.startswith("partners/USA/hpke-")]) == 1
    assert len(files) == len(expected) + 1  # plus USA's HPKE key


def test_private_keys_are_0600_and_directories_0700(root: Path) -> None:
    keys = [p for p in root.rglob("*.key")]
    assert len(keys) == 1 + 2 + 1 + 2 * 4  # ca, broker tls+audit, op1, 2 partners x 4
    for p in keys:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    for p in [root, *[d for d in root.rglob("*") if d.is_dir()]]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p


def test_private_key_files_never_world_readable_even_with_permissive_umask(
    tmp_path: Path,
) -> None:
    old = os.umask(0)
    try:
        pki.init_ca(tmp_path, NOW)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700


# --- round trips ---------------------------------------------------------------------


def test_load_partner_round_trip(kor: pki.PartnerCredentials, ca: x509.Certificate) -> None:
    assert kor.code == "KOR"
    tls = x509.load_pem_x509_certificate(kor.tls_cert_pem)
    assert identity_from_cert(tls) == Identity(IdentityKind.PARTNER, "KOR")
    assert _eku(tls) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    tls.verify_directly_issued_by(ca)
    assert kor.signing_key_id == format(kor.signing_cert.serial_number, "x")
    assert kor.signing_key_id == kor.signing_key_id.lower()
    key = verify_signing_cert(kor.signing_cert_der, ca, "KOR", NOW)
    assert key == kor.signing_key.public_key()
    hybrid = certified_hybrid_key(kor.signing_cert)
    assert kor.hybrid_signing_key is not None and hybrid is not None
    assert kor.hybrid_signing_key.public_key() == hybrid and hybrid.ed25519 == key
    bundle = verify_key_bundle(kor.bundle, hybrid, "KOR", NOW)
    assert bundle.key_id in kor.hpke_keys
    assert kor.hpke_keys[bundle.key_id].public_key().raw == bundle.public_key


def test_signing_cert_is_digital_signature_only(kor: pki.PartnerCredentials) -> None:
    ku = kor.signing_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.key_encipherment
    with pytest.raises(x509.ExtensionNotFound):
        kor.signing_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)


def test_broker_cert_serves_localhost_and_carries_audit_key(
    root: Path, ca: x509.Certificate
) -> None:
    b = pki.load_broker(root / "broker")
    assert pki.load_broker(root).tls_cert_pem == b.tls_cert_pem  # the root is accepted too
    tls = x509.load_pem_x509_certificate(b.tls_cert_pem)
    assert identity_from_cert(tls) == Identity.broker("broker")
    assert b.name == "broker"
    assert _eku(tls) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = tls.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert b.audit_cert is not None
    key = verify_audit_cert(_der(b.audit_cert), b.ca_cert, "broker", NOW)
    assert key == b.audit_key.public_key()
    assert b.ca_cert == ca


def test_load_operator(root: Path) -> None:
    op = pki.load_operator(root / "operators" / "op1")
    tls = x509.load_pem_x509_certificate(op.tls_cert_pem)
    assert op.name == "op1"
    assert identity_from_cert(tls).uri == "urn:coalition:operator:op1"
    assert _eku(tls) == {ExtendedKeyUsageOID.CLIENT_AUTH}


def test_validity_defaults_and_configurable(tmp_path: Path) -> None:
    authority = pki.init_ca(tmp_path, NOW)
    assert authority.cert.not_valid_after_utc.timestamp() * 1000 == NOW + 5 * 365 * DAY
    d = pki.issue_partner(tmp_path, "KOR", NOW, valid_days=30, hpke_valid_days=7)
    creds = pki.load_partner(d)
    assert creds.signing_cert.not_valid_after_utc.timestamp() * 1000 == NOW + 30 * DAY
    bundle = directory_pb2.KeyBundle.FromString(creds.bundle.bundle)
    assert (bundle.not_before_ms, bundle.not_after_ms) == (NOW, NOW + 7 * DAY)
    d2 = pki.issue_operator(tmp_path, "op1", NOW)
    op = x509.load_pem_x509_certificate(pki.load_operator(d2).tls_cert_pem)
    assert op.not_valid_after_utc.timestamp() * 1000 == NOW + 365 * DAY


def test_credentials_repr_shows_no_key_material(root: Path, kor: pki.PartnerCredentials) -> None:
    text = repr(kor) + repr(pki.load_broker(root)) + repr(pki.load_operator(root / "operators/op1"))
    assert "PRIVATE" not in text and "BEGIN" not in text


def test_refuses_to_overwrite_keys_unless_forced(tmp_path: Path) -> None:
    pki.make_dev_pki(tmp_path, ["KOR"], [], NOW)
    before = pki.load_partner(tmp_path / "partners" / "KOR")
    with pytest.raises(pki.PkiError, match="already"):
        pki.issue_partner(tmp_path, "KOR", NOW)
    with pytest.raises(pki.PkiError, match="already"):
        pki.init_ca(tmp_path, NOW)
    with pytest.raises(pki.PkiError, match="already"):
        pki.make_dev_pki(tmp_path, ["KOR"], [], NOW)
    pki.issue_partner(tmp_path, "KOR", NOW, force=True)
    after = pki.load_partner(tmp_path / "partners" / "KOR")
    assert after.signing_key_id != before.signing_key_id
    assert set(before.hpke_keys) < set(after.hpke_keys)  # old HPKE keys survive


def test_issue_without_ca_fails(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match="no CA"):
        pki.issue_partner(tmp_path, "KOR", NOW)
    assert not (tmp_path / "partners").exists()


def test_invalid_names_are_refused_before_touching_disk(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, NOW)
    with pytest.raises(IdentityError):
        pki.issue_partner(tmp_path, "../KOR", NOW)
    with pytest.raises(IdentityError):
        pki.make_dev_pki(tmp_path / "x", ["KOR", "bad code"], [], NOW)
    assert not (tmp_path / "x").exists()


def test_rotate_hpke_keeps_old_key(tmp_path: Path) -> None:
    pki.make_dev_pki(tmp_path, ["KOR"], [], NOW)
    old = pki.load_partner(tmp_path / "partners" / "KOR")
    new_bundle = pki.rotate_hpke(tmp_path, "KOR", NOW + DAY, valid_days=30)
    new = pki.load_partner(tmp_path / "partners" / "KOR")
    assert new.current_key_id == new_bundle.key_id != old.current_key_id
    assert set(new.hpke_keys) == {old.current_key_id, new_bundle.key_id}
    assert new.hybrid_signing_key is not None
    got = verify_key_bundle(new.bundle, new.hybrid_signing_key.public_key(), "KOR", NOW + DAY)
    assert got.not_after_ms == NOW + 31 * DAY


def test_load_partner_detects_a_foreign_bundle(tmp_path: Path) -> None:
    pki.make_dev_pki(tmp_path, ["KOR", "USA"], [], NOW)
    usa = tmp_path / "partners" / "USA" / "bundle.bin"
    (tmp_path / "partners" / "KOR" / "bundle.bin").write_bytes(usa.read_bytes())
    with pytest.raises(pki.PkiError, match=r"bundle\.bin"):
        pki.load_partner(tmp_path / "partners" / "KOR")


# --- identity_from_cert / auth context -----------------------------------------------


def test_identity_from_cert_requires_exactly_one_coalition_uri() -> None:
    authority = pki.create_ca(NOW)
    key = Ed25519PrivateKey.generate()
    good = pki.issue_signing_cert(authority, Identity.partner("KOR"), key.public_key(), NOW)
    assert identity_from_cert(good).name == "KOR"
    builder = (
        x509.CertificateBuilder()
        .subject_name(authority.cert.subject)
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(good.not_valid_before_utc)
        .not_valid_after(good.not_valid_after_utc)
    )
    no_san = builder.sign(authority.key, hashes.SHA256())
    with pytest.raises(IdentityError, match="subjectAltName"):
        identity_from_cert(no_san)
    two = builder.add_extension(
        x509.SubjectAlternativeName(
            [
                x509.UniformResourceIdentifier("urn:coalition:partner:KOR"),
                x509.UniformResourceIdentifier("urn:coalition:partner:USA"),
            ]
        ),
        critical=False,
    ).sign(authority.key, hashes.SHA256())
    with pytest.raises(IdentityError, match="exactly one"):
        identity_from_cert(two)


def test_identity_from_auth_context(kor: pki.PartnerCredentials) -> None:
    ctx = {
        "transport_security_type": [b"ssl"],
        "x509_pem_cert": [kor.tls_cert_pem],
        "peer_uri": [b"urn:coalition:partner:KOR"],
    }
    assert identity_from_auth_context(ctx) == Identity.partner("KOR")
    with pytest.raises(IdentityError, match="not TLS"):
        identity_from_auth_context({"transport_security_type": [b"insecure"]})
    with pytest.raises(IdentityError, match="no client certificate"):
        identity_from_auth_context({"transport_security_type": [b"ssl"]})


# --- verify_signing_cert -------------------------------------------------------------


def test_verify_signing_cert_rejects_another_cas_cert(kor: pki.PartnerCredentials) -> None:
    # Same subject name as the real CA: only the signature tells them apart.
    rogue = pki.create_ca(NOW)
    forged = pki.issue_signing_cert(
        rogue, Identity.partner("KOR"), kor.signing_key.public_key(), NOW
    )
    real_ca = x509.load_pem_x509_certificate(kor.ca_pem)
    assert forged.issuer == real_ca.subject
    with pytest.raises(IdentityError, match="not issued by the coalition CA"):
        verify_signing_cert(_der(forged), real_ca, "KOR", NOW)


@pytest.mark.parametrize(
    ("now", "message"),
    [(NOW + 366 * DAY, "expired"), (NOW - DAY, "not valid before")],
)
def test_verify_signing_cert_rejects_outside_validity(
    kor: pki.PartnerCredentials, ca: x509.Certificate, now: int, message: str
) -> None:
    with pytest.raises(IdentityError, match=message):
        verify_signing_cert(kor.signing_cert_der, ca, "KOR", now)


def test_verify_signing_cert_rejects_wrong_partner(
    kor: pki.PartnerCredentials, ca: x509.Certificate
) -> None:
    with pytest.raises(IdentityError, match="names urn:coalition:partner:KOR"):
        verify_signing_cert(kor.signing_cert_der, ca, "USA", NOW)


def test_verify_signing_cert_rejects_non_ed25519_key(
    kor: pki.PartnerCredentials, ca: x509.Certificate
) -> None:
    tls_der = _der(x509.load_pem_x509_certificate(kor.tls_cert_pem))  # ECDSA, same identity
    with pytest.raises(IdentityError, match="not an Ed25519 key"):
        verify_signing_cert(tls_der, ca, "KOR", NOW)


def test_verify_signing_cert_rejects_garbage(ca: x509.Certificate) -> None:
    with pytest.raises(IdentityError, match="not a DER"):
        verify_signing_cert(b"not a certificate", ca, "KOR", NOW)


def test_audit_cert_is_not_a_partner_signing_cert(root: Path, ca: x509.Certificate) -> None:
    audit = pki.load_broker(root).audit_cert
    assert audit is not None
    with pytest.raises(IdentityError, match="names urn:coalition:broker:broker"):
        verify_signing_cert(_der(audit), ca, "KOR", NOW)


# --- key bundles ---------------------------------------------------------------------


def _bundle(
    partner: str = "KOR", changes: dict[str, object] | None = None
) -> tuple[directory_pb2.KeyBundle, bytes]:
    key = HpkePrivateKey.generate()
    b = pki.make_key_bundle(partner, key, NOW, NOW + 10 * DAY)
    for name, value in (changes or {}).items():
        setattr(b, name, value)
    return b, key.public_key().raw


def test_key_bundle_round_trip() -> None:
    signer = Ed25519PrivateKey.generate()
    b, raw = _bundle()
    got = verify_key_bundle(sign_key_bundle(b, signer), signer.public_key(), "KOR", NOW)
    assert got == b
    assert got.public_key == raw
    assert got.key_id == key_id_for(HpkePublicKey(raw))
    assert got.key_id == hashlib.sha256(raw).hexdigest()[:16]


def test_key_bundle_rejects_tampered_bytes() -> None:
    signer = Ed25519PrivateKey.generate()
    signed = sign_key_bundle(_bundle()[0], signer)
    body = bytearray(signed.bundle)
    body[-1] ^= 1  # inside not_after_ms: still parses, no longer what was signed
    tampered = directory_pb2.SignedKeyBundle(bundle=bytes(body), signature=signed.signature)
    with pytest.raises(IdentityError, match="signature"):
        verify_key_bundle(tampered, signer.public_key(), "KOR", NOW)


def test_key_bundle_rejects_another_signer() -> None:
    signed = sign_key_bundle(_bundle()[0], Ed25519PrivateKey.generate())
    with pytest.raises(IdentityError, match="signature"):
        verify_key_bundle(signed, Ed25519PrivateKey.generate().public_key(), "KOR", NOW)


def test_key_bundle_rejects_wrong_partner() -> None:
    signer = Ed25519PrivateKey.generate()
    signed = sign_key_bundle(_bundle("USA")[0], signer)
    with pytest.raises(IdentityError, match="for 'USA'"):
        verify_key_bundle(signed, signer.public_key(), "KOR", NOW)


@pytest.mark.parametrize(
    ("now", "message"), [(NOW + 10 * DAY, "expired"), (NOW - 1, "not valid yet")]
)
def test_key_bundle_rejects_outside_validity(now: int, message: str) -> None:
    signer = Ed25519PrivateKey.generate()
    signed = sign_key_bundle(_bundle()[0], signer)
    with pytest.raises(IdentityError, match=message):
        verify_key_bundle(signed, signer.public_key(), "KOR", now)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"key_id": "0123456789abcdef"}, "key_id does not match"),
        ({"kem": "X25519"}, "KEM"),
        ({"public_key": b"\x00" * 32}, "malformed"),
    ],
)
def test_key_bundle_rejects_bad_contents_even_when_signed(
    changes: dict[str, object], message: str
) -> None:
    signer = Ed25519PrivateKey.generate()
    signed = sign_key_bundle(_bundle(changes=changes)[0], signer)
    with pytest.raises(IdentityError, match=message):
        verify_key_bundle(signed, signer.public_key(), "KOR", NOW)
