"""Hybrid signing keys in the PKI: the CA certifies a partner's ML-DSA-65 key in the same
certificate as its Ed25519 key (subjectAltPublicKeyInfo, 2.5.29.72), the key directory
holds both halves, key bundles carry both signatures, and the directory and the broker
look the hybrid key up. A partner issued without an ML-DSA-65 key (v1 only) still loads,
verifies and registers as before."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA44PrivateKey, MLDSA65PrivateKey

from broker.exchange import SigningCertNotValid
from broker.server import start_broker
from clients.sdk import ClientError
from coalition import ed25519, pki
from coalition.directory import Directory
from coalition.hpke import HpkePrivateKey
from coalition.hybrid import HybridPublicKey, HybridSigningKey
from coalition.identity import (
    SUBJECT_ALT_PUBLIC_KEY_INFO,
    Identity,
    IdentityError,
    certified_hybrid_key,
    sign_key_bundle,
    verify_key_bundle,
    verify_signing_cert,
)
from coalition.pae import KEY_BUNDLE_TYPE, pae
from coalition.pki.build import pem_private_key
from coalition.pki.layout import ML_DSA_KEY_FILE
from coalition.policy import policy_to_proto
from coalition.v1 import directory_pb2, exchange_pb2
from tests.helpers import (
    admit,
    broker_config,
    now_ms,
    operator,
    partner,
    policy,
    running_broker,
)

NOW = 1_800_000_000_000  # fixed: the library reads no clock
DAY = pki.DAY_MS


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """KOR hybrid (the default), USA Ed25519 only."""
    d = tmp_path_factory.mktemp("pki-hybrid") / "pki"
    pki.make_dev_pki(d, ["KOR"], ["op1", "op2"], NOW)
    pki.issue_partner(d, "USA", NOW, ml_dsa=False)
    return d


@pytest.fixture(scope="module")
def ca(root: Path) -> pki.CertificateAuthority:
    return pki.load_ca(root)


@pytest.fixture(scope="module")
def kor(root: Path) -> pki.PartnerCredentials:
    return pki.load_partner(root / "partners" / "KOR")


@pytest.fixture(scope="module")
def usa(root: Path) -> pki.PartnerCredentials:
    return pki.load_partner(root / "partners" / "USA")


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _spki(key: MLDSA65PrivateKey | MLDSA44PrivateKey | Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _signing_cert(
    ca: pki.CertificateAuthority,
    extensions: list[tuple[x509.ObjectIdentifier, bytes, bool]],
    subject_key: Ed25519PublicKey | ec.EllipticCurvePublicKey | None = None,
) -> x509.Certificate:
    """A KOR signing certificate the CA really signed, with the given raw extensions."""
    key = subject_key or Ed25519PrivateKey.generate().public_key()
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "KOR signing")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.cert.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(ca.cert.not_valid_before_utc)
        .not_valid_after(ca.cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(Identity.partner("KOR").uri)]
            ),
            critical=False,
        )
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
    )
    for oid, value, critical in extensions:
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=critical)
    return builder.sign(ca.key, hashes.SHA256())


# --- the certificate ------------------------------------------------------------------


def test_the_ca_certifies_both_keys_in_one_signing_certificate(
    kor: pki.PartnerCredentials, ca: pki.CertificateAuthority
) -> None:
    ext = kor.signing_cert.extensions.get_extension_for_oid(SUBJECT_ALT_PUBLIC_KEY_INFO)
    assert not ext.critical  # code that knows only Ed25519 still reads the certificate
    assert kor.hybrid_signing_key is not None
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    assert ext.value.value == _spki_of(kor.hybrid_signing_key)
    ed = verify_signing_cert(_der(kor.signing_cert), ca.cert, "KOR", NOW)
    hybrid = certified_hybrid_key(kor.signing_cert)
    assert hybrid == kor.hybrid_signing_key.public_key()
    assert hybrid is not None and hybrid.ed25519 == ed == kor.signing_key.public_key()
    # One certificate, one serial: the signing key id is the same for v1 and v2.
    assert kor.signing_key_id == format(kor.signing_cert.serial_number, "x")


def _spki_of(key: HybridSigningKey) -> bytes:
    return key.ml_dsa.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_a_certificate_without_the_extension_is_v1_only(
    usa: pki.PartnerCredentials, ca: pki.CertificateAuthority, root: Path
) -> None:
    assert certified_hybrid_key(usa.signing_cert) is None
    assert usa.hybrid_signing_key is None
    assert not (root / "partners" / "USA" / ML_DSA_KEY_FILE).exists()
    verify_signing_cert(_der(usa.signing_cert), ca.cert, "USA", NOW)
    bundle = verify_key_bundle(usa.bundle, usa.signing_key.public_key(), "USA", NOW)
    assert bundle.signing_key_sha256 == b"" and usa.bundle.ml_dsa_65 == b""


def test_a_tampered_ml_dsa_key_breaks_the_ca_signature(
    kor: pki.PartnerCredentials, ca: pki.CertificateAuthority
) -> None:
    der = bytearray(_der(kor.signing_cert))
    assert kor.hybrid_signing_key is not None
    at = bytes(der).index(_spki_of(kor.hybrid_signing_key)) + 500
    der[at] ^= 0x01
    with pytest.raises(IdentityError, match="not issued by the coalition CA"):
        verify_signing_cert(bytes(der), ca.cert, "KOR", NOW)
    # Read without the CA check, it would be another key: why callers verify first.
    swapped = certified_hybrid_key(x509.load_der_x509_certificate(bytes(der)))
    assert swapped is not None and swapped != certified_hybrid_key(kor.signing_cert)


@pytest.mark.parametrize(
    ("value", "critical", "message"),
    [
        (lambda: _spki(MLDSA44PrivateKey.generate()), False, "another form"),
        (lambda: _spki(Ed25519PrivateKey.generate()), False, "another form"),
        (lambda: _spki(MLDSA65PrivateKey.generate()) + b"\x00", False, "another form"),
        (lambda: _spki(MLDSA65PrivateKey.generate())[:-1], False, "another form"),
        (lambda: b"", False, "another form"),
        (lambda: _spki(MLDSA65PrivateKey.generate()), True, "non-critical|critical extension"),
    ],
    ids=["ml-dsa-44", "ed25519", "trailing-byte", "truncated", "empty", "critical"],
)
def test_a_malformed_ml_dsa_extension_is_refused(
    ca: pki.CertificateAuthority, value: object, critical: bool, message: str
) -> None:
    assert callable(value)
    cert = _signing_cert(ca, [(SUBJECT_ALT_PUBLIC_KEY_INFO, value(), critical)])
    with pytest.raises(IdentityError, match=message):
        certified_hybrid_key(cert)
    # The CA signed it, and still it does not verify: never read as "no ML-DSA key".
    with pytest.raises(IdentityError, match=message):
        verify_signing_cert(_der(cert), ca.cert, "KOR", NOW)


def test_an_ml_dsa_key_beside_a_non_ed25519_key_is_refused(
    ca: pki.CertificateAuthority,
) -> None:
    ecdsa = ec.generate_private_key(ec.SECP256R1()).public_key()
    spki = _spki(MLDSA65PrivateKey.generate())
    cert = _signing_cert(ca, [(SUBJECT_ALT_PUBLIC_KEY_INFO, spki, False)], ecdsa)
    with pytest.raises(IdentityError, match="not an Ed25519 key"):
        certified_hybrid_key(cert)


def test_a_duplicate_ml_dsa_extension_is_refused(ca: pki.CertificateAuthority) -> None:
    spki = _spki(MLDSA65PrivateKey.generate())
    placeholder = x509.ObjectIdentifier("2.5.29.73")  # same encoded length as 2.5.29.72
    cert = _signing_cert(
        ca, [(SUBJECT_ALT_PUBLIC_KEY_INFO, spki, False), (placeholder, spki, False)]
    )
    der = _der(cert).replace(b"\x06\x03\x55\x1d\x49", b"\x06\x03\x55\x1d\x48")
    twice = x509.load_der_x509_certificate(der)
    with pytest.raises(IdentityError, match="more than once"):
        certified_hybrid_key(twice)
    with pytest.raises(IdentityError):
        verify_signing_cert(der, ca.cert, "KOR", NOW)


def test_an_unknown_critical_extension_is_refused(ca: pki.CertificateAuthority) -> None:
    cert = _signing_cert(ca, [(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00", True)])
    with pytest.raises(
        IdentityError, match=r"unknown critical extension 1\.3\.6\.1\.4\.1\.99999\.1"
    ):
        verify_signing_cert(_der(cert), ca.cert, "KOR", NOW)
    plain = _signing_cert(ca, [])
    verify_signing_cert(_der(plain), ca.cert, "KOR", NOW)  # the same, minus that: accepted


# --- private keys on disk ---------------------------------------------------------------


def test_the_ml_dsa_key_is_pem_pkcs8_0600(root: Path, kor: pki.PartnerCredentials) -> None:
    path = root / "partners" / "KOR" / ML_DSA_KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, MLDSA65PrivateKey)
    assert kor.hybrid_signing_key is not None
    assert key.private_bytes_raw() == kor.hybrid_signing_key.ml_dsa.private_bytes_raw()
    assert "PRIVATE" not in repr(kor) and "BEGIN" not in repr(kor)


@pytest.fixture
def copy(root: Path, tmp_path: Path) -> Path:
    """A private copy of the PKI to break."""
    d = tmp_path / "pki"
    shutil.copytree(root, d)
    return d


def test_a_mismatched_ml_dsa_key_is_a_load_error(copy: Path) -> None:
    path = copy / "partners" / "KOR" / ML_DSA_KEY_FILE
    path.write_bytes(pem_private_key(MLDSA65PrivateKey.generate()))
    with pytest.raises(pki.PkiError, match=r"signing-ml-dsa\.key does not match"):
        pki.load_partner(copy / "partners" / "KOR")


def test_a_mismatched_ed25519_half_is_a_load_error(copy: Path) -> None:
    path = copy / "partners" / "KOR" / "signing.key"
    path.write_bytes(pem_private_key(Ed25519PrivateKey.generate()))
    with pytest.raises(pki.PkiError, match=r"signing\.key does not match"):
        pki.load_partner(copy / "partners" / "KOR")


def test_a_missing_ml_dsa_key_is_a_load_error(copy: Path) -> None:
    (copy / "partners" / "KOR" / ML_DSA_KEY_FILE).unlink()
    with pytest.raises(pki.PkiError, match="missing ML-DSA-65 signing key"):
        pki.load_partner(copy / "partners" / "KOR")
    with pytest.raises(pki.PkiError, match="missing ML-DSA-65 signing key"):
        pki.rotate_hpke(copy, "KOR", NOW)


def test_a_wrong_kind_of_key_in_the_ml_dsa_file_is_a_load_error(copy: Path) -> None:
    path = copy / "partners" / "KOR" / ML_DSA_KEY_FILE
    path.write_bytes(pem_private_key(Ed25519PrivateKey.generate()))
    with pytest.raises(pki.PkiError, match="not an ML-DSA-65 private key"):
        pki.load_partner(copy / "partners" / "KOR")


def test_a_stray_ml_dsa_key_beside_a_v1_certificate_is_a_load_error(copy: Path) -> None:
    path = copy / "partners" / "USA" / ML_DSA_KEY_FILE
    path.write_bytes(pem_private_key(MLDSA65PrivateKey.generate()))
    with pytest.raises(pki.PkiError, match="certifies none"):
        pki.load_partner(copy / "partners" / "USA")


def test_a_stripped_bundle_on_disk_is_a_load_error(copy: Path) -> None:
    path = copy / "partners" / "KOR" / pki.BUNDLE_FILE
    signed = directory_pb2.SignedKeyBundle.FromString(path.read_bytes())
    signed.ClearField("ml_dsa_65")
    path.write_bytes(signed.SerializeToString())
    with pytest.raises(pki.PkiError, match="no ML-DSA-65 signature"):
        pki.load_partner(copy / "partners" / "KOR")


def test_rotation_and_reissue_keep_the_hybrid_key(copy: Path) -> None:
    before = pki.load_partner(copy / "partners" / "KOR")
    pki.rotate_hpke(copy, "KOR", NOW + DAY)
    rotated = pki.load_partner(copy / "partners" / "KOR")
    assert rotated.hybrid_signing_key is not None and before.hybrid_signing_key is not None
    assert rotated.hybrid_signing_key.public_key() == before.hybrid_signing_key.public_key()
    assert rotated.bundle.ml_dsa_65  # the new bundle is hybrid-signed
    # Re-issued Ed25519-only over a hybrid partner: the ML-DSA key file goes with it.
    pki.issue_partner(copy, "KOR", NOW, force=True, ml_dsa=False)
    v1 = pki.load_partner(copy / "partners" / "KOR")
    assert v1.hybrid_signing_key is None
    assert not (copy / "partners" / "KOR" / ML_DSA_KEY_FILE).exists()
    pki.issue_partner(copy, "KOR", NOW, force=True)
    assert pki.load_partner(copy / "partners" / "KOR").hybrid_signing_key is not None


# --- key bundles ------------------------------------------------------------------------


def _fresh_bundle(code: str = "KOR") -> directory_pb2.KeyBundle:
    return pki.make_key_bundle(code, HpkePrivateKey.generate(), NOW, NOW + DAY)


def test_a_hybrid_bundle_carries_both_signatures_and_names_its_key(
    kor: pki.PartnerCredentials,
) -> None:
    assert kor.hybrid_signing_key is not None
    hybrid = kor.hybrid_signing_key.public_key()
    bundle = verify_key_bundle(kor.bundle, hybrid, "KOR", NOW)
    assert bundle.signing_key_sha256 == hybrid.fingerprint()
    assert len(kor.bundle.signature) == 64 and len(kor.bundle.ml_dsa_65) == 3309
    # The Ed25519 half is exactly a v1 bundle signature: code that knows only v1 checks it.
    ed25519.verify(
        kor.signing_key.public_key(), kor.bundle.signature, pae(KEY_BUNDLE_TYPE, kor.bundle.bundle)
    )


def test_a_bundle_stripped_of_its_ml_dsa_signature_is_refused(
    kor: pki.PartnerCredentials,
) -> None:
    assert kor.hybrid_signing_key is not None
    stripped = directory_pb2.SignedKeyBundle(
        bundle=kor.bundle.bundle, signature=kor.bundle.signature
    )
    with pytest.raises(IdentityError, match="no ML-DSA-65 signature"):
        verify_key_bundle(stripped, kor.hybrid_signing_key.public_key(), "KOR", NOW)


def test_each_half_of_a_hybrid_bundle_signature_is_checked(
    kor: pki.PartnerCredentials,
) -> None:
    assert kor.hybrid_signing_key is not None
    hybrid = kor.hybrid_signing_key.public_key()
    other = HybridSigningKey.generate().sign(KEY_BUNDLE_TYPE, kor.bundle.bundle)
    bad_ml = directory_pb2.SignedKeyBundle()
    bad_ml.CopyFrom(kor.bundle)
    bad_ml.ml_dsa_65 = other.ml_dsa_65
    with pytest.raises(IdentityError, match="ML-DSA-65 signature does not verify"):
        verify_key_bundle(bad_ml, hybrid, "KOR", NOW)
    bad_ed = directory_pb2.SignedKeyBundle()
    bad_ed.CopyFrom(kor.bundle)
    bad_ed.signature = other.ed25519
    with pytest.raises(IdentityError, match="key bundle signature does not verify"):
        verify_key_bundle(bad_ed, hybrid, "KOR", NOW)


def test_a_hybrid_bundle_is_refused_under_an_ed25519_only_certificate(
    kor: pki.PartnerCredentials,
) -> None:
    # Someone presenting a certificate for the same Ed25519 key without the ML-DSA key.
    with pytest.raises(IdentityError, match="carries an ML-DSA-65 signature"):
        verify_key_bundle(kor.bundle, kor.signing_key.public_key(), "KOR", NOW)
    named = directory_pb2.SignedKeyBundle(bundle=kor.bundle.bundle, signature=kor.bundle.signature)
    with pytest.raises(IdentityError, match="names a signing key other than"):
        verify_key_bundle(named, kor.signing_key.public_key(), "KOR", NOW)


def test_a_bundle_naming_another_hybrid_key_is_refused(kor: pki.PartnerCredentials) -> None:
    assert kor.hybrid_signing_key is not None
    body = _fresh_bundle()
    body.signing_key_sha256 = HybridSigningKey.generate().public_key().fingerprint()
    raw = body.SerializeToString(deterministic=True)
    both = kor.hybrid_signing_key.sign(KEY_BUNDLE_TYPE, raw)
    signed = directory_pb2.SignedKeyBundle(
        bundle=raw, signature=both.ed25519, ml_dsa_65=both.ml_dsa_65
    )
    with pytest.raises(IdentityError, match="names a signing key other than"):
        verify_key_bundle(signed, kor.hybrid_signing_key.public_key(), "KOR", NOW)


def test_a_v1_bundle_is_refused_for_a_hybrid_certificate_and_accepted_for_a_v1_one(
    kor: pki.PartnerCredentials, usa: pki.PartnerCredentials
) -> None:
    assert kor.hybrid_signing_key is not None
    v1 = sign_key_bundle(_fresh_bundle(), kor.signing_key)
    with pytest.raises(IdentityError, match="no ML-DSA-65 signature"):
        verify_key_bundle(v1, kor.hybrid_signing_key.public_key(), "KOR", NOW)
    usa_v1 = sign_key_bundle(_fresh_bundle("USA"), usa.signing_key)
    got = verify_key_bundle(usa_v1, usa.signing_key.public_key(), "USA", NOW)
    assert got.partner == "USA"


# --- the directory ----------------------------------------------------------------------


def _entry(creds: pki.PartnerCredentials) -> directory_pb2.DirectoryEntry:
    return directory_pb2.DirectoryEntry(
        partner=creds.code, signing_cert=creds.signing_cert_der, key_bundle=creds.bundle
    )


def test_the_directory_gives_the_hybrid_signer(
    kor: pki.PartnerCredentials, usa: pki.PartnerCredentials, ca: pki.CertificateAuthority
) -> None:
    d = Directory.verify([_entry(kor), _entry(usa)], ca.cert, NOW)
    assert d.problems == {}
    assert kor.hybrid_signing_key is not None
    hybrid = kor.hybrid_signing_key.public_key()
    assert d.peers["KOR"].hybrid_public == hybrid
    assert d.hybrid_signer("KOR", kor.signing_key_id) == hybrid
    assert d.signer("KOR", kor.signing_key_id) == kor.signing_key.public_key()
    assert d.peers["USA"].hybrid_public is None
    for sender, key_id in [("KOR", "ab"), ("USA", usa.signing_key_id), ("GBR", "1")]:
        with pytest.raises(KeyError):
            d.hybrid_signer(sender, key_id)
    # An entry without a bundle still yields the hybrid key (it comes from the cert).
    bare = directory_pb2.DirectoryEntry(partner="KOR", signing_cert=kor.signing_cert_der)
    assert Directory.verify([bare], ca.cert, NOW).hybrid_signer("KOR", kor.signing_key_id) == hybrid


def test_the_directory_refuses_an_entry_whose_bundle_was_stripped(
    kor: pki.PartnerCredentials, ca: pki.CertificateAuthority
) -> None:
    entry = _entry(kor)
    entry.key_bundle.ClearField("ml_dsa_65")
    d = Directory.verify([entry], ca.cert, NOW)
    assert "KOR" not in d.peers
    assert "no ML-DSA-65 signature" in d.problems["KOR"]


# --- the broker ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PKI valid now (the broker reads the real clock): KOR hybrid, USA v1 only."""
    d = tmp_path_factory.mktemp("pki-live")
    pki.make_dev_pki(d, ["KOR"], ["op1", "op2"], now_ms())
    pki.issue_partner(d, "USA", now_ms(), ml_dsa=False)
    return d


async def test_the_broker_looks_up_hybrid_keys_and_refuses_stripped_bundles(
    live_pki: Path, tmp_path: Path
) -> None:
    b = await running_broker(live_pki, tmp_path / "broker")
    try:
        await admit(live_pki, b.port, policy("KOR"))
        await admit(live_pki, b.port, policy("USA"))
        kor = pki.load_partner(live_pki / "partners" / "KOR")
        usa = pki.load_partner(live_pki / "partners" / "USA")
        assert kor.hybrid_signing_key is not None
        keys = b.exchange.keys
        got = keys.hybrid_signer("KOR", kor.signing_key_id)
        assert got == kor.hybrid_signing_key.public_key()
        assert keys.signer("KOR", kor.signing_key_id) == kor.signing_key.public_key()
        with pytest.raises(KeyError):
            keys.hybrid_signer("USA", usa.signing_key_id)  # v1 only
        with pytest.raises(KeyError):
            keys.hybrid_signer("KOR", "ab")  # not its certificate's serial
        with pytest.raises(KeyError):
            keys.hybrid_signer("GBR", "1")  # unknown

        async with partner(live_pki, "KOR", b.port) as kor_client:
            stripped = directory_pb2.SignedKeyBundle(
                bundle=kor.bundle.bundle, signature=kor.bundle.signature
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await kor_client.stub.RegisterKeys(
                    exchange_pb2.RegisterKeysRequest(bundle=stripped)
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "no ML-DSA-65 signature" in (info.value.details() or "")
            assert await kor_client.register_keys() == kor.current_key_id
        async with partner(live_pki, "USA", b.port) as usa_client:
            assert await usa_client.register_keys() == usa.current_key_id  # v1 still taken
            directory = await usa_client.directory()
            assert directory.hybrid_signer("KOR", kor.signing_key_id) == got
            assert directory.peers["USA"].hybrid_public is None
        refused = await b.audit.query(kind="keys.refused", partner="KOR")
        assert [e.decision for e in refused] == ["bad_key_bundle"]
    finally:
        await b.stop(grace=1)


async def test_the_broker_hybrid_lookup_follows_certificate_expiry(
    live_pki: Path, tmp_path: Path
) -> None:
    offset = [0]

    def clock() -> int:
        return now_ms() + offset[0]

    b = await start_broker(broker_config(live_pki, tmp_path / "broker"), clock=clock)
    try:
        await admit(live_pki, b.port, policy("KOR"))
        kor = pki.load_partner(live_pki / "partners" / "KOR")
        first = b.exchange.keys.hybrid_signer("KOR", kor.signing_key_id)  # now cached
        assert isinstance(first, HybridPublicKey)
        offset[0] = 400 * DAY  # past the one-year certificate
        with pytest.raises(SigningCertNotValid) as info:
            b.exchange.keys.hybrid_signer("KOR", kor.signing_key_id)
        assert info.value.code == "signing_cert_expired"
    finally:
        offset[0] = 0
        await b.stop(grace=1)


async def test_operators_cannot_admit_a_certificate_with_a_malformed_ml_dsa_key(
    live_pki: Path, tmp_path: Path
) -> None:
    b = await running_broker(live_pki, tmp_path / "broker")
    try:
        truncated = _spki(MLDSA65PrivateKey.generate())[:-1]
        cert = _signing_cert(
            pki.load_ca(live_pki), [(SUBJECT_ALT_PUBLIC_KEY_INFO, truncated, False)]
        )
        async with operator(live_pki, "op1", b.port) as op1:
            with pytest.raises(ClientError) as info:
                await op1.admit("KOR", _der(cert), policy_to_proto(policy("KOR")), "test")
            assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT
            assert "ML-DSA-65" in info.value.message
            [entry] = await op1.audit(kind="admin.refused", tail=True, limit=1)
            assert entry.decision == "bad_signing_cert"
            assert "KOR" not in {p.partner for p in await op1.partners()}
    finally:
        await b.stop(grace=1)
