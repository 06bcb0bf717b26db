"""The mutual-TLS channel to the broker: credentials, message sizes, keepalive and reconnect."""

from __future__ import annotations

import os

import grpc

KEEPALIVE_MS = 30_000
# For tests only: a shorter keepalive interval (milliseconds).
KEEPALIVE_ENV = "COALITION_KEEPALIVE_TIME_MS"


def keepalive_ms() -> int:
    """The client's keepalive ping interval: KEEPALIVE_MS unless a test shortens it."""
    raw = os.environ.get(KEEPALIVE_ENV, "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else KEEPALIVE_MS


def _authority(target: str) -> list[tuple[str, str]]:
    """For a list of brokers (``ipv4:10.0.0.1:7443,10.0.0.2:7443``, tried in order, the
    next one when a broker goes), the name the brokers' certificates are checked
    against: the first address's host (every broker's certificate must hold it)."""
    if not target.startswith(("ipv4:", "ipv6:")) or "," not in target:
        return []
    first = target.split(":", 1)[1].split(",", 1)[0]
    host = first.rsplit(":", 1)[0].strip("[]")
    return [("grpc.default_authority", host)]


def secure_channel(target: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> grpc.aio.Channel:
    """A mutual-TLS channel to the broker."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )
    return grpc.aio.secure_channel(
        target,
        creds,
        options=[
            *_authority(target),
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
            # Pings keep an idle subscription's connection known alive (and NAT entries
            # fresh); the broker accepts them from min_ping_interval_ms (10 s) on.
            ("grpc.keepalive_time_ms", keepalive_ms()),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ],
    )
